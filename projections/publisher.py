"""Publication of the log to NATS JetStream (CONTRACT §7): every event once, in position order.

The stream is the truth of what has been published. On every (re)start the
publisher asks JetStream for the stream's last message and reads its
``Loyalty-Position`` header: publication resumes right after it, whatever
the checkpoint in ``publication_checkpoints`` says. A publisher killed
between JetStream's ack and its checkpoint write therefore neither
republishes (which ``Nats-Msg-Id`` would catch only within the duplicate
window) nor skips. The checkpoint is progress for the status and the lag
gauge, and the starting point only when the stream holds no message.

Order, and a fence: each message carries ``Nats-Expected-Last-Sequence``,
the stream sequence the publisher expects to be the last before it. JetStream
stores a message only right after its predecessor, so with many messages in
flight one that is refused (or lost with a connection) makes every later one
fail too, never land out of order; and a second publisher that believes it
holds the lease (its database session died unnoticed) cannot write anything
but duplicates the stream drops. After any failure the publisher closes its
NATS connection, waits (backoff), reconnects and reconciles again.

One publisher at a time: a session-level advisory lock, as the projectors'
lease (projections/runtime.py), held on the connection that reads the log and
writes the checkpoint; a standby takes over within ``LEASE_RETRY_S``.

Acks are pipelined: up to ``IN_FLIGHT_MAX`` messages are published before
the first ack is awaited, one message in ``MESSAGES_PER_ACK`` asks for an
ack that answers for those before it (``AckWindow``), and acks come back in
order on one wildcard inbox subscription. Publication never touches the
command path: it only reads the log, so NATS down or slow makes it lag
(``state`` ``failed`` with the reason while it cannot publish), never a
command wait or fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig
from prometheus_client import CollectorRegistry, Gauge

from events.codec import encode_json
from events.envelope import Envelope
from ledger.clock import Clock, system_clock
from ledger.database import describe_url
from ledger.store import NOTIFY_CHANNEL, read_envelopes
from projections.runtime import LEASE_RETRY_S, MONITOR_S, Connect, _close, _lag_seconds, connection, lease_key

log = logging.getLogger("loyalty.publisher")

STREAM = "LOYALTY"
SUBJECT_PREFIX = "loyalty.events"
PARTITIONS = 16
STATUS_NAME = "publisher"  # its entry in GET /v1/projections

# Sums (bench/README.md): an envelope is 0.5-1 KB, so 1,024 in flight hold about 1 MB in the
# client's buffer and the server's inbound queue; a page of 1,000 events is read in a few
# milliseconds while the previous one is being published.
IN_FLIGHT_MAX = 1024
# One ack per this many messages: an ack costs the server a reply and the client a parse, a Msg and a
# callback, about half of what publishing the message costs (bench/README.md, publication).
MESSAGES_PER_ACK = 128
PAGE_EVENTS = 1000
ACK_TIMEOUT_S = 10.0  # the oldest message in flight unacknowledged this long: reconnect and reconcile
CONNECT_TIMEOUT_S = 2.0
API_TIMEOUT_S = 5.0  # JetStream API calls (stream info, create, get message)
PROGRESS_INTERVAL_S = 0.2  # the checkpoint is written at most this often while publishing
IDLE_POLL_S = 1.0  # a caught-up publisher re-reads the head this often even without a notification
LEASE_NAMESPACE = 0x5042  # the first key of the publisher's advisory lock ("PB")
# Retrying costs one connection attempt, and a NATS back from a restart should see publication resume
# within seconds, so the backoff stops at 5 s (the projectors' goes to 30 s).
BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 5.0)


class Misconfigured(Exception):
    """NATS answers, but the stream is not one this publisher may write to (retried all the same)."""


class Refused(Exception):
    """JetStream refused a message (too large, no stream, wrong last sequence...)."""


@dataclass(frozen=True)
class PublisherConfig:
    url: str
    stream: str = STREAM
    subject_prefix: str = SUBJECT_PREFIX
    duplicate_window_s: float = 120.0  # for a stream the publisher creates (JetStream's default)
    in_flight_max: int = IN_FLIGHT_MAX
    messages_per_ack: int = MESSAGES_PER_ACK
    page_events: int = PAGE_EVENTS
    ack_timeout_s: float = ACK_TIMEOUT_S

    @property
    def subjects(self) -> str:
        return f"{self.subject_prefix}.>"


def partition(stream_id: str) -> int:
    """zlib's crc32 of the UTF-8 id, mod 16: one member's events share a partition (CONTRACT §7)."""
    return zlib.crc32(stream_id.encode()) % PARTITIONS


def subject(envelope: Envelope, prefix: str = SUBJECT_PREFIX) -> str:
    return f"{prefix}.{partition(envelope.stream_id)}.{envelope.type}"


def headers(envelope: Envelope) -> dict[str, str]:
    position = str(envelope.position)
    return {
        "Nats-Msg-Id": position,
        "Loyalty-Position": position,
        "Loyalty-Stream": envelope.stream_id,
        "Loyalty-Type": envelope.type,
    }


def body(envelope: Envelope) -> bytes:
    """The envelope as GET /v1/events encodes it."""
    return encode_json(envelope)


# -- the stream ---------------------------------------------------------------------------------


async def ensure_stream(js, config: PublisherConfig) -> None:
    """Create the stream when missing; refuse one that takes other subjects."""
    try:
        info = await js.stream_info(config.stream)
    except nats.js.errors.NotFoundError:
        await js.add_stream(StreamConfig(
            name=config.stream, subjects=[config.subjects], storage=StorageType.FILE,
            duplicate_window=config.duplicate_window_s,
        ))
        log.info("created the JetStream stream %s (subjects %s, file storage)", config.stream, config.subjects)
        return
    if list(info.config.subjects or []) != [config.subjects]:
        raise Misconfigured(
            f"the stream {config.stream} exists with subjects {info.config.subjects}, not [{config.subjects!r}]:"
            f" change its subjects or delete it"
        )


@dataclass(frozen=True)
class StreamTail:
    """Where the stream ends: its last sequence and the log position of its last message (None: empty)."""

    sequence: int
    position: int | None


async def stream_tail(js, config: PublisherConfig) -> StreamTail:
    info = await js.stream_info(config.stream)
    sequence = info.state.last_seq or 0
    if not info.state.messages:
        return StreamTail(sequence, None)
    try:
        last = await js.get_msg(config.stream, seq=sequence)
    except nats.js.errors.NotFoundError:  # the last message was deleted: the newest one left
        last = await js.get_msg(config.stream, subject=config.subjects)
    value = (last.headers or {}).get("Loyalty-Position")
    if value is None or not value.isdigit():
        raise Misconfigured(
            f"the last message of stream {config.stream} (sequence {last.seq}) has no Loyalty-Position header:"
            f" something other than this publisher writes to {config.subjects}"
        )
    return StreamTail(sequence, int(value))


# -- the checkpoint -------------------------------------------------------------------------------


async def ensure_checkpoint(conn: asyncpg.Connection, stream: str) -> int:
    await conn.execute("INSERT INTO publication_checkpoints (stream) VALUES ($1) ON CONFLICT (stream) DO NOTHING", stream)
    return await conn.fetchval("SELECT position FROM publication_checkpoints WHERE stream = $1", stream)


async def save_progress(conn: asyncpg.Connection, stream: str, position: int, sequence: int) -> None:
    await conn.execute(
        """UPDATE publication_checkpoints SET position = $2, stream_sequence = $3, state = 'live', reason = NULL,
               updated_at = now() WHERE stream = $1""",
        stream, position, sequence,
    )


async def mark_failed(conn: asyncpg.Connection, stream: str, reason: str) -> None:
    await conn.execute(
        "UPDATE publication_checkpoints SET state = 'failed', reason = $2, updated_at = now() WHERE stream = $1",
        stream, reason,
    )


async def status(conn_or_pool, stream: str = STREAM, clock: Clock = system_clock) -> dict[str, Any]:
    """The ``publisher`` entry of GET /v1/projections: a projection's fields, plus ``reason`` when failed."""
    async with connection(conn_or_pool) as conn:
        head = await conn.fetchval("SELECT position FROM event_head")
        row = await conn.fetchrow("SELECT position, state, reason FROM publication_checkpoints WHERE stream = $1", stream)
        position, state, reason = (row["position"], row["state"], row["reason"]) if row else (0, "live", None)
        entry = {
            "name": STATUS_NAME,
            "position": position,
            "head": head,
            "lag_events": head - position,
            "lag_seconds": await _lag_seconds(conn, position, head, clock()),
            "state": state,
        }
        if reason is not None:
            entry["reason"] = reason
        return entry


class PublicationStatus:
    """The ``publisher`` entry of GET /v1/projections and its gauges, read from the checkpoint row.

    Read from the database, not from a publisher object: the publisher that
    leads may run in another process (another ``serve``, or ``loyalty publish``).
    """

    def __init__(self, pool, clock: Clock, registry: CollectorRegistry, stream: str = STREAM) -> None:
        self.pool, self.clock, self.stream = pool, clock, stream
        self.position = Gauge("loyalty_publish_position", "Last log position JetStream has acknowledged",
                              registry=registry)
        self.lag_events = Gauge("loyalty_publish_lag_events", "Events appended but not yet published to JetStream",
                                registry=registry)
        self.lag_seconds = Gauge("loyalty_publish_lag_seconds", "Age of the oldest event not yet published",
                                 registry=registry)
        self.failed = Gauge("loyalty_publish_failed", "1 while the publisher cannot publish (the reason is in"
                            " GET /v1/projections)", registry=registry)

    async def read(self) -> dict[str, Any]:
        entry = await status(self.pool, self.stream, self.clock)
        self.position.set(entry["position"])
        self.lag_events.set(entry["lag_events"])
        self.lag_seconds.set(entry["lag_seconds"])
        self.failed.set(1 if entry["state"] == "failed" else 0)
        return entry

    async def monitor(self) -> None:
        """Keep the gauges fresh between reads of GET /v1/projections."""
        while True:
            with contextlib.suppress(Exception):  # best effort: the publisher logs its own failures
                await self.read()
            await asyncio.sleep(MONITOR_S)


# -- acks in flight -------------------------------------------------------------------------------


class PubAck(msgspec.Struct):
    stream: str | None = None
    seq: int | None = None
    duplicate: bool = False
    error: dict[str, Any] | None = None


_decode_ack = msgspec.json.Decoder(PubAck).decode


class AckWindow:
    """Messages published and not yet acknowledged, bounded; acks checked in order.

    Only every ``messages_per_ack``-th message, and the last of each page, asks for
    an ack (a reply subject ending with its position): one ack answers for the
    messages before it. That holds because every message carries
    ``Nats-Expected-Last-Sequence``: JetStream stores the acked one only right
    after its predecessor, which it stored only right after its own, and so on
    back to the last ack, so an ack naming the expected sequence proves the
    whole group stored in order. A message without a reply that JetStream
    refuses answers nothing, but the group's acked message then fails its
    fence. An ack must name the sequence expected for its message; anything
    else (an error, a duplicate stored elsewhere, an ack out of order, silence
    past ``ack_timeout_s``, the connection closing) ends the window with a
    failure, and the publisher reconciles with the stream.

    ``careful`` (a session after a failure) asks every message for its ack until
    one lands: a refusal then names its own cause (too large...), not only the
    fence that the refused message broke for the next one.
    """

    def __init__(self, nc: Nats, sequence: int, position: int, config: PublisherConfig, careful: bool = False) -> None:
        self.nc, self.config = nc, config
        self.prefix = nc.new_inbox() + "."
        self.next_sequence = sequence + 1
        self.first_position = position
        self.acked_position, self.acked_sequence = position, sequence
        # At most half the window between acks: the refill below waits until half the window is acked,
        # which the messages after the last ack request would otherwise keep from ever happening.
        self.messages_per_ack_steady = max(1, min(config.messages_per_ack, config.in_flight_max // 2))
        self.messages_per_ack = 1 if careful else self.messages_per_ack_steady
        self.unacked = 0  # messages sent and not yet covered by an ack
        self.since_reply = 0  # messages sent after the last one that asked for an ack
        self.in_flight: deque[tuple[int, int, int, float]] = deque()  # position, expected sequence, messages, sent at
        self.failure: Exception | None = None
        self.changed = asyncio.Event()

    async def open(self) -> None:
        await self.nc.subscribe(self.prefix + "*", cb=self._on_ack, pending_msgs_limit=4 * self.config.in_flight_max)

    def fail(self, failure: Exception) -> None:
        if self.failure is None:
            self.failure = failure
        self.changed.set()

    async def send_page(self, envelopes: list[Envelope]) -> None:
        """Publish a page in order; its last message asks for an ack, so ``settle`` can wait for all."""
        last = len(envelopes) - 1
        for index, envelope in enumerate(envelopes):
            if self.unacked >= self.config.in_flight_max:
                # Refill by halves: one wake-up per many acks, not one per ack.
                while self.unacked > self.config.in_flight_max // 2:
                    await self._wait()
            self._check()
            await self._send(envelope, ask_ack=index == last or self.since_reply + 1 >= self.messages_per_ack)

    async def _send(self, envelope: Envelope, ask_ack: bool) -> None:
        message_headers = headers(envelope)
        message_headers["Nats-Expected-Last-Sequence"] = str(self.next_sequence - 1)
        self.unacked += 1
        self.since_reply += 1
        reply = ""
        if ask_ack:
            # In flight before it is sent: publish yields to the loop, and the ack may come meanwhile.
            self.in_flight.append((envelope.position, self.next_sequence, self.since_reply, time.monotonic()))
            self.since_reply = 0
            reply = self.prefix + str(envelope.position)
        self.next_sequence += 1
        await self.nc.publish(
            subject(envelope, self.config.subject_prefix), body(envelope), reply=reply, headers=message_headers,
        )

    async def settle(self) -> None:
        """Until every message in flight is acknowledged (or the window fails)."""
        while self.in_flight:
            await self._wait()
        self._check()

    def _check(self) -> None:
        if self.failure is not None:
            raise self.failure

    async def _wait(self) -> None:
        self._check()
        assert self.in_flight, "waiting for an ack no message in flight asked for"
        self.changed.clear()
        oldest_sent_at = self.in_flight[0][3]
        remaining_s = oldest_sent_at + self.config.ack_timeout_s - time.monotonic()
        try:
            await asyncio.wait_for(self.changed.wait(), max(remaining_s, 0.001))
        except asyncio.TimeoutError:
            if self.in_flight and self.in_flight[0][3] == oldest_sent_at:
                self.fail(TimeoutError(
                    f"JetStream acknowledged nothing for position {self.in_flight[0][0]} within"
                    f" {self.config.ack_timeout_s:g} s"
                ))
        self._check()

    async def _on_ack(self, msg: Msg) -> None:
        position = int(msg.subject[len(self.prefix):])
        if self.failure is not None or not self.in_flight:
            return
        expected_position, expected_sequence, messages, _ = self.in_flight[0]
        if msg.headers and msg.headers.get("Status") == "503":
            self.fail(Refused(f"no stream {self.config.stream} answered for {msg.subject!r} (position {position})"))
            return
        ack = _decode_ack(msg.data)
        if ack.error is not None:
            self.fail(Refused(
                f"JetStream refused position {position}: {ack.error.get('description')}"
                f" (err_code {ack.error.get('err_code')})"
            ))
        elif position != expected_position:
            self.fail(Refused(f"the ack for position {position} came before the one for {expected_position}"))
        elif ack.stream != self.config.stream or ack.seq != expected_sequence:
            self.fail(Refused(
                f"position {position} was stored as {ack.stream} sequence {ack.seq}"
                f"{' (a duplicate)' if ack.duplicate else ''}, not {self.config.stream} {expected_sequence}"
            ))
        else:
            self.in_flight.popleft()
            self.unacked -= messages
            self.acked_position, self.acked_sequence = position, expected_sequence
            self.messages_per_ack = self.messages_per_ack_steady
            self.changed.set()


# -- the publisher ----------------------------------------------------------------------------------


def _is_database_failure(failure: BaseException) -> bool:
    return isinstance(failure, (asyncpg.PostgresError, asyncpg.InterfaceError))


class Publisher:
    """Publishes the log while it holds the lease; stands by while another process does."""

    def __init__(self, connect: Connect, config: PublisherConfig) -> None:
        self.connect = connect
        self.config = config
        self.leading = False
        self.state: str | None = None  # live or failed, as last written to the checkpoint row
        self.reason: str | None = None
        self.failures = 0  # NATS sessions failed in a row (the backoff's step)
        self._saved: tuple[int | None, float] = (None, 0.0)  # the position last written to the checkpoint, and when

    def lease(self) -> tuple[int, int]:
        """The advisory lock's two keys: one publisher per stream across processes."""
        return LEASE_NAMESPACE, lease_key(self.config.stream)

    async def run(self) -> None:
        database_failures = 0
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self.connect()
                while not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", *self.lease()):
                    await asyncio.sleep(LEASE_RETRY_S)  # standing by, on the same connection
                log.info("publisher to %s holds the lease", self.config.stream)
                database_failures = 0
                await self._lead(conn)
            except asyncio.CancelledError:
                raise
            except Exception:
                database_failures += 1
                log.exception("publisher lost its database connection (%d in a row); retrying", database_failures)
                await asyncio.sleep(_backoff_s(database_failures))
            finally:
                self.leading = False
                if conn is not None:
                    await _close(conn)  # releases the lease with the session

    async def _lead(self, conn: asyncpg.Connection) -> None:
        """NATS sessions, one after another, while the lease lasts (a database failure ends it)."""
        self.leading = True
        wake = asyncio.Event()
        await conn.add_listener(NOTIFY_CHANNEL, lambda *_args: wake.set())
        await ensure_checkpoint(conn, self.config.stream)
        while True:
            try:
                await self._session(conn, wake)
            except asyncio.CancelledError:
                raise
            except Exception as failure:
                if _is_database_failure(failure) or conn.is_closed():
                    raise
                await self._failed(conn, failure)

    async def _failed(self, conn: asyncpg.Connection, failure: Exception) -> None:
        self.failures += 1
        reason = describe_failure(failure, self.config)
        delay_s = _backoff_s(self.failures)
        if reason != self.reason or self.state != "failed":  # one clear line per cause, not one per retry
            log.error("publisher to %s failed: %s; retrying (with backoff) until it works", self.config.stream, reason)
        else:
            log.debug("publisher still failing: %s; retrying in %.1f s", reason, delay_s)
        self.state, self.reason = "failed", reason
        await mark_failed(conn, self.config.stream, reason)
        await asyncio.sleep(delay_s)

    async def _session(self, conn: asyncpg.Connection, wake: asyncio.Event) -> None:
        """Connect, check the stream, reconcile, then publish until something fails."""
        window: AckWindow | None = None

        async def closed() -> None:
            if window is not None:
                window.fail(ConnectionError(f"the connection to NATS at {describe_url(self.config.url)} closed"))

        errors: list[Exception] = []

        async def error(failure: Exception) -> None:  # nats-py's callback; its exceptions say less
            errors[:] = [failure]

        try:
            # No reconnection inside nats-py (the session ends and reconciles instead); its
            # max_reconnect_attempts counts tries past the first, and 0 would mean forever.
            nc = await nats.connect(
                self.config.url, allow_reconnect=False, connect_timeout=CONNECT_TIMEOUT_S, max_reconnect_attempts=1,
                reconnect_time_wait=0, skip_subject_validation=True, closed_cb=closed, disconnected_cb=closed,
                error_cb=error,
            )
        except Exception as failure:
            cause = errors[0] if errors else failure
            raise ConnectionError(
                f"cannot reach NATS at {describe_url(self.config.url)}: {type(cause).__name__} {cause}".rstrip()
            ) from failure
        try:
            js = nc.jetstream(timeout=API_TIMEOUT_S)
            await ensure_stream(js, self.config)
            window = await self._reconcile(conn, nc, js)
            await self._publish(conn, window, wake)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), timeout=2)

    async def _reconcile(self, conn: asyncpg.Connection, nc: Nats, js) -> AckWindow:
        """Where publication resumes: after the stream's last message, or the checkpoint if it holds none."""
        tail = await stream_tail(js, self.config)
        checkpoint = await conn.fetchval(
            "SELECT position FROM publication_checkpoints WHERE stream = $1", self.config.stream
        )
        position = checkpoint if tail.position is None else tail.position
        head = await conn.fetchval("SELECT position FROM event_head")
        if position > head:
            raise Misconfigured(
                f"the stream {self.config.stream} holds position {position}, beyond this database's head {head}:"
                f" it was fed from another database (or this one was restored from an older backup)"
            )
        if position != checkpoint:
            log.info("publisher resumes after position %d (the stream's last message; the checkpoint said %d)",
                     position, checkpoint)
        window = AckWindow(nc, tail.sequence, position, self.config, careful=self.failures > 0)
        await window.open()
        self._saved = (None, 0.0)
        return window

    async def _publish(self, conn: asyncpg.Connection, window: AckWindow, wake: asyncio.Event) -> None:
        after = window.acked_position
        envelopes = await read_envelopes(conn, after, self.config.page_events)
        while True:
            if envelopes:
                after = envelopes[-1].position
                # The next page is read while this one goes out (the connection is free meanwhile).
                next_page = asyncio.ensure_future(read_envelopes(conn, after, self.config.page_events))
                try:
                    await window.send_page(envelopes)
                finally:
                    envelopes = await next_page
                await self._progress(conn, window)
                continue
            wake.clear()  # before settling: a notification from now on means "look again"
            await window.settle()
            await self._progress(conn, window, settled=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), IDLE_POLL_S)
            envelopes = await read_envelopes(conn, after, self.config.page_events)

    async def _progress(self, conn: asyncpg.Connection, window: AckWindow, settled: bool = False) -> None:
        """Write the checkpoint and ``live``: when acks have moved it (at most every PROGRESS_INTERVAL_S),
        and when everything sent is acknowledged (``settled``)."""
        position, sequence = window.acked_position, window.acked_sequence  # acks may come during the write
        saved_position, saved_at = self._saved
        now = time.monotonic()
        if settled:
            if position == saved_position and self.state == "live":
                return
        elif position in (saved_position, window.first_position) or now - saved_at < PROGRESS_INTERVAL_S:
            return
        await save_progress(conn, self.config.stream, position, sequence)
        self._saved = (position, now)
        if self.state == "failed":
            log.info("publisher to %s recovered: publishing again after %s", self.config.stream, self.reason)
        self.state, self.reason, self.failures = "live", None, 0


def describe_failure(failure: Exception, config: PublisherConfig) -> str:
    where = describe_url(config.url)
    if isinstance(failure, (Misconfigured, Refused, TimeoutError, ConnectionError)) and str(failure):
        return str(failure)
    if isinstance(failure, (OSError, nats.errors.Error)) and not isinstance(failure, nats.js.errors.APIError):
        return f"NATS at {where}: {type(failure).__name__} {failure}".rstrip()
    if isinstance(failure, nats.js.errors.ServiceUnavailableError) and failure.description is None:
        # What a NATS without JetStream answers: nobody serves the JetStream API's subjects.
        return f"NATS at {where} has no JetStream: start nats-server with -js (or enable jetstream in its config)"
    if isinstance(failure, nats.js.errors.APIError):
        return f"JetStream at {where} answered: {failure.description} (err_code {failure.err_code})"
    return f"{type(failure).__name__}: {failure}"


def _backoff_s(failures: int) -> float:
    return BACKOFF_S[min(failures, len(BACKOFF_S)) - 1]

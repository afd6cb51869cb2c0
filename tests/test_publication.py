"""Publication to NATS JetStream (CONTRACT §7, issue 16), driven directly against a real
PostgreSQL and a real nats-server of the test's own (tests/nats_server.py).

What every test ends with: the stream holds each event of the log exactly
once, in position order, on its partition's subject, with the feed's body
and the contract's headers (``assert_published_once_in_order``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from pathlib import Path

import nats
import pytest
from nats.js.api import DiscardPolicy

from events.codec import encode_json
from ledger.store import read_envelopes
from projections import publisher as pub
from projections.publisher import Publisher, PublisherConfig
from tests.nats_server import NatsServer
from tests.test_projections_support import Shop

pytestmark = pytest.mark.asyncio

WAIT_S = 30.0


async def eventually(check, timeout_s: float = WAIT_S, what: str = "the condition"):
    """Poll ``check`` (async, returns truthy when done) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not (result := await check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return result


@contextlib.asynccontextmanager
async def nats_client(url: str):
    nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0)
    try:
        yield nc, nc.jetstream()
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def running(publisher: Publisher):
    task = asyncio.get_running_loop().create_task(publisher.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def connector(database_url: str):
    import asyncpg

    return lambda: asyncpg.connect(database_url)


async def stream_messages(url: str, stream: str = pub.STREAM) -> list:
    """Every message of the stream, in stream order (an ephemeral pull consumer)."""
    async with nats_client(url) as (_nc, js):
        total = (await js.stream_info(stream)).state.messages
        consumer = await js.pull_subscribe(f"{pub.SUBJECT_PREFIX}.>", stream=stream)
        messages: list = []
        while len(messages) < total:
            messages += await consumer.fetch(min(1000, total - len(messages)), timeout=5)
        for message in messages:
            await message.ack()
        return messages


async def published_position(url: str, stream: str = pub.STREAM) -> int:
    """The log position of the stream's last message (0: none)."""
    async with nats_client(url) as (_nc, js):
        with contextlib.suppress(Exception):
            return (await pub.stream_tail(js, PublisherConfig(url=url, stream=stream))).position or 0
    return 0


async def head(pool) -> int:
    return await pool.fetchval("SELECT position FROM event_head")


async def wait_until_published(pool, url: str, timeout_s: float = WAIT_S) -> int:
    """Until the stream's last message is the head's and the checkpoint has followed; returns the head."""
    async def caught_up():
        target = await head(pool)
        checkpoint = await pool.fetchval("SELECT position FROM publication_checkpoints WHERE stream = $1", pub.STREAM)
        return target if await published_position(url) == target == checkpoint else None

    try:
        return await eventually(caught_up, timeout_s, "the publisher to reach the head")
    except AssertionError as timed_out:
        raise AssertionError(f"head {await head(pool)}, stream at {await published_position(url)},"
                             f" checkpoint {await checkpoint_row(pool)}") from timed_out


async def assert_published_once_in_order(pool, url: str) -> None:
    target = await head(pool)
    messages = await stream_messages(url)
    positions = [int(m.headers["Loyalty-Position"]) for m in messages]
    assert positions == list(range(1, target + 1)), "not every event once and in position order"
    assert [m.metadata.sequence.stream for m in messages] == list(range(1, target + 1))
    envelopes = await read_envelopes(pool, 0, target)
    for message, envelope in zip(messages, envelopes, strict=True):
        assert message.data == encode_json(envelope)  # the feed's JSON, byte for byte
        assert message.subject == f"loyalty.events.{pub.partition(envelope.stream_id)}.{envelope.type}"
        assert message.headers["Nats-Msg-Id"] == str(envelope.position)
        assert message.headers["Loyalty-Stream"] == envelope.stream_id
        assert message.headers["Loyalty-Type"] == envelope.type


async def some_history(shop: Shop, members: int, purchases: int, tag: str = "") -> None:
    for n in range(members):
        outcome = await shop.enrol(f"m{tag}{n}")
        assert outcome.status == 201, outcome
    for k in range(purchases):
        for n in range(members):
            outcome = await shop.purchase(f"m{tag}{n}", f"p{tag}{k}", 100_00 + k)
            assert outcome.status == 201, outcome


async def checkpoint_row(pool) -> dict:
    row = await pool.fetchrow("SELECT * FROM publication_checkpoints WHERE stream = $1", pub.STREAM)
    return dict(row) if row else {}


async def state_is(pool, state: str, reason_part: str = "") -> bool:
    row = await checkpoint_row(pool)
    return row.get("state") == state and reason_part in (row.get("reason") or "")


# -- the partition and the message ----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestWarning")  # not a coroutine, under the module's asyncio mark
def test_the_partition_is_zlib_crc32_of_the_utf8_member_id_mod_16():
    import zlib

    for member_id in ("m_123", "m1", "$programme", "会员-7"):
        assert pub.partition(member_id) == zlib.crc32(member_id.encode("utf-8")) % 16
    assert {pub.partition(f"m{n}") for n in range(200)} == set(range(16))


async def test_every_event_is_published_once_in_order_with_the_feeds_body_and_headers(pool, nats_server, database_url):
    shop = Shop(pool)
    await some_history(shop, members=12, purchases=3)
    config = PublisherConfig(url=nats_server.url, page_events=40, in_flight_max=16)
    async with running(Publisher(connector(database_url), config)):
        await wait_until_published(pool, nats_server.url)
        await some_history(shop, members=5, purchases=2, tag="late")  # published live, after a notification
        await wait_until_published(pool, nats_server.url)
    await assert_published_once_in_order(pool, nats_server.url)
    async with nats_client(nats_server.url) as (_nc, js):
        info = await js.stream_info(pub.STREAM)
    assert info.config.subjects == ["loyalty.events.>"] and info.config.storage == "file"
    status = await pub.status(pool)
    assert status == {"name": "publisher", "position": status["head"], "head": status["head"], "lag_events": 0,
                      "lag_seconds": 0.0, "state": "live"}


# -- crashes ----------------------------------------------------------------------------------------------


class Killed(BaseException):
    """Ends the publisher's task where it stands, as a SIGKILL would (nothing catches it)."""


class KilledBeforeCheckpoint(Publisher):
    """Dies the first time it is about to write a checkpoint past ``at_position``: acked, not recorded."""

    def __init__(self, *args, at_position: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.at_position = at_position

    async def _progress(self, conn, window, settled: bool = False) -> None:
        if window.acked_position >= self.at_position:
            raise Killed()
        await super()._progress(conn, window, settled)


async def duplicate_window_has_passed(url: str, position: int) -> bool:
    """Whether JetStream has forgotten ``Nats-Msg-Id: position``, asked without storing anything.

    The probe expects a last message id no message has. JetStream answers a
    duplicate inside the window before it compares that id; after the window the
    comparison refuses the probe. Either way nothing is stored.
    """
    async with nats_client(url) as (nc, _js):
        reply = await nc.request(f"{pub.SUBJECT_PREFIX}.0.probe", b"probe", timeout=5, headers={
            "Nats-Msg-Id": str(position), "Nats-Expected-Last-Msg-Id": "no-such-message"})
    answer = json.loads(reply.data)
    assert answer.get("duplicate") or answer["error"]["err_code"] == 10070, answer  # 10070: wrong last msg id
    return "error" in answer


async def test_a_publisher_killed_between_publish_and_checkpoint_neither_duplicates_nor_skips_after_the_duplicate_window(
    pool, nats_server, database_url
):
    shop = Shop(pool)
    await some_history(shop, members=10, purchases=4)
    config = PublisherConfig(url=nats_server.url, duplicate_window_s=1.0, page_events=25, in_flight_max=8)
    killed = KilledBeforeCheckpoint(connector(database_url), config, at_position=60)
    async with running(killed) as task:
        with pytest.raises(Killed):
            await asyncio.wait_for(asyncio.shield(task), WAIT_S)
    published = await published_position(nats_server.url)
    checkpoint = (await checkpoint_row(pool))["position"]
    assert checkpoint < 60 <= published, "the kill must fall between JetStream's ack and the checkpoint"
    # Past the duplicate window, Nats-Msg-Id alone would no longer catch a republished event.
    await eventually(lambda: duplicate_window_has_passed(nats_server.url, published), what="the duplicate window")
    await some_history(shop, members=3, purchases=2, tag="after")
    async with running(Publisher(connector(database_url), config)):
        await wait_until_published(pool, nats_server.url)
    await assert_published_once_in_order(pool, nats_server.url)


async def test_nats_stopped_and_restarted_mid_load_publishes_every_event_once_in_order(pool, nats_server, database_url):
    shop = Shop(pool)
    config = PublisherConfig(url=nats_server.url, page_events=50, in_flight_max=32)
    load_done = asyncio.Event()

    async def load() -> None:
        await some_history(shop, members=8, purchases=12)
        load_done.set()

    async with running(Publisher(connector(database_url), config)):
        loading = asyncio.get_running_loop().create_task(load())
        await eventually(lambda: published_position(nats_server.url), what="a first message")
        nats_server.stop()
        await eventually(lambda: state_is(pool, "failed", "NATS"), what="the publisher to report NATS down")
        appended_while_down = await head(pool)
        await asyncio.sleep(0)  # the load keeps appending: nothing waits for NATS
        await nats_server.start()
        await loading
        assert await head(pool) > appended_while_down
        await wait_until_published(pool, nats_server.url)
        assert await state_is(pool, "live")
    await assert_published_once_in_order(pool, nats_server.url)


# -- one publisher at a time ------------------------------------------------------------------------------


async def test_two_publishers_on_one_database_publish_each_event_once_and_a_standby_takes_over(
    pool, nats_server, database_url
):
    shop = Shop(pool)
    config = PublisherConfig(url=nats_server.url, page_events=30, in_flight_max=16)
    first, second = Publisher(connector(database_url), config), Publisher(connector(database_url), config)
    async with running(first) as first_task, running(second) as second_task:
        await some_history(shop, members=6, purchases=3)
        await wait_until_published(pool, nats_server.url)
        assert first.leading != second.leading, "exactly one of them holds the lease"
        leader_task, standby = (first_task, second) if first.leading else (second_task, first)
        loading = asyncio.get_running_loop().create_task(some_history(shop, members=6, purchases=4, tag="b"))
        leader_task.cancel()  # the leader's connection closes: its lease goes with it
        await asyncio.gather(leader_task, return_exceptions=True)
        await loading
        await eventually(lambda: asyncio.sleep(0, standby.leading), what="the standby to take the lease")
        await wait_until_published(pool, nats_server.url)
    await assert_published_once_in_order(pool, nats_server.url)


class NoLease(Publisher):
    """A publisher whose lease is always granted: what a split brain looks like."""

    lease_namespace_offset = 0

    def lease(self) -> tuple[int, int]:
        NoLease.lease_namespace_offset += 1
        return pub.LEASE_NAMESPACE + NoLease.lease_namespace_offset, 0


async def test_two_publishers_that_both_believe_they_lead_still_publish_each_event_once(pool, nats_server, database_url):
    shop = Shop(pool)
    config = PublisherConfig(url=nats_server.url, page_events=20, in_flight_max=8)
    both = [NoLease(connector(database_url), config) for _ in range(2)]
    async with running(both[0]), running(both[1]):
        await eventually(lambda: asyncio.sleep(0, all(p.leading for p in both)), what="both to lead")
        await some_history(shop, members=8, purchases=4)
        await wait_until_published(pool, nats_server.url)
    await assert_published_once_in_order(pool, nats_server.url)


# -- refusals and bad configuration ------------------------------------------------------------------------


async def test_a_message_jetstream_refuses_is_retried_never_skipped(pool, nats_server, database_url):
    shop = Shop(pool)
    await some_history(shop, members=3, purchases=2)
    async with nats_client(nats_server.url) as (_nc, js):
        await js.add_stream(name=pub.STREAM, subjects=["loyalty.events.>"], max_msg_size=300)
    config = PublisherConfig(url=nats_server.url)
    async with running(Publisher(connector(database_url), config)):
        await eventually(lambda: state_is(pool, "failed", "refused"), what="the refusal to show")
        async with nats_client(nats_server.url) as (_nc, js):
            info = await js.stream_info(pub.STREAM)
            stuck_at = info.state.messages
            info.config.max_msg_size = -1
            await js.update_stream(info.config)
        await wait_until_published(pool, nats_server.url)
    assert stuck_at < await head(pool)
    await assert_published_once_in_order(pool, nats_server.url)


async def test_a_refused_message_that_asked_for_no_ack_stops_its_group_and_is_reported_with_its_own_cause(
    pool, nats_server, database_url
):
    shop = Shop(pool)
    await some_history(shop, members=3, purchases=2)
    subjects = [pub.subject(e) for e in await read_envelopes(pool, 0, await head(pool))]
    # A stream that takes one message a subject refuses the first that repeats one: mid-page, not its last
    # message (which asks for its ack anyway).
    refused = next(i for i, s in enumerate(subjects) if s in subjects[:i])
    assert refused < len(subjects) - 1
    async with nats_client(nats_server.url) as (_nc, js):
        await js.add_stream(name=pub.STREAM, subjects=["loyalty.events.>"], max_msgs_per_subject=1,
                            discard=DiscardPolicy.NEW, discard_new_per_subject=True)
    # One ack for the whole page: the refused message asks for none.
    config = PublisherConfig(url=nats_server.url, messages_per_ack=pub.PAGE_EVENTS, in_flight_max=2 * pub.PAGE_EVENTS)
    async with running(Publisher(connector(database_url), config)):
        await eventually(lambda: state_is(pool, "failed", "maximum messages per subject"), what="the cause to show")
        async with nats_client(nats_server.url) as (_nc, js):
            info = await js.stream_info(pub.STREAM)
            stuck_at = info.state.messages
            info.config.max_msgs_per_subject, info.config.discard_new_per_subject = -1, False
            await js.update_stream(info.config)
        await wait_until_published(pool, nats_server.url)
    assert stuck_at == refused, "everything before the refused message, nothing after it"
    await assert_published_once_in_order(pool, nats_server.url)


async def test_an_unreachable_url_is_a_failed_state_with_the_reason_and_no_crash(pool, database_url, caplog):
    from tests.service_process import free_port

    config = PublisherConfig(url=f"nats://127.0.0.1:{free_port()}")
    publisher = Publisher(connector(database_url), config)
    async with running(publisher) as task:
        await eventually(lambda: state_is(pool, "failed", "cannot reach NATS"), what="the failed state")
        assert not task.done()
    status = await pub.status(pool)
    assert status["state"] == "failed" and config.url in status["reason"]
    assert any("cannot reach NATS" in r.getMessage() for r in caplog.records if r.name == "loyalty.publisher")


async def test_a_nats_without_jetstream_is_a_failed_state_that_says_so(pool, database_url):
    plain = await NatsServer(jetstream=False).start()
    try:
        async with running(Publisher(connector(database_url), PublisherConfig(url=plain.url))) as task:
            await eventually(lambda: state_is(pool, "failed", "has no JetStream: start nats-server with -js"),
                             what="the failed state")
            assert not task.done()
    finally:
        plain.close()


async def test_a_stream_with_other_subjects_is_a_failed_state_until_it_is_fixed(pool, nats_server, database_url, caplog):
    shop = Shop(pool)
    await some_history(shop, members=2, purchases=1)
    async with nats_client(nats_server.url) as (_nc, js):
        await js.add_stream(name=pub.STREAM, subjects=["orders.>"])
    async with running(Publisher(connector(database_url), PublisherConfig(url=nats_server.url))) as task:
        await eventually(lambda: state_is(pool, "failed", "orders.>"), what="the failed state")
        assert not task.done()
        assert any("orders.>" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
        async with nats_client(nats_server.url) as (_nc, js):
            await js.delete_stream(pub.STREAM)
        await wait_until_published(pool, nats_server.url)
    await assert_published_once_in_order(pool, nats_server.url)


# -- the README's example consumer ---------------------------------------------------------------------------


def readme_example_consumer(url: str) -> dict:
    """The example consumer of README.md, loaded as a team would copy it (main() not yet run)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("**An example consumer**"):]
    source = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(source.replace("asyncio.run(main())", "").replace("nats://127.0.0.1:4222", url), "README", "exec"),
         namespace)
    return namespace


async def test_the_readme_example_consumer_reads_its_partition_once_and_in_order(pool, nats_server, database_url):
    shop = Shop(pool)
    await some_history(shop, members=16, purchases=2)
    async with running(Publisher(connector(database_url), PublisherConfig(url=nats_server.url))):
        await wait_until_published(pool, nats_server.url)
    example = readme_example_consumer(nats_server.url)
    expected = [e.position for e in await read_envelopes(pool, 0, 10_000)
                if pub.partition(e.stream_id) == example["PARTITION"]]
    assert expected, "the history must reach the example's partition"
    handled: list[int] = []

    async def handle(event: dict) -> None:
        handled.append(event["position"])

    example["handle"] = handle
    consumer = asyncio.get_running_loop().create_task(example["main"]())
    try:
        await eventually(lambda: asyncio.sleep(0, len(handled) >= len(expected)), what="the partition's events")
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
    assert handled == expected

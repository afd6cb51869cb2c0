"""The projector runtime: feed → read models, exactly once, one active projector each.

Exactly once: a batch's changes and the projection's checkpoint
(``projection_checkpoints``) are written in one transaction, with the
checkpoint row locked (``FOR UPDATE``) and re-read inside it. A crash
before the commit loses the whole batch and its checkpoint together; a
second projector racing the first waits on the row lock, then sees the
moved checkpoint and reads on from there. So no batch is ever applied
twice, whatever dies when.

One active projector per projection: a session-level advisory lock taken on
the projector's own connection is its lease. The lock lives exactly as long
as that connection, and the projector applies its batches on that same
connection, so a projector whose lease has gone can no longer write. Others
try the lease every ``LEASE_RETRY_S`` and take over when the holder dies.

Ordering: positions are gap-free and commit in order (see schema.sql), so
every event at or below the head read before a batch is visible: a batch
reads ``(checkpoint, head]`` and, when it holds fewer events than the batch
size, has seen all of them. A projection that filters event types can then
move its checkpoint to that head, and its lag reads zero when it is caught up.

The projectors of one process read the feed through one ``SharedFeed``
(``projections/feed.py``), so each window is read and decoded once for all
of them; it is a cache of immutable rows, and none of the above depends on it.

Rebuild: ``request_rebuild`` adds a checkpoint row ``<name>__shadow`` and
marks the projection ``rebuilding``. The lease holder then, between its live
batches, applies the log from position 0 into shadow tables
(``<table>__shadow``) while reads keep using the live ones; once the shadow
checkpoint has reached the live one it swaps the tables by renaming, in one
transaction. A rebuild survives restarts: its progress is its checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import asyncpg
from prometheus_client import CollectorRegistry, Gauge

from ledger.clock import Clock, system_clock
from ledger.database import SCHEMA_LOCK_KEY
from ledger.programme import Programme
from ledger.store import NOTIFY_CHANNEL
from projections import campaigns, coupons, liability, members, points
from projections.feed import SharedFeed, read_window
from projections.tables import SHADOW_SUFFIX, Target, live, shadow

log = logging.getLogger("loyalty.projections")

PROJECTIONS: dict[str, ModuleType] = {m.NAME: m for m in (members, points, coupons, liability, campaigns)}

# A live batch's events become visible to readers (min_position) when it commits, so live batches
# stay small.
BATCH_EVENTS_MAX = 1000
# A projector more than a live batch behind the head (catching up) reads larger pages (Paging): each
# batch costs about ten round trips and a commit per projection whatever its length (measured over 300k
# stored events, five projections: PostgreSQL's CPU 4.5-7.2 s with pages of 1,000, 3.6-4.3 s with 5,000).
CATCH_UP_BATCH_EVENTS_MAX = 5000
# Nobody reads a rebuild's shadow tables before the swap, and each batch costs about ten round
# trips: 5,000 against 1,000 took a rebuild of members over 1M events from 29-30k to 37-38k events/s.
REBUILD_BATCH_EVENTS_MAX = 5000
IDLE_POLL_S = 1.0  # a caught-up projector re-reads the head this often even without a notification
LEASE_RETRY_S = 2.0  # how soon a standby takes over a dead projector's lease
FAILURE_BACKOFF_S = (0.5, 1, 2, 5, 10, 30)
MONITOR_S = 5.0  # how often the gauges are refreshed
WAIT_POLL_S = 0.05  # min_position waits re-read the checkpoint this often across processes
REBUILD_CHANNEL = "loyalty_projection_rebuild"
LEASE_NAMESPACE = 0x4C50  # the first key of every projector's advisory lock ("LP")

Connect = Callable[[], Awaitable[asyncpg.Connection]]

# A projection's tables grow from nothing during a catch-up or a rebuild: a generic plan cached
# while a table was small (a sequential scan) would stay in use long after it has grown (measured:
# the points projection's last-line query at 100-180 ms a batch), so each query is planned for
# the tables as they are; planning costs well under a millisecond a batch.
PLAN_EVERY_QUERY = "SET plan_cache_mode = force_custom_plan"

# A batch with more to follow before the head commits without waiting for its WAL to reach the disk.
# Its rows and its checkpoint are still one transaction, and WAL replays in order: a crash of
# PostgreSQL can lose only the last such batches, whole, with their checkpoints, and the projector
# applies them again from the events (committed durably by the writer). The batch that reaches the
# head commits durably, and so flushes every batch before it.
COMMIT_WITHOUT_WAITING_FOR_DISK = "SET LOCAL synchronous_commit = off"


def projection(name: str) -> ModuleType:
    if name not in PROJECTIONS:
        raise LookupError(f"no projection {name!r}; projections are {', '.join(PROJECTIONS)}")
    return PROJECTIONS[name]


def checkpoint_name(module: ModuleType, target: Target) -> str:
    return module.NAME + target.suffix


@contextlib.asynccontextmanager
async def connection(conn_or_pool) -> AsyncIterator[asyncpg.Connection]:
    if isinstance(conn_or_pool, asyncpg.Pool):
        async with conn_or_pool.acquire() as conn:
            yield conn
    else:
        yield conn_or_pool


# -- tables -------------------------------------------------------------------------------


async def ensure_tables(conn_or_pool, programme: Programme) -> None:
    """Create every projection's live tables and checkpoint row (idempotent)."""
    async with connection(conn_or_pool) as conn, conn.transaction():
        # The schema lock: concurrent CREATE ... IF NOT EXISTS can still collide.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_KEY)
        for module in PROJECTIONS.values():
            for statement in module.ddl(live(programme)):
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO projection_checkpoints (name) VALUES ($1) ON CONFLICT (name) DO NOTHING", module.NAME
            )


async def recreate_tables(conn: asyncpg.Connection, module: ModuleType, target: Target) -> None:
    """Empty shadow tables in the current shape (a rebuild starts from these)."""
    assert target.is_shadow, "only shadow tables are ever dropped"
    async with conn.transaction():
        for table in module.TABLES:
            await conn.execute(f"DROP TABLE IF EXISTS {target.table(table)}")
        for statement in module.ddl(target):
            await conn.execute(statement)


# -- one batch ------------------------------------------------------------------------------


class Paging:
    """How many events a projector's next batch reads.

    Within ``live_events`` of its target a batch reads at most that many. Further behind (catching
    up), each full page doubles the next, up to ``catch_up_max_events`` (``live_events`` when not
    given): a projector only a little behind still commits, and shows readers, its first
    ``live_events`` as soon as a live one would. A page that was not full (the target was reached)
    starts the doubling again.
    """

    def __init__(self, live_events: int = BATCH_EVENTS_MAX, catch_up_max_events: int | None = None) -> None:
        self.live_events = live_events
        self.catch_up_max_events = max(live_events, catch_up_max_events or live_events)
        self.catch_up_events = live_events

    def page_events(self, behind_events: int) -> int:
        """The page of a batch that starts ``behind_events`` before its target."""
        return self.catch_up_events if behind_events > self.live_events else self.live_events

    def applied(self, positions: int) -> None:
        """What the last batch applied (positions it moved the checkpoint by) sets the next catch-up page."""
        full = positions >= self.catch_up_events
        self.catch_up_events = min(2 * self.catch_up_events, self.catch_up_max_events) if full else self.live_events


async def project_batch(
    conn: asyncpg.Connection,
    module: ModuleType,
    target: Target,
    *,
    until: int | None = None,
    paging: Paging | None = None,
    feed: SharedFeed | None = None,
) -> tuple[int, int]:
    """Apply the next batch after the checkpoint and move it, in one transaction.

    Reads a page (``paging``'s, by default a live batch's) of the events in
    ``(checkpoint, min(head, until)]``, from ``feed`` when the projectors of
    this process share one (its windows hold the events of all their types,
    and may have been read by another of them). Returns the checkpoint
    before and after.
    """
    name = checkpoint_name(module, target)
    head = await conn.fetchval("SELECT position FROM event_head")
    upto = head if until is None else min(head, until)
    async with conn.transaction():
        before = await conn.fetchval("SELECT position FROM projection_checkpoints WHERE name = $1 FOR UPDATE", name)
        if before is None:
            raise LookupError(f"no checkpoint {name!r}: run ensure_tables (or request the rebuild) first")
        if before >= upto:
            return before, before
        batch_size = (paging or Paging()).page_events(upto - before)
        if feed is None:
            window = await read_window(conn, before, upto, batch_size, module.EVENT_TYPES)
            batch = window.events  # read for this projection's types alone
        else:
            window = await feed.window(conn, module, before, upto, batch_size)
            batch = window.of_types(module.EVENT_TYPES)
        assert window.after == before and before < window.end <= upto
        if batch:
            await module.apply(conn, batch, target)
        if window.end < upto:
            await conn.execute(COMMIT_WITHOUT_WAITING_FOR_DISK)
        await conn.execute(
            "UPDATE projection_checkpoints SET position = $2, updated_at = now() WHERE name = $1", name, window.end
        )
    return before, window.end


async def catch_up(
    conn: asyncpg.Connection, module: ModuleType, target: Target, *, until: int | None = None,
    batch_size: int = BATCH_EVENTS_MAX, feed: SharedFeed | None = None,
) -> int:
    """Apply batches until the checkpoint reaches the head (or ``until``); returns the checkpoint."""
    while True:
        before, after = await project_batch(conn, module, target, until=until, paging=Paging(batch_size), feed=feed)
        if after == before:
            return after


# -- rebuilds -------------------------------------------------------------------------------


async def request_rebuild(conn_or_pool, name: str) -> None:
    """Ask for a rebuild of ``name`` beside the live tables (the lease holder runs it)."""
    projection(name)
    async with connection(conn_or_pool) as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO projection_checkpoints (name, position, state) VALUES ($1, 0, 'rebuilding')"
            " ON CONFLICT (name) DO NOTHING",
            name + SHADOW_SUFFIX,
        )
        await conn.execute(
            "UPDATE projection_checkpoints SET state = 'rebuilding', updated_at = now() WHERE name = $1", name
        )
        await conn.execute("SELECT pg_notify($1, $2)", REBUILD_CHANNEL, name)
    log.info("rebuild of projection %s requested", name)


async def rebuild_step(conn: asyncpg.Connection, module: ModuleType, programme: Programme,
                       batch_size: int = REBUILD_BATCH_EVENTS_MAX) -> str:
    """One step of a requested rebuild: ``none`` requested, a batch ``building``, or ``swapped``."""
    target = shadow(programme)
    shadow_position = await conn.fetchval(
        "SELECT position FROM projection_checkpoints WHERE name = $1", checkpoint_name(module, target)
    )
    if shadow_position is None:
        return "none"
    if shadow_position == 0:
        await recreate_tables(conn, module, target)
    live_position = await conn.fetchval("SELECT position FROM projection_checkpoints WHERE name = $1", module.NAME)
    if shadow_position < live_position:
        _, shadow_position = await project_batch(conn, module, target, until=live_position, paging=Paging(batch_size))
    if shadow_position < live_position:
        return "building"
    # Swap in this same step: the lease holder's next live batch would move the target again,
    # and under steady appends the shadow would never be found caught up.
    return "swapped" if await swap(conn, module) else "building"


async def swap(conn: asyncpg.Connection, module: ModuleType) -> bool:
    """Put the caught-up shadow tables in place of the live ones, atomically."""
    name, shadow_name = module.NAME, module.NAME + SHADOW_SUFFIX
    async with conn.transaction():
        rows = await conn.fetch(
            "SELECT name, position FROM projection_checkpoints WHERE name = ANY($1::text[]) FOR UPDATE",
            [name, shadow_name],
        )
        positions = {r["name"]: r["position"] for r in rows}
        if positions.get(shadow_name, -1) < positions[name]:
            return False  # the live tables moved on meanwhile: catch up first
        for table in module.TABLES:
            await conn.execute(f"DROP TABLE {table}")
            await conn.execute(f"ALTER TABLE {table}{SHADOW_SUFFIX} RENAME TO {table}")
            await _rename_indexes(conn, table)
        await conn.execute(
            "UPDATE projection_checkpoints SET position = $2, state = 'live', updated_at = now() WHERE name = $1",
            name, positions[shadow_name],
        )
        await conn.execute("DELETE FROM projection_checkpoints WHERE name = $1", shadow_name)
    log.info("projection %s rebuilt and swapped in at position %d", name, positions[shadow_name])
    return True


async def _rename_indexes(conn: asyncpg.Connection, table: str) -> None:
    """Indexes keep their shadow names through a table rename; the next rebuild needs those free."""
    shadow_prefix = table + SHADOW_SUFFIX
    indexes = await conn.fetch(
        """SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
           WHERE i.indrelid = $1::regclass""",
        table,
    )
    for row in indexes:
        if row["relname"].startswith(shadow_prefix):
            new_name = table + row["relname"][len(shadow_prefix):]
            await conn.execute(f'ALTER INDEX "{row["relname"]}" RENAME TO "{new_name}"')


async def rebuild_here(conn: asyncpg.Connection, name: str, programme: Programme,
                       batch_size: int = REBUILD_BATCH_EVENTS_MAX, progress: Callable[[], Any] | None = None) -> None:
    """Request and run a whole rebuild in this task (the caller holds the lease, or is alone)."""
    module = projection(name)
    await request_rebuild(conn, name)
    while True:
        await project_batch(conn, module, live(programme), paging=Paging(batch_size))
        if await rebuild_step(conn, module, programme, batch_size) == "swapped":
            return
        if progress is not None:
            progress()


# -- the status of every projection -------------------------------------------------------------


async def statuses(conn_or_pool, clock: Clock = system_clock) -> list[dict[str, Any]]:
    """``GET /v1/projections``: position, head, lag in events and seconds, state, rebuild progress."""
    async with connection(conn_or_pool) as conn:
        head = await conn.fetchval("SELECT position FROM event_head")
        rows = {r["name"]: r for r in await conn.fetch("SELECT name, position, state FROM projection_checkpoints")}
        now = clock()
        listed = []
        for name in PROJECTIONS:
            row = rows.get(name)
            position, state = (row["position"], row["state"]) if row else (0, "live")
            status = {
                "name": name,
                "position": position,
                "head": head,
                "lag_events": head - position,
                "lag_seconds": await _lag_seconds(conn, position, head, now),
                "state": state,
            }
            rebuild = rows.get(name + SHADOW_SUFFIX)
            if rebuild is not None:
                status["rebuild"] = {"position": rebuild["position"], "target_position": position}
            listed.append(status)
        return listed


async def _lag_seconds(conn, position: int, head: int, now) -> float:
    """How long the oldest event the projection has not applied has been waiting."""
    if position >= head:
        return 0.0
    recorded_at = await conn.fetchval("SELECT recorded_at FROM events WHERE position = $1", position + 1)
    return round(max((now - recorded_at).total_seconds(), 0.0), 3) if recorded_at else 0.0


class ProjectionMetrics:
    """Lag and rebuild progress gauges, on the application's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["projection"]
        self.position = Gauge("loyalty_projection_position", "Last log position applied", labels, registry=registry)
        self.lag_events = Gauge("loyalty_projection_lag_events", "Events appended but not yet applied", labels,
                                registry=registry)
        self.lag_seconds = Gauge("loyalty_projection_lag_seconds", "Age of the oldest event not yet applied", labels,
                                 registry=registry)
        self.rebuilding = Gauge("loyalty_projection_rebuilding", "1 while a rebuild runs beside the live tables",
                                labels, registry=registry)
        self.rebuild_progress = Gauge("loyalty_projection_rebuild_progress_ratio",
                                      "Shadow position over live position during a rebuild (0..1)", labels,
                                      registry=registry)

    def record(self, listed: list[dict[str, Any]]) -> None:
        for status in listed:
            name = status["name"]
            self.position.labels(name).set(status["position"])
            self.lag_events.labels(name).set(status["lag_events"])
            self.lag_seconds.labels(name).set(status["lag_seconds"])
            rebuild = status.get("rebuild")
            self.rebuilding.labels(name).set(1 if rebuild else 0)
            ratio = rebuild["position"] / rebuild["target_position"] if rebuild and rebuild["target_position"] else 0
            self.rebuild_progress.labels(name).set(min(ratio, 1.0))


# -- waiting for a position (read-your-writes) --------------------------------------------------


class ProgressBoard:
    """Wakes readers in this process when a projector here commits a batch.

    The checkpoint in the database stays the truth; the board only saves
    polling when the projector runs in the same process as the reader.
    """

    def __init__(self) -> None:
        self._changed: dict[str, asyncio.Event] = {}

    def advanced(self, name: str) -> None:
        changed = self._changed.pop(name, None)
        if changed is not None:
            changed.set()

    async def wait(self, name: str, timeout_s: float) -> None:
        changed = self._changed.setdefault(name, asyncio.Event())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout_s)


@dataclass
class ProjectionService:
    """What the HTTP layer needs: positions, waits, statuses and rebuild requests."""

    pool: Any
    programme: Programme
    clock: Clock
    board: ProgressBoard = field(default_factory=ProgressBoard)
    metrics: ProjectionMetrics | None = None

    async def position(self, name: str) -> int:
        return await self.pool.fetchval("SELECT position FROM projection_checkpoints WHERE name = $1", name) or 0

    async def wait_for(self, name: str, min_position: int, wait_ms: int) -> bool:
        """Wait (at most ``wait_ms``) until projection ``name`` has applied ``min_position``."""
        deadline = time.monotonic() + wait_ms / 1000
        while await self.position(name) < min_position:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return False
            await self.board.wait(name, min(remaining_s, WAIT_POLL_S))
        return True

    async def statuses(self) -> list[dict[str, Any]]:
        listed = await statuses(self.pool, self.clock)
        if self.metrics is not None:
            self.metrics.record(listed)
        return listed

    async def request_rebuild(self, name: str) -> None:
        await request_rebuild(self.pool, name)


# -- the projector: a lease, then batches -------------------------------------------------------


def lease_key(name: str) -> int:
    """A stable signed 32-bit key per projection name, for pg_try_advisory_lock(namespace, key)."""
    crc = zlib.crc32(name.encode())
    return crc - 2**32 if crc >= 2**31 else crc


class Projector:
    """Runs one projection while it holds the lease; stands by while another process does."""

    def __init__(
        self,
        module: ModuleType,
        connect: Connect,
        programme: Programme,
        *,
        batch_size: int = BATCH_EVENTS_MAX,
        board: ProgressBoard | None = None,
        feed: SharedFeed | None = None,
        catch_up_batch_size: int | None = None,
    ) -> None:
        self.module = module
        self.connect = connect
        self.programme = programme
        self.paging = Paging(batch_size, catch_up_batch_size)
        self.board = board
        self.feed = feed
        self.leading = False
        self.failures = 0

    @property
    def name(self) -> str:
        return self.module.NAME

    async def run(self) -> None:
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self.connect()
                await conn.execute(PLAN_EVERY_QUERY)
                while not await conn.fetchval(
                    "SELECT pg_try_advisory_lock($1, $2)", LEASE_NAMESPACE, lease_key(self.name)
                ):
                    await asyncio.sleep(LEASE_RETRY_S)  # standing by, on the same connection
                log.info("projector %s holds the lease", self.name)
                await self._lead(conn)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.failures += 1
                log.exception("projector %s failed (%d in a row); retrying", self.name, self.failures)
                if self.leading:  # a standby's failure says nothing about the projection
                    await _mark_failed(conn, self.name)
                await asyncio.sleep(FAILURE_BACKOFF_S[min(self.failures, len(FAILURE_BACKOFF_S)) - 1])
            finally:
                self.leading = False
                if self.feed is not None:
                    self.feed.forget(self.module)
                if conn is not None:
                    await _close(conn)  # releases the lease with the session

    async def _lead(self, conn: asyncpg.Connection) -> None:
        self.leading = True
        if self.feed is not None:
            self.feed.join(self.module)
        wake = asyncio.Event()
        for channel in (NOTIFY_CHANNEL, REBUILD_CHANNEL):
            await conn.add_listener(channel, lambda *_args: wake.set())
        while True:
            wake.clear()  # before the step: a notification during it means "look again"
            if not await self.step(conn):
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), IDLE_POLL_S)

    async def step(self, conn: asyncpg.Connection) -> bool:
        """One live batch, then one rebuild step if one is requested; False when there was nothing to do."""
        before, after = await project_batch(conn, self.module, live(self.programme), paging=self.paging, feed=self.feed)
        self.paging.applied(after - before)
        if after != before and self.board is not None:
            self.board.advanced(self.name)
        rebuilding = await rebuild_step(conn, self.module, self.programme)
        if self.failures:
            await _restore_state(conn, self.name)
            self.failures = 0
        return after != before or rebuilding != "none"


async def _mark_failed(conn: asyncpg.Connection | None, name: str) -> None:
    if conn is None or conn.is_closed():
        return
    with contextlib.suppress(Exception):  # the connection may be the thing that failed
        await conn.execute("UPDATE projection_checkpoints SET state = 'failed', updated_at = now() WHERE name = $1", name)


async def _restore_state(conn: asyncpg.Connection, name: str) -> None:
    await conn.execute(
        """UPDATE projection_checkpoints SET state = CASE WHEN EXISTS
               (SELECT 1 FROM projection_checkpoints WHERE name = $2) THEN 'rebuilding' ELSE 'live' END
           WHERE name = $1""",
        name, name + SHADOW_SUFFIX,
    )


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), timeout=5)
    except Exception:  # a broken connection cannot close politely
        conn.terminate()


class ProjectionRuntime:
    """Every projection's projector, plus a monitor for the gauges, as tasks of this process."""

    def __init__(
        self,
        connect: Connect,
        service: ProjectionService,
        names: Sequence[str] | None = None,
        batch_size: int = BATCH_EVENTS_MAX,
        catch_up_batch_size: int | None = None,
    ) -> None:
        self.service = service
        modules = [projection(name) for name in (PROJECTIONS if names is None else names)]
        # Their live batches share one read and one decoding of each window of the feed.
        feed = SharedFeed(set().union(*(m.EVENT_TYPES for m in modules)))
        self.projectors = [
            Projector(module, connect, service.programme, batch_size=batch_size, board=service.board, feed=feed,
                      catch_up_batch_size=catch_up_batch_size)
            for module in modules
        ]
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await ensure_tables(self.service.pool, self.service.programme)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(p.run(), name=f"projector:{p.name}") for p in self.projectors]
        self._tasks.append(loop.create_task(self._monitor(), name="projector:monitor"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _monitor(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # gauges are best effort; the projectors log their own failures
                await self.service.statuses()
            await asyncio.sleep(MONITOR_S)

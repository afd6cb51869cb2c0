"""The feed the projectors read: lean decoding, and windows shared by the projectors of a process.

The shared feed is only a cache of immutable rows: these tests check that
each window is read once for all the projectors that share it, that a
projector behind or stopped never holds the others up for long, and that
the exactly-once rule and the leases hold as they do without it.
"""

from __future__ import annotations

import asyncio

import asyncpg
import msgspec
import pytest

from events.catalogue import EVENT_TYPES
from events.codec import from_data
from projections import coupons, feed, liability, members, points, runtime
from projections.feed import SharedFeed, decode, read_window
from projections.runtime import ProjectionRuntime, ProjectionService
from tests.test_projections import Interrupted, _reached, assert_same_as_a_rebuild_and_the_replay, eventually, stop
from tests.test_projections_support import PROGRAMME, Shop, a_little_history

pytestmark = pytest.mark.asyncio

ALL_TYPES = set().union(*(m.EVENT_TYPES for m in (members, points, coupons, liability)))  # a process running all four


@pytest.fixture
async def shop(pool):
    shop = Shop(pool)
    await a_little_history(shop)
    await runtime.ensure_tables(pool, PROGRAMME)
    return shop


@pytest.fixture
def connect(database_url):
    return lambda: asyncpg.connect(database_url)


@pytest.fixture
def reads(monkeypatch):
    """Every read of the events table by the feed, as (after, upto)."""
    made: list[tuple[int, int]] = []

    async def counted(conn, after, upto, limit, types):
        made.append((after, upto))
        return await read_window(conn, after, upto, limit, types)

    monkeypatch.setattr(feed, "read_window", counted)
    return made


async def test_events_decode_straight_into_their_structs_as_from_data_does(pool, shop):
    rows = await pool.fetch("SELECT type, schema_version, data::text AS data FROM events ORDER BY position")
    assert {row["type"] for row in rows} >= {"member_enrolled", "points_earned", "points_redeemed", "coupon_issued"}
    for row in rows:
        data = row["data"]
        assert decode(row["type"], row["schema_version"], data) == from_data(
            row["type"], row["schema_version"], msgspec.json.decode(data)
        )
    # An older schema version goes through the upcasters.
    v0 = '{"purchase_id": "p1", "store_id": "s1", "amount": "258.00"}'
    assert decode("purchase_recorded", 0, v0).amount_cents == 25_800


async def test_a_window_ends_at_its_last_event_when_full_else_at_the_head_it_was_read_up_to(pool, shop):
    head = await shop.head()
    async with pool.acquire() as conn:
        full = await read_window(conn, 0, head, 3, EVENT_TYPES)
        rest = await read_window(conn, full.end, head, 10_000, EVENT_TYPES)
    assert [e.position for e, _ in full.events] == [1, 2, 3] and full.end == 3
    assert rest.after == 3 and rest.end == head
    assert [e.position for e, _ in rest.events] == list(range(4, head + 1))
    cut = rest.until(10)
    assert cut.end == 10 and [e.position for e, _ in cut.events] == list(range(4, 11))


async def test_projectors_sharing_a_feed_read_each_window_once(pool, shop, reads, monkeypatch):
    monkeypatch.setattr(feed, "LAGGARD_WAIT_S", 30.0)  # no projector is given up on here
    shared = SharedFeed(ALL_TYPES)
    for module in runtime.PROJECTIONS.values():
        shared.join(module)
    head = await shop.head()

    async def catch_up(module) -> None:
        async with pool.acquire() as conn:
            await runtime.catch_up(conn, module, runtime.live(PROGRAMME), batch_size=4, feed=shared)

    await asyncio.gather(*(catch_up(module) for module in runtime.PROJECTIONS.values()))
    windows, after = [], 0
    async with pool.acquire() as conn:
        while after < head:
            windows.append((after, head))
            after = (await read_window(conn, after, head, 4, ALL_TYPES)).end
    assert sorted(reads) == windows  # each window read once, for all four
    assert shared._kept == {}  # each taken by all four, then let go
    await assert_same_as_a_rebuild_and_the_replay(pool, shop)


async def test_a_projector_behind_the_kept_windows_reads_alone_up_to_where_they_start(pool, shop, reads):
    shared = SharedFeed(ALL_TYPES)
    shared.join(points)
    shared.join(members)
    async with pool.acquire() as conn:
        head = await shop.head()
        ahead = await shared.window(conn, points, 8, head, 4)
        behind = await shared.window(conn, members, 0, head, 100)
        assert behind.end == 8  # not the whole feed: the window kept for it starts there
        assert await shared.window(conn, members, 8, head, 100) == ahead
    assert reads == [(8, head), (0, 8)]


async def test_a_projector_that_stops_taking_windows_holds_the_others_up_only_briefly(pool, shop, monkeypatch, reads):
    monkeypatch.setattr(feed, "LAGGARD_WAIT_S", 0.05)
    shared = SharedFeed(ALL_TYPES)
    shared.join(points)
    shared.join(members)  # joins, then never reads: hung, or busy with a rebuild
    head = await shop.head()
    async with pool.acquire() as conn:
        after = 0
        while after < head:
            after = (await shared.window(conn, points, after, head + 100, 1)).end
            assert len(shared._kept) <= feed.WINDOWS_KEPT  # memory stays bounded
    assert shared._laggards == {members}  # waited for once, then no more
    assert len(reads) == len(set(reads))
    shared.forget(members)
    assert shared._kept == {}


async def test_a_failed_read_leaves_the_projectors_waiting_on_it_to_read_for_themselves(pool, shop, monkeypatch):
    shared = SharedFeed(ALL_TYPES)
    shared.join(points)
    shared.join(members)
    started = asyncio.Event()

    async def failing(conn, after, upto, limit, types):
        started.set()
        await asyncio.sleep(0.05)
        raise ConnectionError("the connection went")

    head = await shop.head()
    async with pool.acquire() as one, pool.acquire() as other:
        monkeypatch.setattr(feed, "read_window", failing)
        first = asyncio.create_task(shared.window(one, points, 0, head, 1000))
        await started.wait()
        monkeypatch.setattr(feed, "read_window", read_window)
        second = asyncio.create_task(shared.window(other, members, 0, head, 1000))
        with pytest.raises(ConnectionError):
            await first
        window = await second
        assert window == await read_window(other, 0, head, 1000, ALL_TYPES)


async def test_four_projectors_of_a_process_one_killed_inside_a_batch_apply_every_event_once(
    pool, shop, connect, monkeypatch
):
    """The shared feed neither holds the others up behind a hung projector nor changes exactly-once."""
    monkeypatch.setattr(feed, "LAGGARD_WAIT_S", 0.1)
    head = await shop.head()
    service = ProjectionService(pool, PROGRAMME, shop.clock)
    projectors = ProjectionRuntime(connect, service, batch_size=3)
    hanging = Interrupted(points, at_batch=3, hang=True)
    projectors.projectors[1].module = hanging
    assert projectors.projectors[1].name == "points"
    await projectors.start()
    try:
        await asyncio.wait_for(hanging.reached.wait(), 10)
        for name in ("members", "coupons", "liability"):
            await eventually(lambda: _reached(pool, name, head))
        assert not await _reached(pool, "points", head)
    finally:
        await projectors.stop()  # the process dies: the hung batch is rolled back with its connection
    await assert_same_as_a_rebuild_and_the_replay(pool, shop)  # points resumes from its checkpoint

"""The projector runtime and the read models on a real database (CONTRACT §4, issue 5).

Crashes are injected by wrapping a projection module so that its ``apply``
stops inside the batch's transaction (hangs until killed, or raises) after
having made its changes: the checkpoint and the changes must then be lost
together, and the restarted projector must end with exactly the rows a
rebuild from scratch gives.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from datetime import datetime, timedelta

import asyncpg
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from cli.replay import replay
from ledger import views
from ledger.views import balance
from projections import coupons, liability, members, points, runtime
from projections.runtime import (
    Paging,
    ProjectionMetrics,
    ProjectionRuntime,
    ProjectionService,
    Projector,
    catch_up,
    ensure_tables,
    request_rebuild,
    statuses,
)
from projections.tables import live
from tests.test_projections_support import (
    PROGRAMME,
    Shop,
    a_little_history,
    all_rows,
    project_all,
    rebuild_all,
)

pytestmark = pytest.mark.asyncio


async def test_a_catch_up_page_doubles_after_each_full_one_and_starts_again_at_the_target():
    paging = Paging(live_events=100, catch_up_max_events=500)
    assert paging.page_events(behind_events=100) == 100  # within a live batch of the target
    pages = []
    for _ in range(5):
        pages.append(paging.page_events(behind_events=10_000))
        paging.applied(pages[-1])  # full
    assert pages == [100, 200, 400, 500, 500]
    assert paging.page_events(behind_events=50) == 100  # near the target: a live batch, whatever the doubling
    paging.applied(50)  # not full: the target was reached
    assert paging.page_events(behind_events=10_000) == 100
    fixed = Paging(live_events=100)  # no catch-up size: every page a live batch's
    fixed.applied(100)
    assert fixed.page_events(behind_events=10_000) == 100


class Interrupted:
    """A projection whose ``apply`` stops at one batch, after its changes, before the commit."""

    def __init__(self, module, at_batch: int, hang: bool) -> None:
        self.module, self.at_batch, self.hang = module, at_batch, hang
        self.NAME, self.TABLES, self.EVENT_TYPES, self.ddl = module.NAME, module.TABLES, module.EVENT_TYPES, module.ddl
        self.batches = 0
        self.reached = asyncio.Event()

    async def apply(self, conn, envelopes, target) -> None:
        self.batches += 1
        await self.module.apply(conn, envelopes, target)
        if self.batches == self.at_batch:
            self.reached.set()
            if self.hang:
                await asyncio.Event().wait()  # until the process is killed
            raise RuntimeError("injected failure inside the batch's transaction")


async def eventually(check, timeout_s: float = 15.0):
    """Poll ``check`` (async, returns truthy when done) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not (result := await check()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
    return result


async def checkpoint(pool, name: str) -> int:
    return await pool.fetchval("SELECT position FROM projection_checkpoints WHERE name = $1", name)


async def state_of(pool, name: str) -> str:
    return await pool.fetchval("SELECT state FROM projection_checkpoints WHERE name = $1", name)


async def stop(*tasks: asyncio.Task) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
async def shop(pool):
    shop = Shop(pool)
    await a_little_history(shop)
    await ensure_tables(pool, PROGRAMME)
    return shop


@pytest.fixture
def connect(database_url):
    return lambda: asyncpg.connect(database_url)


async def assert_same_as_a_rebuild_and_the_replay(pool, shop: Shop) -> None:
    await project_all(pool)
    projected = await all_rows(pool)
    await rebuild_all(pool)
    assert await all_rows(pool) == projected
    report = await replay(pool, PROGRAMME, shop.clock())
    assert report.ok, "\n".join(report.mismatches)


# -- exactly once ------------------------------------------------------------------------------


async def test_a_projector_killed_inside_a_batch_and_restarted_applies_nothing_twice(pool, shop, connect):
    head = await shop.head()
    hanging = Interrupted(points, at_batch=3, hang=True)
    first = asyncio.create_task(Projector(hanging, connect, PROGRAMME, batch_size=3).run())
    await asyncio.wait_for(hanging.reached.wait(), 10)
    committed = await checkpoint(pool, "points")
    assert 0 < committed < head  # two batches committed; the third is inside its transaction

    await stop(first)  # killed: its connection, its transaction and its lease go
    assert await checkpoint(pool, "points") == committed
    lines = await pool.fetchval("SELECT count(*) FROM ledger_lines")

    second = asyncio.create_task(Projector(points, connect, PROGRAMME, batch_size=3).run())
    await eventually(lambda: _reached(pool, "points", head))
    await stop(second)
    assert await pool.fetchval("SELECT count(*) FROM ledger_lines") > lines
    await assert_same_as_a_rebuild_and_the_replay(pool, shop)


async def _reached(pool, name: str, position: int) -> bool:
    return await checkpoint(pool, name) >= position


async def test_a_failing_batch_is_rolled_back_marked_failed_and_retried(pool, shop, connect):
    head = await shop.head()
    failing = Interrupted(members, at_batch=2, hang=False)
    task = asyncio.create_task(Projector(failing, connect, PROGRAMME, batch_size=4).run())
    await eventually(lambda: _has_state(pool, "members", "failed"))
    await eventually(lambda: _reached(pool, "members", head))
    await eventually(lambda: _has_state(pool, "members", "live"))
    await stop(task)
    assert failing.batches > 2  # the failed batch was read again and applied once
    await assert_same_as_a_rebuild_and_the_replay(pool, shop)


async def _has_state(pool, name: str, state: str) -> bool:
    return await state_of(pool, name) == state


async def test_two_appliers_racing_on_one_projection_apply_each_batch_once(pool, shop):
    """Even without the lease, the locked checkpoint row keeps batches from being applied twice."""
    async with pool.acquire() as one, pool.acquire() as other:
        await asyncio.gather(
            catch_up(one, points, live(PROGRAMME), batch_size=2),
            catch_up(other, points, live(PROGRAMME), batch_size=3),
        )
    await assert_same_as_a_rebuild_and_the_replay(pool, shop)


async def test_a_row_an_event_creates_that_exists_already_fails_the_batch_and_changes_nothing(pool, shop):
    """Rows that events create are inserted, not upserted: applying a creation twice cannot pass silently."""
    await project_all(pool)
    before = await all_rows(pool)
    await pool.execute("UPDATE projection_checkpoints SET position = 0 WHERE name = 'coupons'")  # a lost checkpoint
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.UniqueViolationError):
            await catch_up(conn, coupons, live(PROGRAMME))
    assert await checkpoint(pool, "coupons") == 0
    assert await all_rows(pool) == before


async def test_one_projector_per_projection_holds_the_lease_and_a_standby_takes_over(pool, shop, connect, monkeypatch):
    monkeypatch.setattr(runtime, "LEASE_RETRY_S", 0.05)
    active, standby = Projector(coupons, connect, PROGRAMME), Projector(coupons, connect, PROGRAMME)
    first = asyncio.create_task(active.run())
    await eventually(lambda: _true(active.leading))
    second = asyncio.create_task(standby.run())
    await asyncio.sleep(0.3)
    assert active.leading and not standby.leading

    await stop(first)  # the active process dies
    await eventually(lambda: _true(standby.leading))
    await shop.enrol("m9")  # four welcome coupons for the standby to project
    await eventually(lambda: _coupons_of(pool, "m9"))
    await stop(second)


async def _true(value: bool) -> bool:
    return value


async def _coupons_of(pool, member_id: str) -> bool:
    return await pool.fetchval("SELECT count(*) FROM member_coupons WHERE stream_id = $1", member_id) == 4


# -- rebuilds ------------------------------------------------------------------------------------


async def test_a_rebuild_runs_beside_the_live_tables_and_swaps_them_without_a_wrong_answer(pool, shop, connect):
    service = ProjectionService(pool, PROGRAMME, shop.clock)
    projectors = ProjectionRuntime(connect, service, batch_size=2)
    await projectors.start()
    try:
        head = await shop.head()
        for name in runtime.PROJECTIONS:
            await eventually(lambda: _reached(pool, name, head))
        before = await all_rows(pool)
        trail = await points.ledger_page(pool, "m1", 0, 1000)
        for _rebuild in range(2):  # twice: the first swap must leave the names free for the next
            await request_rebuild(pool, "points")
            assert await state_of(pool, "points") == "rebuilding"
            while await state_of(pool, "points") == "rebuilding":
                assert await points.ledger_page(pool, "m1", 0, 1000) == trail  # reads use the live tables
            assert await state_of(pool, "points") == "live"
        assert await all_rows(pool) == before
        assert await pool.fetchval("SELECT count(*) FROM projection_checkpoints WHERE name LIKE '%shadow'") == 0
    finally:
        await projectors.stop()


async def test_a_rebuild_requested_before_a_restart_resumes_from_its_own_checkpoint(pool, shop):
    await project_all(pool)
    before = await all_rows(pool)
    await request_rebuild(pool, "liability")
    async with pool.acquire() as conn:
        assert await runtime.rebuild_step(conn, liability, PROGRAMME, batch_size=2) == "building"
        assert await checkpoint(pool, "liability__shadow") > 0  # then the process stops
        while await runtime.rebuild_step(conn, liability, PROGRAMME, batch_size=2) != "swapped":
            pass  # a new process goes on from the shadow's checkpoint
    assert await all_rows(pool) == before


# -- the read models -------------------------------------------------------------------------------


async def test_the_trail_shows_each_bucket_movement_and_its_running_balance_ends_at_available_plus_pending(pool):
    shop = Shop(pool)
    await shop.enrol("m1")
    await shop.purchase("m1", "p1", 100_000, days_ago=20)  # 100 points, available
    await shop.redeem("m1", "r1", 30)
    returned = await shop.ret("m1", "x1", "p1", 100_000)  # claws 100: 70 left in p:p1, 30 owed
    await shop.purchase("m1", "p2", 50_000)  # 50 points: 30 pay the debt, 20 into p:p2
    shop.clock.advance(days=400)
    await shop.job("expire")
    await project_all(pool)

    lines = await points.ledger_page(pool, "m1", 0, 100)
    assert [(l["kind"], l["points"], l["bucket_id"], l["ref"]) for l in lines] == [
        ("earn", 100, "p:p1", "p1"),
        ("redeem", -30, "p:p1", "r1"),
        ("clawback", -70, "p:p1", "x1"),
        ("clawback", -30, None, "x1"),  # the owed part
        ("earn", 20, "p:p2", "p2"),
        ("earn", 30, None, "p2"),  # pays the debt off
        ("expire", -20, "p:p2", "p2"),
    ]
    assert returned.status == 201 and b'"debt":30' in returned.body
    running = 0
    for line in lines:
        running += line["points"]
        assert line["running_balance"] == running
    now_balance = balance(await shop.ledger.load("m1"), shop.clock())
    assert lines[-1]["running_balance"] == now_balance.available + now_balance.pending == 0


async def test_a_late_burn_of_points_already_recorded_as_expired_takes_the_expiry_back_in_the_trail(pool):
    shop = Shop(pool)
    await shop.enrol("m1")
    await shop.purchase("m1", "p1", 100_000, days_ago=380)  # a migrated purchase: expired 15 days ago
    await shop.job("expire")
    assert (await shop.redeem("m1", "r1", 30, days_ago=20)).status == 201  # a till syncing a redemption late
    await project_all(pool)
    lines = await points.ledger_page(pool, "m1", 0, 100)
    assert [(l["kind"], l["points"], l["running_balance"]) for l in lines] == [
        ("earn", 100, 100), ("expire", -100, 0), ("redeem", -30, -30), ("expire", 30, 0),
    ]
    now_balance = balance(await shop.ledger.load("m1"), shop.clock())
    assert lines[-1]["running_balance"] == now_balance.available + now_balance.pending
    assert now_balance.lifetime_expired == 70


async def test_liability_as_of_a_past_time_is_the_same_before_and_after_later_events(pool):
    shop = Shop(pool)
    await shop.enrol("m1")
    await shop.purchase("m1", "p1", 300_000, days_ago=9)  # a Saturday: 300 points; silver from here
    await shop.redeem("m1", "r1", 100)
    past = shop.clock()
    await project_all(pool)
    before = await liability.liability(pool, past, PROGRAMME)
    assert (before["earned"], before["redeemed"], before["outstanding"]) == (300, 100, 200)

    shop.clock.advance(days=40)
    await shop.purchase("m1", "p2", 500_000)  # silver: 600 points
    await shop.reverse("m1", "r1")
    await shop.ret("m1", "x1", "p1", 300_000)
    shop.clock.advance(days=400)
    await shop.job("expire")
    await project_all(pool)
    assert await liability.liability(pool, past, PROGRAMME) == before
    now = await liability.liability(pool, shop.clock(), PROGRAMME)
    assert (now["earned"], now["clawed"], now["redeemed"], now["expired"], now["outstanding"]) == (900, 300, 0, 600, 0)
    # p:p1 was emptied by the return before its expiry month, so that month has nothing to show.
    assert [m["month"] for m in now["by_month"]] == ["2024-12", "2025-01", "2025-02", "2026-02"]
    for figure in liability.FIGURES:
        assert sum(month[figure] for month in now["by_month"]) == now[figure]
    # Each month's outstanding is the liability at its end (the console charts it).
    for month in now["by_month"][:-1]:
        mid_month = datetime.fromisoformat(f"{month['month']}-15T00:00:00+00:00")
        _label, _starts_at, ends_at = liability.month_of(mid_month, PROGRAMME.zone)
        at_end = await liability.liability(pool, ends_at - timedelta(microseconds=1), PROGRAMME)
        assert month["outstanding"] == at_end["outstanding"], month
    assert now["by_month"][-1]["outstanding"] == now["outstanding"]
    report = await replay(pool, PROGRAMME, past)
    assert report.ok, report.mismatches


async def test_a_late_event_changes_the_past_liability_as_it_should(pool):
    shop = Shop(pool)
    await shop.enrol("m1")
    past = shop.clock() - timedelta(days=1)
    await project_all(pool)
    assert (await liability.liability(pool, past, PROGRAMME))["earned"] == 0
    await shop.purchase("m1", "till-sync", 100_000, days_ago=2)  # an offline till syncs late
    await project_all(pool)
    assert (await liability.liability(pool, past, PROGRAMME))["earned"] == 100


async def test_segments_follow_lifecycle_and_rfm_from_stored_dates_at_read_time(pool):
    shop = Shop(pool)
    for member_id in ("a", "b", "c"):
        await shop.enrol(member_id)
    for n in range(4):
        await shop.purchase("b", f"b{n}", 10_000, days_ago=n)
    await shop.purchase("c", "c1", 20_000, days_ago=1)
    await shop.ret("c", "x1", "c1", 5_000)
    await project_all(pool)

    async def segments(at):
        found = {}
        for lifecycle in views.LIFECYCLES:
            for row in await members.segment_page(pool, lifecycle, "", 10, at, PROGRAMME):
                found[row["member_id"]] = (lifecycle, row["recency_days"], row["orders_365d"], row["spend_365d_cents"])
        return found

    now = shop.clock()
    assert await segments(now) == {
        "a": ("prospect", None, 0, 0), "b": ("loyal", 0, 4, 40_000), "c": ("active", 1, 1, 15_000),
    }
    later = now + timedelta(days=181)  # no event: only the clock moved
    assert await segments(later) == {
        "a": ("prospect", None, 0, 0), "b": ("dormant", 181, 4, 40_000), "c": ("dormant", 182, 1, 15_000),
    }
    page = await members.segment_page(pool, "dormant", "b", 10, later, PROGRAMME)
    assert [row["member_id"] for row in page] == ["c"]


# -- operations -------------------------------------------------------------------------------------


async def test_status_reports_lag_in_events_and_seconds_and_feeds_the_gauges(pool, shop):
    head = await shop.head()
    shop.clock.advance(seconds=90)  # the first event was recorded 400 days and 90 s ago
    listed = {s["name"]: s for s in await statuses(pool, shop.clock)}
    assert listed["points"]["lag_events"] == head and listed["points"]["state"] == "live"
    assert listed["points"]["lag_seconds"] == pytest.approx((400 * 86400) + 90)
    await project_all(pool)
    registry = CollectorRegistry()
    service = ProjectionService(pool, PROGRAMME, shop.clock, metrics=ProjectionMetrics(registry))
    await request_rebuild(pool, "coupons")
    listed = {s["name"]: s for s in await service.statuses()}
    assert listed["points"]["lag_events"] == 0 and listed["points"]["lag_seconds"] == 0
    assert listed["coupons"]["state"] == "rebuilding" and listed["coupons"]["rebuild"]["position"] == 0
    text = generate_latest(registry).decode()
    assert 'loyalty_projection_lag_events{projection="points"} 0.0' in text
    assert 'loyalty_projection_rebuilding{projection="coupons"} 1.0' in text


# -- the command line ---------------------------------------------------------------------------------


async def test_loyalty_rebuild_swaps_in_a_rebuilt_projection(pool, shop, database_url):
    from tests.test_replay import loyalty

    await project_all(pool)
    before = await all_rows(pool)
    code, out, err = await loyalty(database_url, "rebuild", "points")
    assert code == 0, err
    assert json.loads(out)["state"] == "live" and "rebuild points" in err
    assert await all_rows(pool) == before


async def test_the_loyalty_project_worker_catches_up_and_stops_on_sigterm(pool, shop, database_url):
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys, service; sys.exit(service.main())", "project",
        env={**os.environ, "DATABASE_URL": database_url, "LOYALTY_LOG_LEVEL": "WARNING"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        head = await shop.head()
        for name in runtime.PROJECTIONS:
            await eventually(lambda: _reached(pool, name, head), timeout_s=30)
        await shop.purchase("m2", "after-start", 100_000)  # woken by the notification
        await eventually(lambda: _reached(pool, "points", head + 2), timeout_s=10)
    finally:
        worker.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(worker.communicate(), 30)
    assert worker.returncode == 0, err.decode()
    report = await replay(pool, PROGRAMME, shop.clock())
    assert report.ok, report.mismatches


async def test_a_rebuild_under_steady_appends_completes_and_serves_no_wrong_answer(pool, shop, connect):
    service = ProjectionService(pool, PROGRAMME, shop.clock)
    projectors = ProjectionRuntime(connect, service, names=["points"], batch_size=5)
    await projectors.start()
    writing = True

    async def write() -> None:
        n = 0
        while writing:
            n += 1
            await shop.purchase("m2", f"load-{n}", 10_000 + n, days_ago=1)

    writer = asyncio.create_task(write())
    try:
        await asyncio.sleep(0.2)
        seen = []
        await request_rebuild(pool, "points")
        deadline = time.monotonic() + 20
        while await state_of(pool, "points") == "rebuilding":
            assert time.monotonic() < deadline, "the rebuild never caught up with the appends"
            seen.append(await points.ledger_page(pool, "m2", 0, 10_000))
        writing = False
        await writer
        await eventually(lambda: _caught_up(pool, shop, "points"))
    finally:
        writing = False
        await stop(writer)
        await projectors.stop()
    final = await points.ledger_page(pool, "m2", 0, 10_000)
    assert seen and all(page == final[: len(page)] for page in seen)  # every answer a true prefix of the trail
    await assert_same_as_a_rebuild_and_the_replay(pool, shop)


async def _caught_up(pool, shop: Shop, name: str) -> bool:
    return await checkpoint(pool, name) == await shop.head()

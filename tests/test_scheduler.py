"""The time jobs: one process of many runs them (a lease), and one member's failure stops no job."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import asyncpg
import pytest

from events import catalogue as ev
from ledger import commands as cmd
from ledger.application import Ledger
from ledger.clock import ManualClock
from ledger.jobs import Scheduler, run_job
from ledger.programme import Programme
from ledger.store import Append, EventStore, NewEvent

pytestmark = pytest.mark.asyncio

# 2026-03-02 12:00 in Shanghai: March, the members' birthday month.
NOW = datetime(2026, 3, 2, 4, 0, tzinfo=timezone.utc)
MEMBERS = 20  # more than one chunk of members in flight (16)


async def enrol_birthday_members(ledger: Ledger) -> None:
    for n in range(MEMBERS):
        outcome = await ledger.execute("enrol", f"m{n:02}", cmd.Enrol(member_id=f"m{n:02}", birthday="03-15"))
        assert outcome.status == 201, outcome


async def test_a_job_goes_on_past_a_members_failure_and_reports_it(pool):
    """A stream whose job command fails (here one with no enrolment, sorted first) is reported; every
    other member still gets its birthday coupon."""
    clock = ManualClock(NOW)
    ledger = Ledger(EventStore(pool, clock), Programme(), clock)
    await ledger.store.append(Append("a-ghost", 0, [NewEvent(NOW, ev.PurchaseRecorded(
        purchase_id="p1", store_id="s1", amount_cents=100))]))
    await enrol_birthday_members(ledger)
    report = await run_job(ledger, "birthdays", NOW)
    assert (report["appended"], report["failed"]) == (MEMBERS, 1)
    assert [f["member_id"] for f in report["failures"]] == ["a-ghost"]
    assert "member_not_found" in report["failures"][0]["error"]
    again = await run_job(ledger, "birthdays", NOW)
    assert (again["appended"], again["failed"]) == (0, 1)


class Cycles:
    """A sleep that moves the shared manual clock instead of waiting (and yields, so others run)."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock

    async def __call__(self, seconds: float) -> None:
        self.clock.advance(seconds=min(seconds, 3600))
        await asyncio.sleep(0.01)


async def test_one_process_of_many_runs_the_time_jobs_and_a_standby_takes_over(pool, database_url):
    clock = ManualClock(NOW)
    ledgers = [Ledger(EventStore(pool, clock), Programme(), clock) for _ in range(3)]
    await enrol_birthday_members(ledgers[0])
    schedulers = [Scheduler(ledger, lambda: asyncpg.connect(database_url), sleep=Cycles(clock)) for ledger in ledgers]
    tasks = [asyncio.create_task(scheduler.run()) for scheduler in schedulers]
    try:
        async def until(condition) -> None:
            for _ in range(3000):
                if condition():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("not within 30 s")

        await until(lambda: sum(len(s.reports) for s in schedulers) >= 9)
        runners = [s for s in schedulers if s.reports]
        assert len(runners) == 1 and runners[0].leading  # three jobs a day, run by one process only
        assert sum(1 for s in schedulers if s.leading) == 1
        assert sum(r["appended"] for r in runners[0].reports) == MEMBERS  # one birthday coupon each
        leader = schedulers.index(runners[0])

        tasks[leader].cancel()  # the process dies: its lease goes with its session
        await until(lambda: any(s.reports for i, s in enumerate(schedulers) if i != leader))
        assert sum(1 for i, s in enumerate(schedulers) if i != leader and s.reports) == 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

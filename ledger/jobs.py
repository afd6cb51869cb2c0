"""The time jobs (expire, tiers, birthdays): one command per member at ``as_of``; the daily scheduler.

Each member's job command is decided like any other command, so a second
run at the same ``as_of``, or a run from another process at the same time,
finds the natural keys already used (one points_expired per bucket, one
birthday coupon per year, a tier already moved) and appends nothing. A
member whose command fails is reported and the job goes on to the others.

Every ``loyalty serve`` starts a ``Scheduler``; one of them at a time holds
its lease (a session advisory lock, as the projectors' leases are) and runs
the jobs, so N processes run each job once a day, not N times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from datetime import datetime, timedelta, tzinfo
from typing import Any, Awaitable, Callable

import asyncpg
import msgspec

from ledger import commands as cmd

log = logging.getLogger("loyalty.jobs")

JOBS: dict[str, type[cmd.Command]] = {
    "expire": cmd.ExpireDue,
    "tiers": cmd.ReviewTier,
    "birthdays": cmd.IssueBirthdayCoupon,
}
MEMBERS_PER_PAGE = 1000
MEMBERS_IN_FLIGHT = 16
FAILURES_LISTED_MAX = 20  # a report names this many failed members; ``failed`` counts them all
# The scheduler's lease: pg_try_advisory_lock(namespace, key). The namespace
# is "LJ" (the projectors' is "LP"), so the two never collide.
SCHEDULER_LEASE = (0x4C4A, 1)
LEASE_RETRY_S = 2.0  # how soon a standby takes over a dead scheduler's lease
REPORTS_KEPT = 30
RUN_AT_LOCAL = dict(hour=0, minute=5)  # just after midnight in the programme's timezone

Sleep = Callable[[float], Awaitable[None]]


async def run_job(ledger, name: str, as_of: datetime, actor: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Run job ``name`` for every member; returns ``{appended, position, failed, failures}``.

    ``position`` is the head after it; ``failures`` names the first
    ``FAILURES_LISTED_MAX`` members whose command failed (a refusal or an
    error), which do not stop the job. A dry run (CONTRACT §6.5) counts what
    it would append, appends nothing, and answers position null.
    """
    command = JOBS[name](as_of=as_of)
    await ledger.refresh_rules()  # a job is decided by the version in force at its as_of, as recorded now
    appended, failed, failures, after = 0, 0, [], ""
    while member_ids := await ledger.store.stream_ids(after, MEMBERS_PER_PAGE):
        for start in range(0, len(member_ids), MEMBERS_IN_FLIGHT):
            chunk = member_ids[start : start + MEMBERS_IN_FLIGHT]
            outcomes = await asyncio.gather(
                *(ledger.execute(f"job:{name}", member_id, command, actor=actor, dry_run=dry_run)
                  for member_id in chunk),
                return_exceptions=True,
            )
            for member_id, outcome in zip(chunk, outcomes):
                if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                    raise outcome  # cancelled: the job stops
                error = _failure(outcome)
                if error is None:
                    appended += msgspec.json.decode(outcome.body)["appended"]
                    continue
                failed += 1
                if len(failures) < FAILURES_LISTED_MAX:
                    failures.append({"member_id": member_id, "error": error})
        after = member_ids[-1]
    if failed:
        log.error("job %s at %s: %d member(s) failed, first %s", name, as_of, failed, failures[0])
    if dry_run:
        return {"job": name, "as_of": as_of, "appended": appended, "position": None, "failed": failed,
                "failures": failures, "dry_run": True}
    position, _hash = await ledger.store.head()
    return {"job": name, "as_of": as_of, "appended": appended, "position": position, "failed": failed,
            "failures": failures}


def _failure(outcome: Any) -> str | None:
    """What went wrong with one member's job command, or None when it succeeded."""
    if isinstance(outcome, Exception):
        return f"{type(outcome).__name__}: {outcome}"[:500]
    if outcome.status >= 400:
        return outcome.body.decode(errors="replace")[:500]
    return None


def seconds_until_next_run(now: datetime, zone: tzinfo) -> float:
    """From ``now`` to the next 00:05 in ``zone`` (at least 1 s)."""
    local = now.astimezone(zone)
    next_run = (local + timedelta(days=1)).replace(second=0, microsecond=0, **RUN_AT_LOCAL)
    return max((next_run - local).total_seconds(), 1.0)


class Scheduler:
    """Runs every job once a day while this process holds the scheduler's lease; stands by otherwise.

    ``connect`` opens the lease's own connection (the lease lives exactly as
    long as its session); ``sleep`` is injectable so tests move the clock
    instead of waiting a day.
    """

    def __init__(self, ledger, connect: Callable[[], Awaitable[asyncpg.Connection]],
                 sleep: Sleep = asyncio.sleep) -> None:
        self.ledger = ledger
        self.connect = connect
        self.sleep = sleep
        self.leading = False
        self.reports: deque[dict[str, Any]] = deque(maxlen=REPORTS_KEPT)

    async def run(self) -> None:
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self.connect()
                while not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", *SCHEDULER_LEASE):
                    await self.sleep(LEASE_RETRY_S)  # standing by, on the same connection
                self.leading = True
                log.info("this process runs the time jobs (it holds the scheduler's lease)")
                while True:
                    await self.sleep(seconds_until_next_run(self.ledger.clock(), self.ledger.programme.zone))
                    await conn.fetchval("SELECT 1")  # the lease's session is still there, so the lease is ours
                    await self.run_jobs()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the scheduler lost its lease's connection; trying again in %.0f s", LEASE_RETRY_S)
                await self.sleep(LEASE_RETRY_S)
            finally:
                self.leading = False
                if conn is not None:
                    await _close(conn)  # releases the lease with the session

    async def run_jobs(self) -> None:
        """Every job at the clock's now; one job's failure does not keep the others from running."""
        for name in JOBS:
            try:
                report = await run_job(self.ledger, name, self.ledger.clock(), actor=f"scheduler:{name}")
            except Exception:
                log.exception("scheduled job %s failed; it runs again tomorrow", name)
                continue
            self.reports.append(report)
            log.info("scheduled job %s appended %d events (%d members failed)", name, report["appended"],
                     report["failed"])


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), 5)
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        with contextlib.suppress(Exception):
            conn.terminate()

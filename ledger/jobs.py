"""The time jobs (expire, tiers, birthdays): one command per member at ``as_of``.

Each member's job command is decided like any other command, so a second
run at the same ``as_of``, or a run from another process at the same time,
finds the natural keys already used (one points_expired per bucket, one
birthday coupon per year, a tier already moved) and appends nothing.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import msgspec

from ledger import commands as cmd

JOBS: dict[str, type[cmd.Command]] = {
    "expire": cmd.ExpireDue,
    "tiers": cmd.ReviewTier,
    "birthdays": cmd.IssueBirthdayCoupon,
}
MEMBERS_PER_PAGE = 1000
MEMBERS_IN_FLIGHT = 16


async def run_job(ledger, name: str, as_of: datetime, actor: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Run job ``name`` for every member; returns ``{appended, position}`` (the head after it). A dry run
    (CONTRACT §6.5) counts what it would append, appends nothing, and answers position null."""
    command = JOBS[name](as_of=as_of)
    await ledger.refresh_rules()  # a job is decided by the version in force at its as_of, as recorded now
    appended, after = 0, ""
    while member_ids := await ledger.store.stream_ids(after, MEMBERS_PER_PAGE):
        for start in range(0, len(member_ids), MEMBERS_IN_FLIGHT):
            chunk = member_ids[start : start + MEMBERS_IN_FLIGHT]
            outcomes = await asyncio.gather(
                *(ledger.execute(f"job:{name}", member_id, command, actor=actor, dry_run=dry_run)
                  for member_id in chunk)
            )
            for outcome in outcomes:
                if outcome.status >= 400:
                    raise RuntimeError(f"job {name} failed: {outcome.body.decode()}")
                appended += msgspec.json.decode(outcome.body)["appended"]
        after = member_ids[-1]
    if dry_run:
        return {"job": name, "as_of": as_of, "appended": appended, "position": None, "dry_run": True}
    position, _hash = await ledger.store.head()
    return {"job": name, "as_of": as_of, "appended": appended, "position": position}

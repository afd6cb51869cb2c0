"""Growth tasks (CONTRACT §6.3): which activity a command names, its caps, its events.

Pure helpers of ``decide``'s activity rule. An activity earns its programme
points (no tier or member-day multiplier) into a bucket of its own,
``t:<activity_id>``, available at once, and its growth counts in rolling
growth like a purchase's. Caps count the member's recorded activities of
the type: ``daily_cap`` those on the same programme-local day of
``occurred_at``, ``total_cap`` all of them; 0 means no cap.
"""

from __future__ import annotations

from bisect import bisect_left
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

from events import catalogue as ev
from ledger import commands as cmd
from ledger.errors import Refusal
from ledger.programme import Activity, Programme
from ledger.state import MemberState


def rule_for(programme: Programme, activity_type: str) -> Activity:
    """The programme's entry for the type, or 422 ``unknown_activity``."""
    rule = programme.activity(activity_type)
    if rule is None:
        listed = ", ".join(a.type for a in programme.activities) or "none"
        raise Refusal(422, "unknown_activity", f"the programme lists no activity {activity_type!r} (it lists: {listed})",
                      field="type")
    return rule


def day_bounds(day: date, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The instants (in UTC, which compares fastest with the UTC times of the log) a programme-local
    day starts and the next one starts."""
    return (datetime.combine(day, time(), zone).astimezone(timezone.utc),
            datetime.combine(day + timedelta(days=1), time(), zone).astimezone(timezone.utc))


def refuse_over_cap(state: MemberState, rule: Activity, at: datetime, zone: ZoneInfo) -> None:
    """409 ``activity_cap_reached`` when one more of this type would pass a cap."""
    done = state.activity_times.get(rule.type, [])
    if rule.total_cap and len(done) >= rule.total_cap:
        raise Refusal(409, "activity_cap_reached", f"{rule.type} is capped at {rule.total_cap} in all",
                      cap="total_cap", limit=rule.total_cap)
    if not rule.daily_cap:
        return
    day = at.astimezone(zone).date()
    starts, ends = day_bounds(day, zone)
    if bisect_left(done, ends) - bisect_left(done, starts) >= rule.daily_cap:
        raise Refusal(409, "activity_cap_reached", f"{rule.type} is capped at {rule.daily_cap} a day ({day})",
                      cap="daily_cap", limit=rule.daily_cap)


def recorded(
    command: cmd.RecordActivity, rule: Activity, tier_name: str, debt_paid: int, bucket: ev.NewBucket | None
) -> list[ev.Event]:
    """``activity_recorded``, then its ``points_earned`` when it earns any."""
    events: list[ev.Event] = [
        ev.ActivityRecorded(
            activity_id=command.activity_id, type=rule.type, points=rule.points, growth=rule.growth, ref=command.ref
        )
    ]
    if rule.points > 0:
        events.append(
            ev.PointsEarned(
                purchase_id=None,
                activity_id=command.activity_id,
                points=rule.points,
                growth=0,  # the activity's growth is on activity_recorded
                tier=tier_name,
                tier_pct=100,
                day_pct=100,
                debt_paid=debt_paid,
                bucket=bucket,
            )
        )
    return events

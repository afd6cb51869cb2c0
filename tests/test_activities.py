"""CONTRACT §6.3 growth tasks, by worked example: the pure domain, then the projections over PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from events import catalogue as ev
from ledger import commands as cmd
from ledger.database import run_blocking
from ledger.decide import decide
from ledger.errors import DuplicateCommand
from ledger.activities import day_bounds
from ledger.programme import Activity, Programme
from ledger.views import rolling_growth
from projections import liability, members, points
from cli.replay import replay
from tests.test_projections_support import PROGRAMME, Shop, fresh_database, project_all
from tests.test_rules_examples import DAY, TUESDAY, Member

# 23:30 on Tuesday in Shanghai, and 00:30 on Wednesday there: one hour apart, two programme-local days.
LATE_TUESDAY = datetime(2025, 1, 7, 15, 30, tzinfo=timezone.utc)
EARLY_WEDNESDAY = LATE_TUESDAY + timedelta(hours=1)


def activity(activity_id: str, activity_type: str, at: datetime | None = None, ref: str | None = None):
    return cmd.RecordActivity(activity_id=activity_id, type=activity_type, ref=ref, occurred_at=at)


def test_the_default_table_earns_its_points_at_once_in_a_bucket_of_its_own():
    m = Member()
    events = m.run(activity("t1", "review", ref="order-9"))
    recorded, earned = events
    assert recorded == ev.ActivityRecorded(activity_id="t1", type="review", points=5, growth=20, ref="order-9")
    assert earned.activity_id == "t1" and earned.purchase_id is None and earned.points == 5
    assert earned.bucket == ev.NewBucket("t:t1", 5, TUESDAY, TUESDAY + timedelta(days=365))
    b = m.balance()
    assert (b.available, b.pending, b.lifetime_earned) == (5, 0, 5)
    assert rolling_growth(m.state, TUESDAY, m.programme) == 20
    assert [(a.type, a.points, a.growth, a.daily_cap, a.total_cap) for a in Programme().activities] == [
        ("check_in", 1, 10, 1, 0), ("review", 5, 20, 3, 0), ("profile_completed", 20, 50, 0, 1),
    ]


def test_no_tier_or_member_day_multiplier_applies_to_an_activity():
    m = Member(Programme(tiers=Programme().tiers[:1]))
    friday = TUESDAY + 3 * DAY  # member day, x200
    m.now = friday
    earned = m.one(activity("t1", "profile_completed"), ev.PointsEarned)
    assert (earned.points, earned.tier_pct, earned.day_pct) == (20, 100, 100)


def test_daily_caps_count_by_programme_local_day_and_total_caps_in_all():
    m = Member(now=EARLY_WEDNESDAY)
    m.run(activity("t1", "check_in", at=LATE_TUESDAY))
    refusal = m.refused(activity("t2", "check_in", at=LATE_TUESDAY - timedelta(hours=10)), 409, "activity_cap_reached")
    assert refusal.extra["cap"] == "daily_cap"
    m.run(activity("t3", "check_in"))  # the next local day, an hour later in UTC
    m.run(activity("t4", "profile_completed"))
    m.now += 2 * DAY
    refusal = m.refused(activity("t5", "profile_completed"), 409, "activity_cap_reached")
    assert refusal.extra["cap"] == "total_cap"
    for n in range(3):
        m.run(activity(f"r{n}", "review"))
    m.refused(activity("r3", "review"), 409, "activity_cap_reached")


# Zones whose days are not 24 hours: clocks changing at or near midnight, and a day skipped entirely.
ZONES = ["Asia/Shanghai", "America/Santiago", "America/Havana", "Europe/London", "Pacific/Apia", "America/Sao_Paulo"]


@given(
    zone_name=st.sampled_from(ZONES),
    hours=st.integers(min_value=0, max_value=24 * 365 * 15),
    minutes=st.integers(min_value=0, max_value=59),
)
def test_a_programme_local_day_is_the_instants_between_its_bounds(zone_name, hours, minutes):
    """The daily cap counts the instants in ``day_bounds``: exactly those whose local date is that day."""
    zone = ZoneInfo(zone_name)
    at = datetime(2010, 1, 1, tzinfo=timezone.utc) + timedelta(hours=hours, minutes=minutes)
    day = at.astimezone(zone).date()
    starts, ends = day_bounds(day, zone)
    assert starts <= at < ends
    assert (starts - timedelta(microseconds=1)).astimezone(zone).date() < day
    assert ends.astimezone(zone).date() > day


def test_an_unknown_type_is_422_and_a_reused_activity_id_is_a_duplicate():
    m = Member()
    m.refused(activity("t1", "share_to_moments"), 422, "unknown_activity")
    m.refused(activity("t1", "Check-In!"), 422, "unknown_activity")
    m.run(activity("t1", "check_in"))
    with pytest.raises(DuplicateCommand) as duplicate:
        decide(m.state, activity("t1", "review"), m.programme, m.now)
    assert duplicate.value.natural_key == "activity:t1"


def test_activity_growth_upgrades_the_tier_and_no_return_undoes_it():
    table = [Activity("live_event", 0, 1500, 0, 0)]
    m = Member(Programme(activities=table))
    m.buy("p1", 10_000)  # 100 growth, so the second event reaches silver (3000)
    m.run(activity("t1", "live_event"))  # 1600 growth: still regular
    events = m.run(activity("t2", "live_event"))
    changed = [e for e in events if isinstance(e, ev.TierChanged)]
    assert [(e.from_tier, e.to_tier, e.reason, e.cause_id) for e in changed] == [("regular", "silver", "upgrade", "t2")]
    assert changed[0].hold_until == TUESDAY + timedelta(days=365)
    assert not [e for e in events if isinstance(e, ev.PointsEarned)], "an activity of 0 points earns nothing"
    m.ret("x1", "p1", 10_000)  # growth falls to 3000: still silver, and the purchase did not cause it
    assert m.tier().tier == "silver"


def test_a_return_of_a_purchase_sharing_the_upgrading_activitys_id_does_not_revert_the_tier():
    m = Member(Programme(activities=[Activity("live_event", 0, 3000, 0, 0)]))
    m.buy("same", 10_000)
    m.run(activity("same", "live_event"))
    assert m.tier().tier == "silver"
    events = m.run(cmd.RecordReturn(return_id="x1", purchase_id="same", amount_cents=10_000))
    assert not [e for e in events if isinstance(e, ev.TierChanged)]


def test_an_activitys_points_pay_debt_first():
    m = Member()
    m.buy("p1", 100_000)  # 100 points, available after 7 days
    m.now = TUESDAY + 8 * DAY
    m.redeem("x0", 100)
    m.ret("r1", "p1", 100_000)  # nothing left to claw: all of it is debt
    assert m.balance().debt == 100
    earned = m.one(activity("t1", "profile_completed"), ev.PointsEarned)
    assert (earned.debt_paid, earned.bucket) == (20, None)
    assert m.balance().debt == 80


def test_the_activity_setting_is_validated_like_the_rest():
    bad = {"activities": [{"type": "Check-In", "points": 1, "growth": 1, "daily_cap": 0, "total_cap": 0}]}
    with pytest.raises(msgspec.ValidationError, match="activities"):
        msgspec.convert(bad, Programme)
    negative = {"activities": [{"type": "check_in", "points": -1, "growth": 1, "daily_cap": 0, "total_cap": 0}]}
    with pytest.raises(msgspec.ValidationError, match="points"):
        msgspec.convert(negative, Programme)
    twice = {"activities": [{"type": "a", "points": 1, "growth": 1, "daily_cap": 0, "total_cap": 0}] * 2}
    with pytest.raises(msgspec.ValidationError, match="once"):
        msgspec.convert(twice, Programme)


def test_activities_are_ledger_lines_of_their_kind_count_in_liability_and_replay(database_server_url, template_database):
    async def check():
        async with fresh_database(database_server_url, template_database) as pool:
            shop = Shop(pool)
            await shop.enrol("m1")
            await shop.purchase("m1", "p1", 25_800)
            answer = await shop.activity("m1", "t1", "review")
            assert answer.status == 201
            assert {k: v for k, v in msgspec.json.decode(answer.body).items() if k in ("points", "growth", "tier")} == {
                "points": 5, "growth": 20, "tier": "regular",
            }
            refused = await shop.activity("m1", "t2", "nope")
            assert refused.status == 422 and b"unknown_activity" in refused.body
            again = await shop.activity("m1", "t1", "review")
            assert again.replayed and again.body == answer.body
            other = await shop.activity("m1", "t1", "check_in")
            assert other.status == 409 and b"duplicate_id" in other.body
            await project_all(pool, PROGRAMME)
            async with pool.acquire() as conn:
                lines = await points.ledger_page(conn, "m1", 0, 100)
                assert [(line["kind"], line["points"], line["bucket_id"], line["ref"]) for line in lines] == [
                    ("earn", 25, "p:p1", "p1"), ("activity", 5, "t:t1", "t1"),
                ]
                totals = await liability.liability(conn, shop.clock(), PROGRAMME)
                assert totals["earned"] == 30 and totals["outstanding"] == 30
                summary = await conn.fetchrow("SELECT lifetime_earned FROM member_summary WHERE stream_id = 'm1'")
                assert summary["lifetime_earned"] == 30
                state = await members.state_as_of(conn, "m1", shop.clock())
                assert rolling_growth(state, shop.clock(), PROGRAMME) == 258 + 20
            report = await replay(pool, PROGRAMME, shop.clock())
            assert report.ok, report.mismatches

    run_blocking(check)

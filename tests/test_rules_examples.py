"""Every worked example and every rule-level error code of CONTRACT §2, on the pure domain.

Each refusal is checked to decide nothing: ``decide`` raises, and the member's
state is exactly what it was (``decide`` never mutates).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from events import catalogue as ev
from ledger import commands as cmd
from ledger.decide import decide
from ledger.errors import DuplicateCommand, Refusal
from ledger.programme import MemberDay, Programme
from ledger.state import Fact, MemberState, evolve, fold
from ledger.views import balance, rolling_growth, tier_view

# A Tuesday, 10:00 in Shanghai.
TUESDAY = datetime(2025, 1, 7, 2, 0, tzinfo=timezone.utc)
FRIDAY = TUESDAY + timedelta(days=3)
DAY = timedelta(days=1)
LATER = TUESDAY + 14 * DAY  # two weeks on, a Tuesday again: points bought on TUESDAY are available


class Member:
    """One member on the pure domain: decide, then evolve what was decided."""

    def __init__(self, programme: Programme | None = None, now: datetime = TUESDAY, member_id: str = "m1", **enrol):
        self.programme = programme or Programme()
        self.now = now
        self.state = MemberState()
        self.facts: list[Fact] = []
        self.run(cmd.Enrol(member_id=member_id, **enrol))

    def run(self, command: cmd.Command) -> list[ev.Event]:
        decided = decide(self.state, command, self.programme, self.now)
        for d in decided:
            fact = Fact(d.event, d.occurred_at, self.state.version + 1)
            evolve(self.state, fact)
            self.facts.append(fact)
        return [d.event for d in decided]

    def one(self, command: cmd.Command, kind: type[ev.Event]):
        return next(e for e in self.run(command) if isinstance(e, kind))

    def refused(self, command: cmd.Command, status: int, code: str, reason: str | None = None) -> Refusal:
        """The command is refused with this code and nothing is decided."""
        before = self.state.copy()
        with pytest.raises(Refusal) as refused:
            decide(self.state, command, self.programme, self.now)
        assert (refused.value.status, refused.value.code) == (status, code), refused.value.detail
        if reason is not None:
            assert refused.value.extra.get("reason") == reason
        assert self.state == before, "a refused command changed the member"
        return refused.value

    def buy(self, purchase_id: str, amount_cents: int, at: datetime | None = None) -> ev.PointsEarned:
        command = cmd.RecordPurchase(purchase_id=purchase_id, store_id="s1", amount_cents=amount_cents, occurred_at=at)
        return self.one(command, ev.PointsEarned)

    def ret(self, return_id: str, purchase_id: str, amount_cents: int, at: datetime | None = None) -> ev.PointsClawedBack:
        command = cmd.RecordReturn(return_id=return_id, purchase_id=purchase_id, amount_cents=amount_cents, occurred_at=at)
        return self.one(command, ev.PointsClawedBack)

    def redeem(self, redemption_id: str, points: int) -> ev.PointsRedeemed:
        return self.one(cmd.Redeem(redemption_id=redemption_id, points=points), ev.PointsRedeemed)

    def adjust(self, adjustment_id: str, points: int, at: datetime | None = None) -> ev.PointsAdjusted:
        command = cmd.Adjust(adjustment_id=adjustment_id, points=points, reason="goodwill", occurred_at=at)
        return self.one(command, ev.PointsAdjusted)

    def coupon(self, coupon_id: str, **fields) -> ev.CouponIssued:
        fields = {"template": "T", "value_cents": 1000, "expires_at": self.now + 10 * DAY, **fields}
        return self.one(cmd.IssueCoupon(coupon_id=coupon_id, **fields), ev.CouponIssued)

    def balance(self, at: datetime | None = None):
        at = at or self.now
        return balance(fold(f for f in self.facts if f.occurred_at <= at), at)

    def tier(self, at: datetime | None = None):
        at = at or self.now
        return tier_view(fold(f for f in self.facts if f.occurred_at <= at), at, self.programme)


def conserved(b) -> bool:
    return (
        b.lifetime_earned - b.lifetime_clawed + b.lifetime_adjusted - b.lifetime_redeemed - b.lifetime_expired
        == b.available + b.pending
    )


# -- earning ------------------------------------------------------------------------


def test_regular_member_earns_25_points_and_258_growth_for_258_yuan_on_a_tuesday():
    member = Member()
    earned = member.buy("p1", 25800)
    assert (earned.points, earned.growth, earned.tier, earned.tier_pct, earned.day_pct) == (25, 258, "regular", 100, 100)


def test_silver_member_earns_61_points_for_258_yuan_on_a_friday():
    member = Member()
    upgrading = member.run(cmd.RecordPurchase(purchase_id="p1", store_id="s1", amount_cents=300_000))
    # The upgrading purchase earns at the tier held before it; the next one at silver.
    assert next(e for e in upgrading if isinstance(e, ev.PointsEarned)).points == 300
    assert next(e for e in upgrading if isinstance(e, ev.TierChanged)).to_tier == "silver"
    member.now = FRIDAY
    earned = member.buy("p2", 25800)
    assert (earned.tier, earned.tier_pct, earned.day_pct, earned.points) == ("silver", 120, 200, 61)
    assert 25800 * 120 * 200 // 10**7 == 61


def test_member_day_is_decided_in_the_programme_timezone():
    member = Member(now=FRIDAY + DAY)
    thursday_17_utc = datetime(2025, 1, 9, 17, 0, tzinfo=timezone.utc)  # Friday 01:00 in Shanghai
    friday_17_utc = datetime(2025, 1, 10, 17, 0, tzinfo=timezone.utc)  # Saturday 01:00 in Shanghai
    friday_15_59_utc = datetime(2025, 1, 10, 15, 59, tzinfo=timezone.utc)  # Friday 23:59 in Shanghai
    assert member.buy("p1", 25800, at=thursday_17_utc).day_pct == 200
    assert member.buy("p2", 25800, at=friday_17_utc).day_pct == 100
    assert member.buy("p3", 25800, at=friday_15_59_utc).points == 51


def test_member_day_follows_the_programme_setting():
    programme = Programme(timezone="UTC", member_day=MemberDay("tuesday", 300))
    assert Member(programme).buy("p1", 25800).points == 77


def test_a_late_purchase_earns_at_the_tier_held_when_it_is_decided():
    member = Member(now=FRIDAY)
    member.buy("p1", 300_000)  # silver from now on
    late = member.buy("p2", 25800, at=TUESDAY)
    assert (late.tier, late.day_pct, late.points) == ("silver", 100, 30)


def test_a_purchase_earning_nothing_makes_no_bucket():
    member = Member()
    earned = member.buy("p1", 999)
    assert (earned.points, earned.growth, earned.bucket) == (0, 9, None)


# -- buckets, pending, expiry ---------------------------------------------------------


def test_points_are_pending_for_pending_days_then_available():
    member = Member()
    member.buy("p1", 25800)
    available_at = TUESDAY + 7 * DAY
    just_before = member.balance(available_at - timedelta(seconds=1))
    assert (just_before.available, just_before.pending) == (0, 25)
    at = member.balance(available_at)
    assert (at.available, at.pending) == (25, 0)


def test_a_bucket_expires_points_expiry_days_after_occurred_at_and_is_expiring_within_30_days():
    member = Member()
    member.buy("p1", 25800)
    expires_at = TUESDAY + 365 * DAY
    assert member.balance(expires_at - 30 * DAY - timedelta(seconds=1)).expiring_30d == 0
    assert member.balance(expires_at - 30 * DAY).expiring_30d == 25
    last = member.balance(expires_at - timedelta(seconds=1))
    assert (last.available, last.lifetime_expired) == (25, 0)
    gone = member.balance(expires_at)
    assert (gone.available, gone.expiring_30d, gone.lifetime_expired) == (0, 0, 25)
    assert conserved(gone)


def test_the_expire_job_records_each_expired_bucket_once_and_changes_no_balance():
    member = Member()
    member.buy("p1", 25800)
    member.now = TUESDAY + 400 * DAY
    before = member.balance()
    expired = member.run(cmd.ExpireDue(as_of=member.now))
    recorded = [f for f in member.facts[-len(expired):] if isinstance(f.event, ev.PointsExpired)]
    assert [(f.event.bucket_id, f.event.points, f.occurred_at) for f in recorded] == [("p:p1", 25, TUESDAY + 365 * DAY)]
    assert member.balance() == before
    assert [e for e in member.run(cmd.ExpireDue(as_of=member.now)) if isinstance(e, ev.PointsExpired)] == []


# -- redemptions ------------------------------------------------------------------------


def test_redemption_burns_soonest_expiry_first_and_records_the_buckets():
    member = Member(now=TUESDAY + 20 * DAY)
    member.buy("late", 50_000, at=TUESDAY + 11 * DAY)  # a Saturday
    member.buy("early", 30_000, at=TUESDAY)
    member.adjust("a1", 5)
    redeemed = member.redeem("x1", 40)
    assert [(b.bucket_id, b.points) for b in redeemed.buckets] == [("p:early", 30), ("p:late", 10)]
    assert member.balance().available == 45


def test_redemption_burn_ties_go_to_the_oldest_then_log_order():
    member = Member(now=LATER)
    member.buy("b", 10_000, at=TUESDAY)
    member.buy("a", 10_000, at=TUESDAY)
    redeemed = member.redeem("x1", 15)
    assert [(b.bucket_id, b.points) for b in redeemed.buckets] == [("p:b", 10), ("p:a", 5)]


def test_redemption_never_overdraws():
    member = Member(now=LATER)
    member.buy("p1", 100_000, at=TUESDAY)  # 100 available
    member.buy("p2", 100_000)  # 100 pending: not spendable
    refusal = member.refused(cmd.Redeem(redemption_id="x1", points=101), 409, "insufficient_points")
    assert refusal.extra["available"] == 100
    member.redeem("x1", 100)
    member.refused(cmd.Redeem(redemption_id="x2", points=1), 409, "insufficient_points")
    assert member.balance().available == 0


def test_debt_is_subtracted_before_a_redemption_can_spend():
    member = Member(now=LATER)
    member.buy("p1", 100_000, at=TUESDAY)
    member.redeem("x1", 100)
    member.adjust("a1", 50)  # 50 available
    member.ret("r1", "p1", 100_000)  # takes the 50, owes 50
    assert (member.balance().available, member.balance().debt) == (-50, 50)
    member.refused(cmd.Redeem(redemption_id="x2", points=1), 409, "insufficient_points")


def test_a_negative_adjustment_burns_soonest_expiry_first_and_cannot_overdraw():
    member = Member(now=LATER)
    member.buy("p1", 20_000, at=TUESDAY)
    member.adjust("a1", 10)
    member.refused(cmd.Adjust(adjustment_id="a2", points=-31, reason="fix"), 409, "insufficient_points")
    burned = member.adjust("a2", -25)
    assert [(b.bucket_id, b.points) for b in burned.buckets] == [("p:p1", 20), ("a:a1", 5)]
    b = member.balance()
    assert (b.available, b.lifetime_adjusted, b.lifetime_redeemed) == (5, -15, 0)
    assert conserved(b)


def test_a_redemption_reversal_restores_exactly_the_buckets_it_took():
    member = Member(now=LATER)
    member.buy("p1", 20_000, at=TUESDAY)
    member.buy("p2", 30_000, at=TUESDAY + DAY)
    member.redeem("x1", 25)
    reversed_ = member.one(cmd.ReverseRedemption(redemption_id="x1"), ev.RedemptionReversed)
    assert [(b.bucket_id, b.points) for b in reversed_.buckets] == [("p:p1", 20), ("p:p2", 5)]
    assert reversed_.expired == []
    assert {b.bucket_id: b.remaining for b in member.state.buckets.values()} == {"p:p1": 20, "p:p2": 30}
    assert member.balance().lifetime_redeemed == 0
    with pytest.raises(DuplicateCommand):
        decide(member.state, cmd.ReverseRedemption(redemption_id="x1"), member.programme, member.now)


def test_a_reversal_dated_before_an_expiry_the_job_wrote_off_expires_its_points_at_the_expiry():
    member = Member()
    member.buy("p1", 20_000)  # 20 points, expiring on day 365
    member.now = TUESDAY + 360 * DAY
    member.redeem("x1", 4)
    member.now = TUESDAY + 370 * DAY
    expires_at = member.state.buckets["p:p1"].expires_at
    written_off = member.run(cmd.ExpireDue(as_of=member.now))
    assert [e.points for e in written_off if isinstance(e, ev.PointsExpired)] == [16]
    decided = member.run(cmd.ReverseRedemption(redemption_id="x1", occurred_at=TUESDAY + 362 * DAY))
    reversed_ = next(e for e in decided if isinstance(e, ev.RedemptionReversed))
    assert reversed_.expired == []  # nothing had expired on day 362
    assert member.facts[-1].occurred_at == expires_at  # the restored 4 expire then, not at the reversal
    assert [(e.bucket_id, e.points) for e in decided if isinstance(e, ev.PointsExpired)] == [("p:p1", 4)]
    on_day_363 = member.balance(TUESDAY + 363 * DAY)
    assert (on_day_363.available, on_day_363.lifetime_expired) == (20, 0) and conserved(on_day_363)
    now = member.balance()
    assert (now.available, now.lifetime_redeemed, now.lifetime_expired) == (0, 0, 20) and conserved(now)
    assert member.run(cmd.ExpireDue(as_of=member.now)) == []


def test_a_reversal_after_expiry_restores_and_expires_at_once():
    member = Member(now=LATER)
    member.buy("p1", 20_000, at=TUESDAY)
    member.redeem("x1", 20)
    member.now = TUESDAY + 400 * DAY  # p1 expired on day 365
    before = member.balance()
    reversed_ = member.one(cmd.ReverseRedemption(redemption_id="x1"), ev.RedemptionReversed)
    assert [(b.bucket_id, b.points) for b in reversed_.expired] == [("p:p1", 20)]
    after = member.balance()
    assert (after.available, after.lifetime_redeemed, after.lifetime_expired) == (before.available, 0, 20)
    assert conserved(after)
    # The expire job does not record those points a second time.
    assert [e for e in member.run(cmd.ExpireDue(as_of=member.now)) if isinstance(e, ev.PointsExpired)] == []


def test_redemption_not_found():
    member = Member()
    member.refused(cmd.ReverseRedemption(redemption_id="nope"), 404, "redemption_not_found")


# -- returns --------------------------------------------------------------------------


def test_partial_returns_claw_back_cumulatively_and_never_more_than_earned():
    member = Member()
    member.buy("p1", 25800)  # 25 points, 258 growth
    clawed = [member.ret(f"r{n}", "p1", cents) for n, cents in enumerate([10_000, 10_000, 5_800])]
    # floor(25 * 10000/25800) = 9, floor(25 * 20000/25800) = 19, then all 25.
    assert [c.points for c in clawed] == [9, 10, 6]
    assert [c.growth for c in clawed] == [100, 100, 58]
    assert sum(c.points for c in clawed) == 25


def test_many_tiny_returns_never_take_more_than_the_purchase_earned():
    member = Member()
    member.buy("p1", 1_234)  # 1 point, 12 growth
    clawed = [member.ret(f"r{n}", "p1", 1).points for n in range(1_234)]
    assert sum(clawed) == 1 and clawed[-1] == 1


def test_return_exceeds_purchase():
    member = Member()
    member.buy("p1", 25800)
    member.ret("r1", "p1", 25000)
    member.refused(cmd.RecordReturn(return_id="r2", purchase_id="p1", amount_cents=801), 422, "return_exceeds_purchase")
    member.ret("r2", "p1", 800)


def test_purchase_not_found():
    member = Member()
    member.refused(cmd.RecordReturn(return_id="r1", purchase_id="nope", amount_cents=100), 404, "purchase_not_found")


def test_a_return_cannot_occur_before_its_purchase():
    member = Member(now=TUESDAY + DAY)
    member.buy("p1", 25800)
    command = cmd.RecordReturn(return_id="r1", purchase_id="p1", amount_cents=100, occurred_at=TUESDAY)
    member.refused(command, 422, "return_before_purchase")


def test_a_return_takes_its_own_bucket_first_even_while_pending():
    member = Member(now=LATER)
    member.buy("old", 50_000, at=TUESDAY)  # available, expires first
    member.buy("new", 20_000)  # pending
    clawed = member.ret("r1", "new", 20_000)
    assert [(b.bucket_id, b.points) for b in clawed.buckets] == [("p:new", 20)]


def test_a_return_shortfall_is_taken_from_other_buckets_soonest_expiry_first_then_owed():
    member = Member(now=LATER)
    member.buy("a", 30_000, at=TUESDAY + DAY)
    member.buy("b", 30_000, at=TUESDAY)
    member.buy("c", 100_000, at=TUESDAY + 2 * DAY)
    member.redeem("x1", 100)  # all of b, all of a, 40 of c
    member.redeem("x2", 50)  # 10 of c left
    clawed = member.ret("r1", "c", 100_000)  # 100 to claw: the 10 of c, nothing elsewhere, 90 owed
    assert [(b.bucket_id, b.points) for b in clawed.buckets] == [("p:c", 10)]
    assert (clawed.debt, clawed.written_off) == (90, 0)
    b = member.balance()
    assert (b.available, b.debt, b.lifetime_clawed) == (-90, 90, 100)
    assert conserved(b)


def test_credits_pay_debt_first_even_while_pending():
    member = Member(now=LATER)
    member.buy("p1", 100_000, at=TUESDAY)
    member.redeem("x1", 100)
    member.ret("r1", "p1", 100_000)  # owes 100
    earned = member.buy("p2", 150_000)  # 150 points, pending
    assert (earned.debt_paid, earned.bucket.amount) == (100, 50)
    b = member.balance()
    assert (b.available, b.pending, b.debt) == (0, 50, 0)
    adjusted = member.adjust("a1", 5)
    assert adjusted.debt_paid == 0 and adjusted.bucket.amount == 5
    assert conserved(member.balance())


def test_absorb_writes_the_shortfall_off_outside_lifetime_clawed():
    member = Member(Programme(return_shortfall="absorb"), now=LATER)
    member.buy("p1", 100_000, at=TUESDAY)
    member.redeem("x1", 60)
    clawed = member.ret("r1", "p1", 100_000)
    assert (clawed.points, clawed.debt, clawed.written_off) == (100, 0, 60)
    b = member.balance()
    assert (b.available, b.debt, b.lifetime_clawed) == (0, 0, 40)
    assert conserved(b)


# -- tiers ----------------------------------------------------------------------------


def test_a_purchase_crossing_a_threshold_upgrades_with_a_hold():
    member = Member()
    events = member.run(cmd.RecordPurchase(purchase_id="p1", store_id="s1", amount_cents=600_000))
    change = next(e for e in events if isinstance(e, ev.TierChanged))
    assert (change.from_tier, change.to_tier, change.reason, change.cause_id) == ("regular", "gold", "upgrade", "p1")
    assert change.hold_until == TUESDAY + 365 * DAY
    view = member.tier()
    assert (view.tier, view.growth_window, view.next_tier, view.growth_needed) == ("gold", 6000, None, 0)


def test_growth_needed_is_the_next_threshold_minus_growth_window():
    member = Member()
    member.buy("p1", 100_000)
    view = member.tier()
    assert (view.tier, view.growth_window, view.next_tier, view.growth_needed) == ("regular", 1000, "silver", 2000)


def test_a_tier_is_kept_through_its_hold_then_moves_down_one_step():
    member = Member()
    member.buy("p1", 600_000)  # gold, held a year
    hold_until = TUESDAY + 365 * DAY
    assert member.run(cmd.ReviewTier(as_of=hold_until - timedelta(seconds=1))) == []
    [down] = member.run(cmd.ReviewTier(as_of=hold_until))
    assert (down.from_tier, down.to_tier, down.reason, down.cause_id) == ("gold", "silver", "downgrade", None)
    assert down.hold_until == hold_until + 365 * DAY
    assert member.run(cmd.ReviewTier(as_of=hold_until)) == []
    [down] = member.run(cmd.ReviewTier(as_of=hold_until + 365 * DAY))
    assert (down.to_tier, down.hold_until) == ("regular", None)


def test_a_member_whose_growth_supports_the_tier_keeps_it():
    member = Member()
    member.buy("p1", 600_000)  # gold, held to TUESDAY + 365 days
    member.now = TUESDAY + 300 * DAY
    member.buy("p2", 600_000)  # still 6000 growth in the window at the end of the hold
    assert member.run(cmd.ReviewTier(as_of=TUESDAY + 365 * DAY)) == []
    assert member.tier(TUESDAY + 365 * DAY).hold_until == TUESDAY + 365 * DAY


@pytest.mark.parametrize(("downgrade", "expected"), [("one_step", "silver"), ("to_qualified", "regular"), ("never", "gold")])
def test_the_downgrade_setting_decides_how_far_a_member_falls(downgrade, expected):
    member = Member(Programme(downgrade=downgrade))
    member.buy("p1", 600_000)
    member.run(cmd.ReviewTier(as_of=TUESDAY + 400 * DAY))
    assert member.tier(TUESDAY + 400 * DAY).tier == expected


def test_returning_the_upgrading_purchase_reverts_the_tier_and_its_hold():
    member = Member(now=LATER)
    member.buy("p1", 300_000, at=TUESDAY)  # silver, held to TUESDAY + 365d
    member.buy("p2", 300_000)  # gold
    events = member.run(cmd.RecordReturn(return_id="r1", purchase_id="p2", amount_cents=100))  # 1 growth
    [revert] = [e for e in events if isinstance(e, ev.TierChanged)]
    assert (revert.from_tier, revert.to_tier, revert.reason, revert.cause_id) == ("gold", "silver", "return", "r1")
    assert revert.hold_until == TUESDAY + 365 * DAY
    # Returning the purchase that did not cause the tier changes growth only.
    assert [e for e in member.run(cmd.RecordReturn(return_id="r2", purchase_id="p2", amount_cents=299_900))
            if isinstance(e, ev.TierChanged)] == []


def test_a_return_that_leaves_growth_above_the_threshold_keeps_the_tier():
    member = Member()
    member.buy("p1", 350_000)  # silver with 500 to spare
    events = member.run(cmd.RecordReturn(return_id="r1", purchase_id="p1", amount_cents=50_000))
    assert [e for e in events if isinstance(e, ev.TierChanged)] == []
    assert member.tier().tier == "silver"


def test_a_return_changes_the_growth_of_its_own_purchase_only():
    member = Member(now=LATER)
    member.buy("p1", 100_000, at=TUESDAY)
    member.buy("p2", 100_000)
    member.ret("r1", "p1", 100_000)
    assert rolling_growth(member.state, member.now, member.programme) == 1000  # p2's
    assert rolling_growth(member.state, TUESDAY + DAY, member.programme) == 1000  # p1's, before its return
    assert rolling_growth(member.state, LATER + 365 * DAY, member.programme) == 0  # p2 left the window


# -- coupons --------------------------------------------------------------------------


def test_the_welcome_pack_gives_100_yuan_of_coupons_valid_30_days():
    member = Member()
    coupons = list(member.state.coupons.values())
    assert [c.coupon_id for c in coupons] == ["welcome-1", "welcome-2", "welcome-3", "welcome-4"]
    assert sum(c.value_cents for c in coupons) == 10_000
    assert {(c.valid_from, c.expires_at) for c in coupons} == {(TUESDAY, TUESDAY + timedelta(hours=24 * 30))}


def test_a_coupon_is_redeemed_at_most_once():
    member = Member()
    redeem = cmd.RedeemCoupon(coupon_id="welcome-1", order_ref="o1", order_amount_cents=10_000)  # exactly min spend
    member.run(redeem)
    member.refused(redeem, 409, "coupon_not_redeemable", "already_redeemed")
    member.run(cmd.ReverseCouponRedemption(coupon_id="welcome-1"))
    member.run(redeem)


def test_coupon_not_redeemable_below_min_spend():
    member = Member()
    command = cmd.RedeemCoupon(coupon_id="welcome-3", order_ref="o1", order_amount_cents=19_999)
    member.refused(command, 409, "coupon_not_redeemable", "min_spend_not_met")


def test_coupon_not_redeemable_before_valid_from():
    member = Member()
    member.coupon("c1", valid_from=TUESDAY + DAY)
    command = cmd.RedeemCoupon(coupon_id="c1", order_ref="o1", order_amount_cents=100)
    member.refused(command, 409, "coupon_not_redeemable", "not_yet_valid")
    member.now = TUESDAY + DAY
    member.run(command)


def test_coupon_not_redeemable_once_expired():
    member = Member()
    member.now = TUESDAY + 30 * DAY  # expires_at exactly
    command = cmd.RedeemCoupon(coupon_id="welcome-1", order_ref="o1", order_amount_cents=10_000)
    member.refused(command, 409, "coupon_not_redeemable", "expired")
    member.now -= timedelta(seconds=1)
    member.run(command)


def test_coupon_not_redeemable_once_voided():
    member = Member()
    member.run(cmd.VoidCoupon(coupon_id="welcome-1", reason="fraud"))
    command = cmd.RedeemCoupon(coupon_id="welcome-1", order_ref="o1", order_amount_cents=10_000)
    member.refused(command, 409, "coupon_not_redeemable", "voided")
    member.refused(cmd.VoidCoupon(coupon_id="welcome-1", reason="again"), 409, "coupon_not_redeemable", "voided")


def test_coupon_not_found():
    member = Member()
    member.refused(cmd.RedeemCoupon(coupon_id="nope", order_ref="o1", order_amount_cents=100), 404, "coupon_not_found")
    member.refused(cmd.ReverseCouponRedemption(coupon_id="nope"), 404, "coupon_not_found")
    member.refused(cmd.VoidCoupon(coupon_id="nope", reason="x"), 404, "coupon_not_found")


def test_only_a_redeemed_coupon_can_be_reversed():
    member = Member()
    member.refused(cmd.ReverseCouponRedemption(coupon_id="welcome-1"), 409, "coupon_not_redeemed")


def test_a_reversal_after_expiry_leaves_the_coupon_expired():
    member = Member()
    member.run(cmd.RedeemCoupon(coupon_id="welcome-1", order_ref="o1", order_amount_cents=10_000))
    member.now = TUESDAY + 31 * DAY
    member.run(cmd.ReverseCouponRedemption(coupon_id="welcome-1"))
    assert member.state.coupons["welcome-1"].status_at(member.now) == "expired"


def test_buying_a_coupon_with_points_burns_and_issues_in_one_event():
    member = Member(now=LATER)
    member.buy("p1", 100_000, at=TUESDAY)
    member.refused(
        cmd.IssueCoupon(coupon_id="c1", template="T", value_cents=500, expires_at=member.now + DAY, points_cost=101),
        409,
        "insufficient_points",
    )
    events = member.run(
        cmd.IssueCoupon(coupon_id="c1", template="T", value_cents=500, expires_at=member.now + DAY, points_cost=40)
    )
    [issued] = events
    assert (issued.source, issued.points_cost, [(b.bucket_id, b.points) for b in issued.buckets]) == ("points", 40, [("p:p1", 40)])
    b = member.balance()
    assert (b.available, b.lifetime_redeemed) == (60, 40)


def test_the_birthday_coupon_comes_once_a_year_in_the_birthday_month_of_the_programme_timezone():
    member = Member(birthday="02-14")
    jan_31_23_59_shanghai = datetime(2025, 1, 31, 15, 59, tzinfo=timezone.utc)
    feb_1_00_00_shanghai = datetime(2025, 1, 31, 16, 0, tzinfo=timezone.utc)
    assert member.run(cmd.IssueBirthdayCoupon(as_of=jan_31_23_59_shanghai)) == []
    [issued] = member.run(cmd.IssueBirthdayCoupon(as_of=feb_1_00_00_shanghai))
    assert (issued.coupon_id, issued.value_cents, issued.min_spend_cents) == ("birthday-2025", 5000, 10_000)
    assert issued.expires_at == feb_1_00_00_shanghai + timedelta(hours=24 * 30)
    assert member.run(cmd.IssueBirthdayCoupon(as_of=feb_1_00_00_shanghai + 10 * DAY)) == []
    assert member.run(cmd.IssueBirthdayCoupon(as_of=feb_1_00_00_shanghai + 365 * DAY))[0].coupon_id == "birthday-2026"


# -- members and time -----------------------------------------------------------------------


def test_member_not_found():
    programme = Programme()
    for command in (
        cmd.RecordPurchase(purchase_id="p1", store_id="s1", amount_cents=100),
        cmd.Redeem(redemption_id="x1", points=1),
        cmd.RedeemCoupon(coupon_id="welcome-1", order_ref="o1", order_amount_cents=100),
    ):
        with pytest.raises(Refusal) as refused:
            decide(MemberState(), command, programme, TUESDAY)
        assert (refused.value.status, refused.value.code) == (404, "member_not_found")


def _with_occurred_at(at: datetime) -> list[cmd.Command]:
    """One command of each kind that appends, at business time ``at``."""
    return [
        cmd.RecordPurchase(purchase_id="p9", store_id="s1", amount_cents=100, occurred_at=at),
        cmd.RecordReturn(return_id="r9", purchase_id="p1", amount_cents=100, occurred_at=at),
        cmd.Redeem(redemption_id="x9", points=1, occurred_at=at),
        cmd.ReverseRedemption(redemption_id="x1", occurred_at=at),
        cmd.Adjust(adjustment_id="a9", points=1, reason="x", occurred_at=at),
        cmd.IssueCoupon(coupon_id="c9", template="T", value_cents=100, expires_at=TUESDAY + 90 * DAY, occurred_at=at),
        cmd.RedeemCoupon(coupon_id="welcome-2", order_ref="o9", order_amount_cents=10_000, occurred_at=at),
        cmd.ReverseCouponRedemption(coupon_id="welcome-1", occurred_at=at),
        cmd.VoidCoupon(coupon_id="welcome-2", reason="x", occurred_at=at),
    ]


TIMED_KINDS = ["purchase", "return", "redemption", "reversal", "adjustment", "coupon_issue", "coupon_redemption",
               "coupon_reversal", "coupon_void"]


def _busy_member(programme: Programme | None = None) -> Member:
    """A member with something to return, reverse and redeem, ten days after LATER."""
    member = Member(programme, now=LATER)
    member.buy("p1", 100_000, at=LATER - 8 * DAY)
    member.redeem("x1", 10)
    member.run(cmd.RedeemCoupon(coupon_id="welcome-1", order_ref="o1", order_amount_cents=10_000))
    member.now = LATER + 10 * DAY
    return member


@pytest.mark.parametrize("index", range(len(TIMED_KINDS)), ids=TIMED_KINDS)
def test_occurred_at_in_future(index):
    member = _busy_member()
    member.refused(_with_occurred_at(member.now + timedelta(minutes=5, seconds=1))[index], 422, "occurred_at_in_future")
    member.run(_with_occurred_at(member.now + timedelta(minutes=5))[index])


@pytest.mark.parametrize("index", range(len(TIMED_KINDS)), ids=TIMED_KINDS)
def test_occurred_at_too_old(index):
    member = _busy_member(Programme(max_backdate_days=9))
    member.refused(_with_occurred_at(member.now - timedelta(days=9, seconds=1))[index], 422, "occurred_at_too_old")
    member.run(_with_occurred_at(member.now - timedelta(days=9))[index])


def test_enrolled_at_obeys_the_same_window():
    programme = Programme()
    for at, code in ((TUESDAY + timedelta(minutes=6), "occurred_at_in_future"), (TUESDAY - 31 * DAY, "occurred_at_too_old")):
        with pytest.raises(Refusal) as refused:
            decide(MemberState(), cmd.Enrol(member_id="m1", enrolled_at=at), programme, TUESDAY)
        assert refused.value.code == code


def test_a_migration_imports_old_history_by_raising_max_backdate_days():
    member = Member(Programme(max_backdate_days=1000), now=TUESDAY, enrolled_at=TUESDAY - 900 * DAY)
    member.buy("p1", 25800, at=TUESDAY - 800 * DAY)
    assert member.balance(TUESDAY - 700 * DAY).available == 25
    assert member.balance().lifetime_expired == 25


def test_repeating_a_natural_id_decides_nothing():
    member = _busy_member()
    for command in (
        cmd.RecordPurchase(purchase_id="p1", store_id="s1", amount_cents=5),
        cmd.Redeem(redemption_id="x1", points=1),
        cmd.IssueCoupon(coupon_id="welcome-3", template="T", value_cents=1, expires_at=member.now + DAY),
    ):
        before = member.state.copy()
        with pytest.raises(DuplicateCommand):
            decide(member.state, command, member.programme, member.now)
        assert member.state == before


# -- points are conserved, also as of past times ------------------------------------------


def test_points_are_conserved_at_every_moment_of_a_busy_history():
    member = _busy_member()
    member.adjust("a1", 30)
    member.ret("r1", "p1", 40_000)
    member.run(cmd.ReverseRedemption(redemption_id="x1"))
    member.now = LATER + 400 * DAY
    member.buy("p2", 80_000)
    member.adjust("a2", 3)
    member.adjust("a3", -1)
    moments = sorted({f.occurred_at for f in member.facts} | {TUESDAY + n * DAY for n in range(0, 420, 7)})
    for at in moments:
        assert conserved(member.balance(at)), at


# -- late burns and as_of: the domain decides them against today's buckets ------------------------


def test_a_redemption_reversal_cannot_precede_the_redemption():
    member = Member(now=LATER)
    member.buy("p1", 10_000, at=TUESDAY)
    member.redeem("x1", 10)
    command = cmd.ReverseRedemption(redemption_id="x1", occurred_at=LATER - timedelta(seconds=1))
    member.refused(command, 422, "occurred_at_before_original")
    member.run(cmd.ReverseRedemption(redemption_id="x1", occurred_at=LATER))


def test_a_coupon_redemption_reversal_cannot_precede_the_redemption():
    member = Member()
    member.now = TUESDAY + DAY
    member.run(cmd.RedeemCoupon(coupon_id="welcome-1", order_ref="o1", order_amount_cents=10_000))
    command = cmd.ReverseCouponRedemption(coupon_id="welcome-1", occurred_at=TUESDAY + DAY - timedelta(seconds=1))
    member.refused(command, 422, "occurred_at_before_original")


def test_a_backdated_redemption_never_overdraws_as_of_its_occurred_at():
    member = Member(now=LATER)
    member.buy("p1", 10_000, at=TUESDAY)
    member.redeem("x1", 10)  # on day 14
    member.now = LATER + DAY
    member.run(cmd.ReverseRedemption(redemption_id="x1"))  # on day 15
    # On day 14 12:00 x1 held all 10 points: a redemption dated then may take none of them.
    command = cmd.Redeem(redemption_id="x2", points=1, occurred_at=LATER + timedelta(hours=12))
    member.refused(command, 409, "insufficient_points")
    for at in (LATER, LATER + timedelta(hours=12), member.now):
        state = fold(f for f in member.facts if f.occurred_at <= at)
        assert all(0 <= bucket.remaining <= bucket.amount for bucket in state.buckets.values())
        assert balance(state, at).available >= 0
    member.run(cmd.Redeem(redemption_id="x2", points=10, occurred_at=LATER + DAY))


def test_a_backdated_burn_may_take_what_every_later_view_holds():
    member = Member(now=LATER)
    member.adjust("a1", 1, at=TUESDAY)
    member.redeem("x1", 1)
    member.run(cmd.ReverseRedemption(redemption_id="x1"))  # same occurred_at as x1: every view from LATER on holds 1
    member.run(cmd.Redeem(redemption_id="x2", points=1, occurred_at=TUESDAY + DAY))
    assert member.balance(TUESDAY + DAY).available == 0
    assert member.balance().available == 0


@pytest.mark.parametrize("kind", ["void", "redeem"])
def test_a_coupon_cannot_be_voided_or_redeemed_before_it_was_issued(kind):
    member = Member(now=TUESDAY + 2 * DAY)
    member.coupon("c1", valid_from=TUESDAY)  # issued on day 2, valid from day 0
    at = TUESDAY + DAY
    command = (
        cmd.VoidCoupon(coupon_id="c1", reason="x", occurred_at=at)
        if kind == "void"
        else cmd.RedeemCoupon(coupon_id="c1", order_ref="o1", order_amount_cents=100, occurred_at=at)
    )
    before = member.state.copy()
    with pytest.raises(Refusal) as refused:
        member.run(command)
    assert refused.value.code == "occurred_at_before_original"
    assert member.state == before

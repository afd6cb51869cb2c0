"""``decide``: the programme's rules as pure functions.

``decide(state, command, programme, now)`` returns the events a command
causes, each with its business time, or raises ``Refusal`` (nothing is
appended) or ``DuplicateCommand`` (the natural id was used before). It reads
the state and never changes it; the clock is the ``now`` argument.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Callable, NamedTuple

import msgspec

from events import catalogue as ev
from events.codec import rfc3339
from ledger import activities, referrals
from ledger import commands as cmd
from ledger.campaigns import CampaignBook, CouponReward, Grant, PurchaseFacts, Spend, rewards
from ledger.errors import DuplicateCommand, Refusal, not_found
from ledger.programme import WEEKDAYS, Programme, Tier
from ledger.state import Bucket, MemberState
from ledger.views import available_points, burnable_buckets, current_tier, rolling_growth

FUTURE_TOLERANCE = timedelta(minutes=5)


class Decided(NamedTuple):
    """An event decided, with its business time."""

    occurred_at: datetime
    event: ev.Event


class CampaignContext(NamedTuple):
    """The campaigns a purchase may qualify for, and what each has spent (as this decision sees it)."""

    book: CampaignBook
    spend: dict[str, Spend]


NO_CAMPAIGNS = CampaignContext(CampaignBook(), {})


def decide(
    state: MemberState, command: cmd.Command, programme: Programme, now: datetime,
    campaigns: CampaignContext = NO_CAMPAIGNS,
) -> list[Decided]:
    """The events ``command`` causes; ``programme`` is the version in force at its business time."""
    rule = _RULES[type(command)]
    if not isinstance(command, cmd.Enrol) and not state.enrolled:
        raise not_found("member_not_found", "the member")
    if isinstance(command, cmd.RecordPurchase):
        return _purchase(state, command, programme, now, campaigns)
    return rule(state, command, programme, now)


def command_time(command: cmd.Command, now: datetime) -> datetime:
    """The business time whose programme version decides the command (CONTRACT §6.1)."""
    given = getattr(command, "occurred_at", None) or getattr(command, "enrolled_at", None)
    return given or getattr(command, "as_of", None) or now


def business_time(given: datetime | None, programme: Programme, now: datetime, name: str = "occurred_at") -> datetime:
    """The command's occurred_at (default now), within the contract's window; ``name`` is the field that gave it
    (enrolment calls it ``enrolled_at``), named in a refusal."""
    if given is None:
        return now
    if given > now + FUTURE_TOLERANCE:
        raise Refusal(422, "occurred_at_in_future", f"{name} is more than 5 minutes ahead of the server clock",
                      field=name)
    if given < now - timedelta(days=programme.max_backdate_days):
        raise Refusal(
            422,
            "occurred_at_too_old",
            f"{name} is more than max_backdate_days ({programme.max_backdate_days}) in the past",
            field=name,
        )
    return given


def _take(sources: list[tuple[Bucket, int]], points: int) -> tuple[list[ev.BucketPoints], int]:
    """Take up to ``points`` from (bucket, allowed) in the order given; returns parts and shortfall."""
    parts = []
    for bucket, allowed in sources:
        if points == 0:
            break
        taken = min(allowed, points)
        if taken > 0:
            parts.append(ev.BucketPoints(bucket.bucket_id, taken))
            points -= taken
    return parts, points


def _unexpired(state: MemberState, parts: list[ev.BucketPoints]) -> list[ev.BucketPoints]:
    """The parts of a burn that the trail already shows as expired.

    A late event (dated before a bucket's expires_at, recorded after the expire
    job wrote the bucket off) may spend those points; the trail takes the
    expiry back so its running balance stays equal to the balance.
    """
    unexpired = []
    for part in parts:
        bucket = state.buckets[part.bucket_id]
        excess = bucket.expired_points_recorded - (bucket.remaining - part.points)
        if excess > 0:
            unexpired.append(ev.BucketPoints(bucket.bucket_id, min(excess, part.points)))
    return unexpired


def _not_before(at: datetime, earlier: datetime, what: str, code: str = "occurred_at_before_original") -> None:
    """A return or a reversal is dated no earlier than what it undoes."""
    if at < earlier:
        raise Refusal(422, code, f"occurred_at is before {what} it undoes ({rfc3339(earlier)})", field="occurred_at")


def _burn_available(state: MemberState, points: int, at: datetime) -> list[ev.BucketPoints]:
    """Burn soonest-expiry first; never overdraws (409 insufficient_points)."""
    sources = burnable_buckets(state, at)
    spendable = min(sum(allowed for _, allowed in sources) - state.debt, available_points(state, at))
    if points > spendable:
        raise Refusal(
            409,
            "insufficient_points",
            f"{points} points asked, {max(spendable, 0)} available at {rfc3339(at)}",
            available=spendable,
        )
    parts, shortfall = _take(sources, points)
    assert shortfall == 0
    return parts


def _new_bucket(bucket_id: str, amount: int, available_at: datetime, occurred_at: datetime, programme: Programme):
    if amount <= 0:
        return None
    expires_at = occurred_at + timedelta(days=programme.points_expiry_days)
    return ev.NewBucket(bucket_id, amount, available_at, expires_at)


def _coupon_from_template(coupon_id, template, source, valid_from: datetime) -> ev.CouponIssued:
    return ev.CouponIssued(
        coupon_id=coupon_id,
        template=template.template,
        value_cents=template.value_cents,
        min_spend_cents=template.min_spend_cents,
        valid_from=valid_from,
        expires_at=valid_from + timedelta(hours=24 * template.valid_days),
        source=source,
    )


def _enrol(state: MemberState, command: cmd.Enrol, programme: Programme, now: datetime) -> list[Decided]:
    if state.enrolled:
        raise Refusal(409, "member_exists", f"member {state.member_id} is already enrolled")
    assert command.member_id, "the application assigns a member_id before deciding"
    if command.referred_by == command.member_id:
        raise Refusal(422, "self_referral", "a member cannot refer itself", field="referred_by")
    at = business_time(command.enrolled_at, programme, now, "enrolled_at")
    seen = set()
    for identity in command.identities:
        if (identity.type, identity.value) in seen:
            raise Refusal(422, "validation_failed", "an identity is listed twice", field="identities")
        seen.add((identity.type, identity.value))
    identities = [ev.Identity(i.type, i.value) for i in command.identities]
    enrolled = ev.MemberEnrolled(
        member_id=command.member_id, identities=identities, birthday=command.birthday, referred_by=command.referred_by
    )
    decided = [Decided(at, enrolled)]
    decided += [Decided(at, ev.IdentityLinked(identity_type=i.type, value=i.value)) for i in identities]
    decided += [
        Decided(at, _coupon_from_template(f"welcome-{n}", template, "welcome", at))
        for n, template in enumerate(programme.welcome_pack, start=1)
    ]
    return decided


def earn_points(amount_cents: int, tier_pct: int, day_pct: int, programme: Programme) -> int:
    """CONTRACT §2: floor(amount * tier_pct * day_pct / (earn_cents_per_point * 100 * 100))."""
    return amount_cents * tier_pct * day_pct // (programme.earn_cents_per_point * 100 * 100)


def member_day_pct(at: datetime, programme: Programme) -> int:
    local_weekday = WEEKDAYS[at.astimezone(programme.zone).weekday()]
    return programme.member_day.multiplier_pct if local_weekday == programme.member_day.weekday else 100


def regular_points(amount_cents: int, tier: Tier, at: datetime, programme: Programme) -> tuple[int, int]:
    """A purchase's member-day percent and regular points (CONTRACT §2), on ``tier``; a simulation
    (ledger/simulation.py) earns by this same rule."""
    day_pct = member_day_pct(at, programme)
    return day_pct, earn_points(amount_cents, tier.multiplier_pct, day_pct, programme)


def _purchase(
    state: MemberState, command: cmd.RecordPurchase, programme: Programme, now: datetime,
    campaigns: CampaignContext = NO_CAMPAIGNS,
) -> list[Decided]:
    if command.purchase_id in state.purchases:
        raise DuplicateCommand(f"purchase:{command.purchase_id}")
    at = business_time(command.occurred_at, programme, now)
    tier = programme.tier(current_tier(state, programme))
    day_pct, points = regular_points(command.amount_cents, tier, at, programme)
    growth = command.amount_cents // programme.growth_cents_per_unit
    debt_paid = min(state.debt, points)
    bucket = _new_bucket(
        f"p:{command.purchase_id}", points - debt_paid, at + timedelta(days=programme.pending_days), at, programme
    )
    decided = [
        Decided(at, ev.PurchaseRecorded(purchase_id=command.purchase_id, store_id=command.store_id, amount_cents=command.amount_cents)),
        Decided(
            at,
            ev.PointsEarned(
                purchase_id=command.purchase_id,
                points=points,
                growth=growth,
                tier=tier.name,
                tier_pct=tier.multiplier_pct,
                day_pct=day_pct,
                debt_paid=debt_paid,
                bucket=bucket,
            ),
        ),
    ]
    facts = PurchaseFacts(command.store_id, command.amount_cents, at, tier.name, not state.purchases, points)
    grants = rewards(
        campaigns.book.running_at(at), campaigns.spend, state.campaign_rewards, facts, programme
    )
    decided += _campaign_rewards(state, command, grants, campaigns.book, decided[1].event, at, programme)
    if referrals.qualifies(state, command.amount_cents, at, programme):
        # The referee's part of the referral; the application adds the referrer's (another stream).
        coupon = _coupon_from_template(
            referrals.REFEREE_COUPON_ID, programme.referral.referee_coupon, referrals.REFEREE_COUPON_SOURCE, at
        )
        decided.append(Decided(at, coupon))
    return decided + _upgrade(state, tier, growth, command.purchase_id, at, programme)


def _upgrade(state: MemberState, tier, growth: int, cause_id: str, at: datetime, programme: Programme) -> list[Decided]:
    """The upgrade, if any, when ``growth`` more at ``at`` lifts rolling growth past a higher threshold."""
    reached = programme.qualified_tier(rolling_growth(state, at, programme) + growth)
    if programme.tier_index(reached.name) <= programme.tier_index(tier.name):
        return []
    event = ev.TierChanged(
        from_tier=tier.name,
        to_tier=reached.name,
        reason="upgrade",
        cause_id=cause_id,
        hold_until=at + timedelta(days=programme.tier_hold_days),
        previous_hold_until=state.hold_until,
    )
    return [Decided(at, event)]


def _activity(state: MemberState, command: cmd.RecordActivity, programme: Programme, now: datetime) -> list[Decided]:
    """CONTRACT §6.3: the programme's points, available at once; growth that may upgrade."""
    if command.activity_id in state.activities:
        raise DuplicateCommand(f"activity:{command.activity_id}")
    at = business_time(command.occurred_at, programme, now)
    rule = activities.rule_for(programme, command.type)
    activities.refuse_over_cap(state, rule, at, programme.zone)
    tier = programme.tier(current_tier(state, programme))
    debt_paid = min(state.debt, rule.points)
    bucket = _new_bucket(f"t:{command.activity_id}", rule.points - debt_paid, at, at, programme)
    decided = [Decided(at, event) for event in activities.recorded(command, rule, tier.name, debt_paid, bucket)]
    return decided + _upgrade(state, tier, rule.growth, command.activity_id, at, programme)


def _campaign_rewards(
    state: MemberState, command: cmd.RecordPurchase, grants: list[Grant], book: CampaignBook,
    regular: ev.PointsEarned, at: datetime, programme: Programme,
) -> list[Decided]:
    """Each grant as points into its own bucket (pending and expiring like the purchase's, paying
    what debt is left first) or as a coupon ``<campaign_id>-<n>`` valid from the purchase."""
    decided, debt = [], state.debt - regular.debt_paid
    for grant in grants:
        campaign = book.campaigns[grant.campaign_id]
        if grant.coupon:
            assert isinstance(campaign.reward, CouponReward)
            n = state.campaign_coupons.get(grant.campaign_id, 0) + 1
            while f"{grant.campaign_id}-{n}" in state.coupons:  # an id an admin took: the next one
                n += 1
            coupon = _coupon_from_template(f"{grant.campaign_id}-{n}", campaign.reward, "campaign", at)
            decided.append(Decided(at, msgspec.structs.replace(coupon, campaign_id=grant.campaign_id)))
            continue
        debt_paid = min(debt, grant.points)
        debt -= debt_paid
        bucket = _new_bucket(
            f"c:{grant.campaign_id}:{command.purchase_id}", grant.points - debt_paid,
            at + timedelta(days=programme.pending_days), at, programme,
        )
        earned = ev.PointsEarned(
            purchase_id=command.purchase_id, points=grant.points, growth=0, tier=regular.tier,
            tier_pct=regular.tier_pct, day_pct=regular.day_pct, debt_paid=debt_paid, bucket=bucket, campaign_id=grant.campaign_id,
        )
        decided.append(Decided(at, earned))
    return decided


def _return(state: MemberState, command: cmd.RecordReturn, programme: Programme, now: datetime) -> list[Decided]:
    if command.return_id in state.returns:
        raise DuplicateCommand(f"return:{command.return_id}")
    purchase = state.purchases.get(command.purchase_id)
    if purchase is None:
        raise not_found("purchase_not_found", f"purchase {command.purchase_id}")
    at = business_time(command.occurred_at, programme, now)
    _not_before(at, purchase.occurred_at, "the purchase", code="return_before_purchase")
    returned_total = purchase.returned_cents + command.amount_cents
    if returned_total > purchase.amount_cents:
        raise Refusal(
            422,
            "return_exceeds_purchase",
            f"returns would total {returned_total} cents of a {purchase.amount_cents}-cent purchase",
            field="amount_cents",
        )
    points = purchase.points * returned_total // purchase.amount_cents - purchase.clawed_points
    growth = purchase.growth * returned_total // purchase.amount_cents - purchase.clawed_growth
    # Its own buckets first: the regular one, then its campaign buckets in campaign_id order.
    own_ids = [b for b in [purchase.bucket_id, *purchase.campaign_bucket_ids] if b in state.buckets]
    sources = [(state.buckets[b], state.buckets[b].burnable(at)) for b in own_ids if not state.buckets[b].is_expired(at)]
    sources += [(b, allowed) for b, allowed in burnable_buckets(state, at) if b.bucket_id not in own_ids]
    parts, shortfall = _take(sources, points)
    debt, written_off = (shortfall, 0) if programme.return_shortfall == "debt" else (0, shortfall)
    decided = [
        Decided(
            at,
            ev.PurchaseReturned(
                return_id=command.return_id,
                purchase_id=command.purchase_id,
                amount_cents=command.amount_cents,
                returned_total_cents=returned_total,
            ),
        ),
        Decided(
            at,
            ev.PointsClawedBack(
                return_id=command.return_id,
                purchase_id=command.purchase_id,
                points=points,
                growth=growth,
                buckets=parts,
                debt=debt,
                written_off=written_off,
                unexpired=_unexpired(state, parts),
            ),
        ),
    ]
    revert = _tier_revert(state, command, growth, at, programme)
    if revert is not None:
        decided.append(Decided(at, revert))
    return decided


def _tier_revert(state, command: cmd.RecordReturn, growth_clawed: int, at: datetime, programme: Programme):
    """Returning the purchase that caused the current tier may undo the upgrade."""
    if not state.upgrades or state.upgrades[-1].cause_id != command.purchase_id:
        return None
    tier = programme.tier(current_tier(state, programme))
    purchase = state.purchases[command.purchase_id]
    in_window = at - timedelta(days=programme.tier_window_days) < purchase.occurred_at
    growth_after = rolling_growth(state, at, programme) - (growth_clawed if in_window else 0)
    if growth_after >= tier.threshold:
        return None
    upgrade = state.upgrades[-1]
    return ev.TierChanged(
        from_tier=tier.name,
        to_tier=upgrade.from_tier,
        reason="return",
        cause_id=command.return_id,
        hold_until=upgrade.previous_hold_until,
    )


def _redeem(state: MemberState, command: cmd.Redeem, programme: Programme, now: datetime) -> list[Decided]:
    if command.redemption_id in state.redemptions:
        raise DuplicateCommand(f"redemption:{command.redemption_id}")
    at = business_time(command.occurred_at, programme, now)
    parts = _burn_available(state, command.points, at)
    event = ev.PointsRedeemed(
        redemption_id=command.redemption_id,
        points=command.points,
        order_ref=command.order_ref,
        buckets=parts,
        unexpired=_unexpired(state, parts),
    )
    return [Decided(at, event)]


def _reverse_redemption(state: MemberState, command: cmd.ReverseRedemption, programme: Programme, now: datetime):
    redemption = state.redemptions.get(command.redemption_id)
    if redemption is None:
        raise not_found("redemption_not_found", f"redemption {command.redemption_id}")
    if redemption.reversed:
        raise DuplicateCommand(f"redemption_reversal:{command.redemption_id}")
    at = business_time(command.occurred_at, programme, now)
    _not_before(at, redemption.occurred_at, "the redemption")
    # Restored into a bucket already past its expiry at ``at``: expired again at once, and the trail
    # says so. Restored, at a date before its expiry, into a bucket whose expiry the job has already
    # written: those points expire at the bucket's expires_at, recorded now, since no later job
    # returns to a bucket it wrote off.
    expired = [part for part in redemption.buckets if state.buckets[part.bucket_id].is_expired(at)]
    written_off_later = [
        Decided(bucket.expires_at, ev.PointsExpired(bucket_id=part.bucket_id, points=part.points,
                                                    expires_at=bucket.expires_at))
        for part in redemption.buckets
        if not (bucket := state.buckets[part.bucket_id]).is_expired(at) and bucket.expiry_recorded
    ]
    event = ev.RedemptionReversed(
        redemption_id=redemption.redemption_id,
        points=redemption.points,
        buckets=list(redemption.buckets),
        expired=expired,
    )
    return [Decided(at, event), *written_off_later]


def _issue_coupon(state: MemberState, command: cmd.IssueCoupon, programme: Programme, now: datetime):
    assert command.coupon_id, "the application assigns a coupon_id before deciding"
    if command.coupon_id in state.coupons:
        raise DuplicateCommand(f"coupon:{command.coupon_id}")
    at = business_time(command.occurred_at, programme, now)
    valid_from = command.valid_from or at
    if command.expires_at <= valid_from:
        raise Refusal(422, "validation_failed", "expires_at must be after valid_from", field="expires_at")
    points_cost = command.points_cost or 0
    parts = _burn_available(state, points_cost, at) if points_cost else []
    event = ev.CouponIssued(
        coupon_id=command.coupon_id,
        template=command.template,
        value_cents=command.value_cents,
        min_spend_cents=command.min_spend_cents,
        valid_from=valid_from,
        expires_at=command.expires_at,
        source="points" if points_cost else "admin",
        points_cost=points_cost,
        buckets=parts,
        unexpired=_unexpired(state, parts),
    )
    return [Decided(at, event)]


def _coupon(state: MemberState, coupon_id: str):
    coupon = state.coupons.get(coupon_id)
    if coupon is None:
        raise not_found("coupon_not_found", f"coupon {coupon_id}")
    return coupon


def _coupon_time(command, coupon, programme: Programme, now: datetime) -> datetime:
    """A coupon command's business time: in the window, and not before the coupon was issued."""
    at = business_time(command.occurred_at, programme, now)
    _not_before(at, coupon.issued_at, "the coupon's issue")
    return at


def _not_redeemable(reason: str, detail: str) -> Refusal:
    return Refusal(409, "coupon_not_redeemable", detail, reason=reason)


def _redeem_coupon(state: MemberState, command: cmd.RedeemCoupon, programme: Programme, now: datetime):
    coupon = _coupon(state, command.coupon_id)
    at = _coupon_time(command, coupon, programme, now)
    status = coupon.status_at(at)
    if status != "issued":
        raise _not_redeemable(status if status != "redeemed" else "already_redeemed", f"the coupon is {status}")
    if at < coupon.valid_from:
        raise _not_redeemable("not_yet_valid", f"the coupon is valid from {rfc3339(coupon.valid_from)}")
    if command.order_amount_cents < coupon.min_spend_cents:
        raise _not_redeemable(
            "min_spend_not_met", f"the order must be at least {coupon.min_spend_cents} cents"
        )
    event = ev.CouponRedeemed(
        coupon_id=coupon.coupon_id, order_ref=command.order_ref, order_amount_cents=command.order_amount_cents
    )
    return [Decided(at, event)]


def _reverse_coupon_redemption(state: MemberState, command: cmd.ReverseCouponRedemption, programme, now):
    coupon = _coupon(state, command.coupon_id)
    if coupon.status != "redeemed":
        raise Refusal(409, "coupon_not_redeemed", f"the coupon is {coupon.status}; only a redeemed coupon can be reversed")
    at = _coupon_time(command, coupon, programme, now)
    _not_before(at, coupon.redeemed_at or at, "the coupon redemption")
    return [Decided(at, ev.CouponRedemptionReversed(coupon_id=coupon.coupon_id, order_ref=coupon.order_ref or ""))]


def _void_coupon(state: MemberState, command: cmd.VoidCoupon, programme: Programme, now: datetime):
    coupon = _coupon(state, command.coupon_id)
    at = _coupon_time(command, coupon, programme, now)
    if coupon.status_at(at) != "issued":
        raise _not_redeemable(coupon.status_at(at), f"only an issued coupon can be voided; it is {coupon.status_at(at)}")
    return [Decided(at, ev.CouponVoided(coupon_id=coupon.coupon_id, reason=command.reason))]


def _adjust(state: MemberState, command: cmd.Adjust, programme: Programme, now: datetime) -> list[Decided]:
    if command.adjustment_id in state.adjustments:
        raise DuplicateCommand(f"adjustment:{command.adjustment_id}")
    if command.points == 0:
        raise Refusal(422, "validation_failed", "points must not be zero", field="points")
    at = business_time(command.occurred_at, programme, now)
    debt_paid = min(state.debt, command.points) if command.points > 0 else 0
    bucket = _new_bucket(f"a:{command.adjustment_id}", command.points - debt_paid, at, at, programme)
    burned = _burn_available(state, -command.points, at) if command.points < 0 else []
    event = ev.PointsAdjusted(
        adjustment_id=command.adjustment_id,
        points=command.points,
        reason=command.reason,
        note=command.note,
        bucket=bucket if command.points > 0 else None,
        buckets=burned,
        debt_paid=debt_paid,
        unexpired=_unexpired(state, burned),
    )
    return [Decided(at, event)]


def _expire_due(state: MemberState, command: cmd.ExpireDue, programme: Programme, now: datetime):
    """One points_expired per bucket still holding points at its expires_at, dated then."""
    decided = []
    for bucket in sorted(state.buckets.values(), key=Bucket.burn_order):
        unrecorded = bucket.remaining - bucket.expired_points_recorded
        if bucket.is_expired(command.as_of) and not bucket.expiry_recorded and unrecorded > 0:
            event = ev.PointsExpired(bucket_id=bucket.bucket_id, points=unrecorded, expires_at=bucket.expires_at)
            decided.append(Decided(bucket.expires_at, event))
    for coupon in state.coupons.values():
        if coupon.status_at(command.as_of) == "expired" and not coupon.expiry_recorded:
            decided.append(Decided(coupon.expires_at, ev.CouponExpired(coupon_id=coupon.coupon_id, expires_at=coupon.expires_at)))
    return decided


def _review_tier(state: MemberState, command: cmd.ReviewTier, programme: Programme, now: datetime):
    """The tier job: move down members whose hold has ended and whose growth no longer supports the tier."""
    at = command.as_of
    if programme.downgrade == "never" or state.hold_until is None or state.hold_until > at:
        return []
    index = programme.tier_index(current_tier(state, programme))
    qualified = programme.tier_index(programme.qualified_tier(rolling_growth(state, at, programme)).name)
    if qualified >= index:
        return []
    target = index - 1 if programme.downgrade == "one_step" else qualified
    event = ev.TierChanged(
        from_tier=programme.tiers[index].name,
        to_tier=programme.tiers[target].name,
        reason="downgrade",
        cause_id=None,
        hold_until=at + timedelta(days=programme.tier_hold_days) if target > 0 else None,
        previous_hold_until=state.hold_until,
    )
    return [Decided(at, event)]


def _birthday_coupon(state: MemberState, command: cmd.IssueBirthdayCoupon, programme: Programme, now: datetime):
    """Once a year, in the birthday month of the programme's timezone."""
    at = command.as_of
    if state.birthday is None or state.enrolled_at is None or state.enrolled_at > at:
        return []
    local = at.astimezone(programme.zone)
    coupon_id = f"birthday-{local.year}"
    if int(state.birthday[:2]) != local.month or coupon_id in state.coupons:
        return []
    return [Decided(at, _coupon_from_template(coupon_id, programme.birthday_coupon, "birthday", at))]


_RULES: dict[type, Callable[..., list[Decided]]] = {
    cmd.Enrol: _enrol,
    cmd.RecordPurchase: _purchase,
    cmd.RecordReturn: _return,
    cmd.Redeem: _redeem,
    cmd.ReverseRedemption: _reverse_redemption,
    cmd.IssueCoupon: _issue_coupon,
    cmd.RedeemCoupon: _redeem_coupon,
    cmd.ReverseCouponRedemption: _reverse_coupon_redemption,
    cmd.VoidCoupon: _void_coupon,
    cmd.Adjust: _adjust,
    cmd.RecordActivity: _activity,
    cmd.ExpireDue: _expire_due,
    cmd.ReviewTier: _review_tier,
    cmd.IssueBirthdayCoupon: _birthday_coupon,
}

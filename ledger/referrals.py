"""Referrals (CONTRACT §6.4): when a referee's first purchase qualifies, and what the referrer gets.

Pure, like ``decide``. A referral spans two members' streams: the referee's
purchase decides the referee's side (its coupon ``referral-1``, with the
purchase); ``referrer_reward`` decides the referrer's side on the referrer's
own state, and the application appends both in one transaction, each stream
at the version its decision saw, so the referrer's ``monthly_cap`` holds
exactly however many referees buy at once.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from events import catalogue as ev
from ledger.programme import Programme
from ledger.state import MemberState
from ledger.views import current_tier

REFEREE_COUPON_ID = "referral-1"
REFEREE_COUPON_SOURCE = "referral"


def qualifies(referee: MemberState, amount_cents: int, at: datetime, programme: Programme) -> bool:
    """This purchase, the referee's first in the log, is large enough and soon enough after enrolment.

    Any first purchase ends the referral, qualifying or not: later ones never qualify.
    """
    if referee.referred_by is None or referee.purchases or referee.enrolled_at is None:
        return False
    rule = programme.referral
    return amount_cents >= rule.min_first_purchase_cents and at < referee.enrolled_at + timedelta(days=rule.within_days)


def referee_coupon(decided_events) -> ev.CouponIssued | None:
    """The referee's referral coupon among a purchase's decided events: the sign that the referrer has a part."""
    return next(
        (e for e in decided_events if type(e) is ev.CouponIssued and e.source == REFEREE_COUPON_SOURCE), None
    )


def rewards_in_month(referrer: MemberState, at: datetime, programme: Programme) -> int:
    """The referrer's referral rewards dated in the programme-local month of ``at``."""
    zone = programme.zone
    month = at.astimezone(zone).strftime("%Y-%m")
    return sum(1 for moment in referrer.referral_rewards.values() if moment.astimezone(zone).strftime("%Y-%m") == month)


def referrer_reward(referrer: MemberState, referee_id: str, at: datetime, programme: Programme) -> ev.PointsEarned | None:
    """The referrer's points for the referee's qualifying purchase at ``at``; None when capped (or worth 0).

    A bucket ``r:<referee_id>``, pending and expiring like a purchase's bucket
    dated at the referee's purchase; the points pay the referrer's debt first.
    """
    rule = programme.referral
    if rule.referrer_points == 0 or referee_id in referrer.referral_rewards:
        return None
    if rule.monthly_cap and rewards_in_month(referrer, at, programme) >= rule.monthly_cap:
        return None
    debt_paid = min(referrer.debt, rule.referrer_points)
    amount = rule.referrer_points - debt_paid
    bucket = None
    if amount > 0:
        expires_at = at + timedelta(days=programme.points_expiry_days)
        bucket = ev.NewBucket(f"r:{referee_id}", amount, at + timedelta(days=programme.pending_days), expires_at)
    return ev.PointsEarned(
        purchase_id=None,
        referral_of=referee_id,
        points=rule.referrer_points,
        growth=0,
        tier=current_tier(referrer, programme),
        tier_pct=100,
        day_pct=100,
        debt_paid=debt_paid,
        bucket=bucket,
    )

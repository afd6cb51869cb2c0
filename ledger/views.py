"""What a member's state shows at a moment: balance, rolling growth, tier.

Pure functions of (state, moment, programme). Balances come from bucket dates,
so they are right before any job has run.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec

from ledger.programme import Programme
from ledger.state import Bucket, MemberState


class Balance(msgspec.Struct, kw_only=True):
    available: int
    pending: int
    debt: int
    expiring_30d: int
    lifetime_earned: int
    lifetime_clawed: int
    lifetime_adjusted: int
    lifetime_redeemed: int
    lifetime_expired: int
    as_of: datetime


class TierView(msgspec.Struct, kw_only=True):
    tier: str
    growth_window: int
    next_tier: str | None
    growth_needed: int
    hold_until: datetime | None


def burnable_buckets(state: MemberState, at: datetime) -> list[tuple[Bucket, int]]:
    """Buckets a burn dated ``at`` may take from, in burn order, with how much each allows."""
    usable = [(b, b.burnable(at)) for b in state.buckets.values() if b.remaining > 0 and b.is_available(at)]
    usable.sort(key=lambda pair: pair[0].burn_order())
    return [(bucket, points) for bucket, points in usable if points > 0]


def available_points(state: MemberState, at: datetime) -> int:
    """Spendable points at ``at``: available buckets minus debt (may be negative)."""
    return sum(b.remaining for b in state.buckets.values() if b.is_available(at)) - state.debt


def balance(state: MemberState, at: datetime) -> Balance:
    pending = available = expiring = expired = 0
    soon = at + timedelta(days=30)
    for bucket in state.buckets.values():
        # Bucket.is_expired / is_pending / is_available, inlined: every answer runs this over every bucket.
        if bucket.expires_at <= at:
            expired += bucket.remaining
        elif at < bucket.available_at:
            pending += bucket.remaining
        else:
            available += bucket.remaining
            if bucket.expires_at <= soon:
                expiring += bucket.remaining
    totals = state.totals
    return Balance(
        available=available - state.debt,
        pending=pending,
        debt=state.debt,
        expiring_30d=expiring,
        lifetime_earned=totals.earned,
        lifetime_clawed=totals.clawed,
        lifetime_adjusted=totals.adjusted,
        lifetime_redeemed=totals.redeemed,
        lifetime_expired=expired,
        as_of=at,
    )


def rolling_growth(state: MemberState, at: datetime, programme: Programme) -> int:
    """Growth of purchases with occurred_at in (at - window, at], net of their returns up to at."""
    window_start = at - timedelta(days=programme.tier_window_days)
    growth = 0
    # A plain loop: this runs on every purchase and return over all of the
    # member's purchases, and a generator with a method call each cost 5x more.
    for purchase in state.purchases.values():
        if window_start < purchase.occurred_at <= at:
            growth += purchase.growth_at(at) if purchase.returns else purchase.growth
    return growth


def current_tier(state: MemberState, programme: Programme) -> str:
    return state.tier or programme.lowest_tier.name


def tier_view(state: MemberState, at: datetime, programme: Programme) -> TierView:
    tier = current_tier(state, programme)
    growth = rolling_growth(state, at, programme)
    following = programme.next_tier(tier)
    return TierView(
        tier=tier,
        growth_window=growth,
        next_tier=following.name if following else None,
        growth_needed=max(following.threshold - growth, 0) if following else 0,
        hold_until=state.hold_until,
    )


def status(state: MemberState) -> str:
    """``prospect`` until the first purchase, then ``member``."""
    return "member" if state.purchases else "prospect"

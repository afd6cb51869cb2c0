"""What a member's state shows at a moment: balance, rolling growth, tier, lifecycle and RFM.

Pure functions of (state, moment, programme). Balances come from bucket dates,
so they are right before any job has run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Iterable

import msgspec

from ledger.commands import Timestamp
from ledger.programme import Programme
from ledger.state import Bucket, MemberState, Purchase

LIFECYCLES = ("prospect", "active", "loyal", "dormant")
LOYAL_WINDOW = timedelta(days=30)
RFM_WINDOW = timedelta(days=365)


class Balance(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    available: int
    pending: int
    debt: int
    expiring_30d: int
    lifetime_earned: int
    lifetime_clawed: int
    lifetime_adjusted: int
    lifetime_redeemed: int
    lifetime_expired: int
    as_of: Timestamp


class TierView(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tier: str
    growth_window: int
    next_tier: str | None
    growth_needed: int
    hold_until: Timestamp | None


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
    """Growth of purchases and activities with occurred_at in (at - window, at], purchases net of their
    returns up to at (§6.3: returns never touch an activity's growth)."""
    return state.growth.within(at - timedelta(days=programme.tier_window_days), at)


def current_tier(state: MemberState, programme: Programme) -> str:
    """The member's tier; one the programme version does not name counts as its lowest (CONTRACT §6.1)."""
    return programme.tier(state.tier).name if state.tier else programme.lowest_tier.name


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


@dataclass(frozen=True)
class Rfm:
    lifecycle: str
    recency_days: int | None
    orders_365d: int
    spend_365d_cents: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "lifecycle": self.lifecycle,
            "recency_days": self.recency_days,
            "orders_365d": self.orders_365d,
            "spend_365d_cents": self.spend_365d_cents,
        }


def rfm(purchases: Iterable[Purchase], now: datetime, programme: Programme) -> Rfm:
    """Lifecycle and RFM at ``now`` from a member's purchases (pure; the members read model and the replay use it).

    Orders count purchases by ``occurred_at`` in (now - window, now];
    spend is net of what was returned of them. A member is a ``prospect``
    until the first purchase, ``dormant`` after ``dormant_after_days``
    without one, ``loyal`` with at least ``loyal_orders_30d`` purchases in
    the last 30 days, else ``active``.
    """
    purchases = list(purchases)
    if not purchases:
        return Rfm("prospect", None, 0, 0)
    last_purchase_at = max(p.occurred_at for p in purchases)
    in_year = [p for p in purchases if now - RFM_WINDOW < p.occurred_at <= now]
    orders_30d = sum(1 for p in purchases if now - LOYAL_WINDOW < p.occurred_at <= now)
    return Rfm(
        lifecycle=lifecycle(last_purchase_at, orders_30d, now, programme),
        recency_days=max((now - last_purchase_at) // timedelta(days=1), 0),
        orders_365d=len(in_year),
        spend_365d_cents=sum(p.amount_cents - p.returned_cents for p in in_year),
    )


def lifecycle(last_purchase_at: datetime | None, orders_30d: int, now: datetime, programme: Programme) -> str:
    if last_purchase_at is None:
        return "prospect"
    if last_purchase_at <= now - timedelta(days=programme.dormant_after_days):
        return "dormant"
    if orders_30d >= programme.loyal_orders_30d:
        return "loyal"
    return "active"

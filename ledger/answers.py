"""The answer a command gives, from the member's state after its events.

Pure: (command, state after, decided events, programme) -> an answer struct,
the type /openapi.json describes (``api/openapi.py``).
Everything but the log position is known once the events are decided, so
the answer is built then, on the state the command leaves (a member's next
command may already be evolving it while this one waits for its commit),
and ``with_position`` completes it when the store has sealed the events.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Sequence, get_type_hints

import msgspec

from events import catalogue as ev
from events.codec import encode_json
from ledger import commands as cmd
from ledger.decide import Decided
from ledger.programme import Programme
from ledger.state import Coupon, CouponStatus, MemberState
from ledger.views import Balance, TierView, available_points, balance, current_tier, rfm, status, tier_view


# -- views: what a coupon and a member show at a moment ----------------------------------------


# A coupon as a member's wallet shows it: its terms as the state holds them (same names, same
# types, times with their offset), its status by date, and the order that redeemed it.
COUPON_TERMS = ("coupon_id", "template", "value_cents", "min_spend_cents", "valid_from", "expires_at", "source",
                "points_cost")
_coupon_types = {name: cmd.Timestamp if t is datetime else t for name, t in get_type_hints(Coupon).items()}
CouponView = msgspec.defstruct(
    "CouponView",
    [(name, _coupon_types[name]) for name in COUPON_TERMS] + [("status", CouponStatus), ("order_ref", str | None)],
    kw_only=True,
    forbid_unknown_fields=True,
    module=__name__,
)


class IdentityView(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: cmd.IdentityType
    value: str


class MemberView(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    member_id: str
    status: Literal["prospect", "member"]
    identities: list[IdentityView]
    birthday: str | None
    enrolled_at: cmd.Timestamp | None
    referred_by: str | None  # CONTRACT §6.4
    referrals_rewarded: int  # referees whose first purchase rewarded this member
    tier: TierView
    balance: Balance
    stream_version: int


class MemberProfile(MemberView, kw_only=True):
    """``GET /v1/members/{id}``: the member view with lifecycle and RFM."""

    lifecycle: Literal["prospect", "active", "loyal", "dormant"]
    recency_days: int | None
    orders_365d: int
    spend_365d_cents: int


def _coupon_fields(coupon: Coupon, at: datetime) -> dict[str, Any]:
    terms = {name: getattr(coupon, name) for name in COUPON_TERMS}
    return {**terms, "status": coupon.status_at(at), "order_ref": coupon.order_ref}


def coupon_view(coupon: Coupon, at: datetime) -> CouponView:
    return CouponView(**_coupon_fields(coupon, at))


def _member_fields(state: MemberState, at: datetime, programme: Programme) -> dict[str, Any]:
    return {
        "member_id": state.member_id,
        "status": status(state),
        "identities": [IdentityView(type=i.type, value=i.value) for i in state.identities],
        "birthday": state.birthday,
        "enrolled_at": state.enrolled_at,
        "referred_by": state.referred_by,
        "referrals_rewarded": len(state.referral_rewards),
        "tier": tier_view(state, at, programme),
        "balance": balance(state, at),
        "stream_version": state.version,
    }


def member_profile(state: MemberState, at: datetime, programme: Programme) -> MemberProfile:
    lifecycle = rfm(state.purchases.values(), at, programme)
    return MemberProfile(**_member_fields(state, at, programme), **lifecycle.as_dict())


# -- command answers ---------------------------------------------------------------------------


class CommandAnswer(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Where the command's last event landed: in the log, and in the member's stream (absent: nothing appended)."""

    position: int | None = None
    stream_version: int | None = None
    dry_run: bool = False  # CONTRACT §6.5: true (and position null) on a dry run only


class EnrolAnswer(MemberView, kw_only=True, omit_defaults=True):
    coupons: list[CouponView]
    position: int | None = None
    dry_run: bool = False  # CONTRACT §6.5: true (and position null) on a dry run only


class Reward(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A campaign's reward to a purchase (CONTRACT §6.2): points, or a coupon (points 0)."""

    campaign_id: str
    points: int
    coupon_id: str | None
class ReferralAnswer(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a referee's qualifying first purchase granted (CONTRACT §6.4); referrer_points 0 when capped."""

    referrer_id: str
    referrer_points: int
    coupon_id: str


class PurchaseAnswer(CommandAnswer, kw_only=True):
    purchase_id: str
    points: int  # regular and campaign points
    base_points: int  # the regular part
    rewards: list[Reward]
    growth: int
    tier: str
    debt_paid: int
    referral: ReferralAnswer | None = None  # absent when nothing was granted


class ReturnAnswer(CommandAnswer, kw_only=True):
    return_id: str
    purchase_id: str
    points_clawed: int
    growth_clawed: int
    debt: int
    written_off: int
    buckets: list[ev.BucketPoints]
    tier: str


class RedemptionAnswer(CommandAnswer, kw_only=True):
    redemption_id: str
    points: int
    consumed: list[ev.BucketPoints]
    available: int


class ReversalAnswer(CommandAnswer, kw_only=True):
    redemption_id: str
    points: int
    restored: list[ev.BucketPoints]
    expired: list[ev.BucketPoints]  # the parts of restored buckets already past expires_at: expired at once
    available: int


# A coupon issued, redeemed, reversed or voided: the coupon as it is now, and where the command landed.
CouponAnswer = msgspec.defstruct(
    "CouponAnswer",
    [(f.name, f.type, f.default) for f in msgspec.structs.fields(CommandAnswer)],
    bases=(CouponView,),
    kw_only=True,
    omit_defaults=True,
    module=__name__,
)


class AdjustmentAnswer(CommandAnswer, kw_only=True):
    adjustment_id: str
    points: int
    reason: str
    buckets: list[ev.BucketPoints]  # a debit: what it took from each bucket; a credit: the bucket it made
    debt_paid: int
    available: int


class ActivityAnswer(CommandAnswer, kw_only=True):
    activity_id: str
    type: str
    points: int
    growth: int
    tier: str


class JobAnswer(CommandAnswer, kw_only=True):
    appended: int


Answer = EnrolAnswer | PurchaseAnswer | ReturnAnswer | RedemptionAnswer | ReversalAnswer | CouponAnswer \
    | AdjustmentAnswer | ActivityAnswer | JobAnswer


def _event(decided: Sequence[Decided], event_type: type[ev.Event]) -> Any:
    return next(d.event for d in decided if type(d.event) is event_type)


def answer(command: cmd.Command, state: MemberState, decided: Sequence[Decided], programme: Programme) -> Answer:
    """The answer without its ``position`` (``with_position`` adds it)."""
    at = decided[0].occurred_at
    return _ANSWERS[type(command)](command, state, decided, programme, at)


def with_position(body: Answer, position: int, stream_version: int) -> bytes:
    """The answer's bytes, with where its last event landed in the log and in the member's stream."""
    return encode_json(msgspec.structs.replace(body, position=position, stream_version=stream_version))


def _enrolled(command, state, decided, programme, at) -> EnrolAnswer:
    coupons = [coupon_view(c, at) for c in state.coupons.values()]
    return EnrolAnswer(**_member_fields(state, at, programme), coupons=coupons)


def _credited(event: ev.PointsEarned | ev.ActivityRecorded, state: MemberState, programme: Programme) -> dict[str, Any]:
    """What a credit (a purchase, a growth task) answers: its points and growth, and the tier after it."""
    return {"points": event.points, "growth": event.growth, "tier": current_tier(state, programme)}


def _purchase(command: cmd.RecordPurchase, state, decided, programme, at) -> PurchaseAnswer:
    earned = _event(decided, ev.PointsEarned)
    # CONTRACT §6.2: points is everything credited, base_points the regular part, rewards in campaign_id order.
    rewards = [
        Reward(
            campaign_id=d.event.campaign_id,
            points=d.event.points if isinstance(d.event, ev.PointsEarned) else 0,
            coupon_id=d.event.coupon_id if isinstance(d.event, ev.CouponIssued) else None,
        )
        for d in decided
        if getattr(d.event, "campaign_id", None) is not None
    ]
    credited = _credited(earned, state, programme)
    credited["points"] += sum(reward.points for reward in rewards)
    debt_paid = sum(d.event.debt_paid for d in decided if isinstance(d.event, ev.PointsEarned))
    return PurchaseAnswer(purchase_id=command.purchase_id, debt_paid=debt_paid, base_points=earned.points,
                          rewards=rewards, **credited)


def _return(command: cmd.RecordReturn, state, decided, programme, at) -> ReturnAnswer:
    clawed = _event(decided, ev.PointsClawedBack)
    return ReturnAnswer(return_id=command.return_id, purchase_id=command.purchase_id, points_clawed=clawed.points,
                        growth_clawed=clawed.growth, debt=state.debt, written_off=clawed.written_off,
                        buckets=clawed.buckets, tier=current_tier(state, programme))


def _redeem(command: cmd.Redeem, state, decided, programme, at) -> RedemptionAnswer:
    redeemed = _event(decided, ev.PointsRedeemed)
    return RedemptionAnswer(redemption_id=command.redemption_id, points=command.points, consumed=redeemed.buckets,
                            available=available_points(state, at))


def _reversal(command: cmd.ReverseRedemption, state, decided, programme, at) -> ReversalAnswer:
    reversed_ = _event(decided, ev.RedemptionReversed)
    return ReversalAnswer(redemption_id=command.redemption_id, points=reversed_.points, restored=reversed_.buckets,
                          expired=reversed_.expired, available=available_points(state, at))


def _coupon(command, state, decided, programme, at) -> CouponAnswer:
    return CouponAnswer(**_coupon_fields(state.coupons[command.coupon_id], at))


def _adjust(command: cmd.Adjust, state, decided, programme, at) -> AdjustmentAnswer:
    adjusted = _event(decided, ev.PointsAdjusted)
    credited = [ev.BucketPoints(adjusted.bucket.bucket_id, adjusted.bucket.amount)] if adjusted.bucket else []
    return AdjustmentAnswer(
        adjustment_id=command.adjustment_id,
        points=command.points,
        reason=command.reason,
        buckets=adjusted.buckets or credited,  # a credit that all paid off debt made no bucket
        debt_paid=adjusted.debt_paid,
        available=available_points(state, at),
    )


def _activity(command: cmd.RecordActivity, state, decided, programme, at) -> ActivityAnswer:
    recorded = _event(decided, ev.ActivityRecorded)
    return ActivityAnswer(activity_id=command.activity_id, type=recorded.type, **_credited(recorded, state, programme))


def _job(command, state, decided, programme, at) -> JobAnswer:
    return JobAnswer(appended=len(decided))


_ANSWERS = {
    cmd.Enrol: _enrolled,
    cmd.RecordPurchase: _purchase,
    cmd.RecordReturn: _return,
    cmd.Redeem: _redeem,
    cmd.ReverseRedemption: _reversal,
    cmd.IssueCoupon: _coupon,
    cmd.RedeemCoupon: _coupon,
    cmd.ReverseCouponRedemption: _coupon,
    cmd.VoidCoupon: _coupon,
    cmd.Adjust: _adjust,
    cmd.RecordActivity: _activity,
    cmd.ExpireDue: _job,
    cmd.ReviewTier: _job,
    cmd.IssueBirthdayCoupon: _job,
}

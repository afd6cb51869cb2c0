"""The answer a command gives, from the member's state after its events.

Pure: (command, state after, decided events, programme) -> JSON-able dict.
Everything but the log position is known once the events are decided, so
the answer is built then, on the state the command leaves (a member's next
command may already be evolving it while this one waits for its commit),
and ``with_position`` completes it when the store has sealed the events.
"""

from __future__ import annotations

from typing import Any, Sequence

from events import catalogue as ev
from events.codec import encode_json
from ledger import commands as cmd
from ledger.decide import Decided
from ledger.programme import Programme
from ledger.state import Coupon, MemberState
from ledger.views import available_points, balance, current_tier, status, tier_view


def coupon_view(coupon: Coupon, at) -> dict[str, Any]:
    return {
        "coupon_id": coupon.coupon_id,
        "template": coupon.template,
        "value_cents": coupon.value_cents,
        "min_spend_cents": coupon.min_spend_cents,
        "valid_from": coupon.valid_from,
        "expires_at": coupon.expires_at,
        "source": coupon.source,
        "points_cost": coupon.points_cost,
        "status": coupon.status_at(at),
        "order_ref": coupon.order_ref,
    }


def member_view(state: MemberState, at, programme: Programme) -> dict[str, Any]:
    return {
        "member_id": state.member_id,
        "status": status(state),
        "identities": [{"type": i.type, "value": i.value} for i in state.identities],
        "birthday": state.birthday,
        "enrolled_at": state.enrolled_at,
        "tier": tier_view(state, at, programme),
        "balance": balance(state, at),
        "stream_version": state.version,
    }


def _event(decided: Sequence[Decided], event_type: type[ev.Event]) -> Any:
    return next(d.event for d in decided if type(d.event) is event_type)


def answer(command: cmd.Command, state: MemberState, decided: Sequence[Decided], programme: Programme) -> dict[str, Any]:
    """The answer without its ``position`` (``with_position`` adds it)."""
    at = decided[0].occurred_at
    return _ANSWERS[type(command)](command, state, decided, programme, at)


def with_position(body: dict[str, Any], position: int, stream_version: int) -> bytes:
    """The answer's bytes, with where its last event landed in the log and in the member's stream."""
    body["position"] = position
    body["stream_version"] = stream_version
    return encode_json(body)


def _enrolled(command, state, decided, programme, at):
    body = member_view(state, at, programme)
    body["coupons"] = [coupon_view(c, at) for c in state.coupons.values()]
    return body


def _purchase(command: cmd.RecordPurchase, state, decided, programme, at):
    earned = _event(decided, ev.PointsEarned)
    return {
        "purchase_id": command.purchase_id,
        "points": earned.points,
        "growth": earned.growth,
        "tier": current_tier(state, programme),
        "debt_paid": earned.debt_paid,
    }


def _return(command: cmd.RecordReturn, state, decided, programme, at):
    clawed = _event(decided, ev.PointsClawedBack)
    return {
        "return_id": command.return_id,
        "purchase_id": command.purchase_id,
        "points_clawed": clawed.points,
        "growth_clawed": clawed.growth,
        "debt": state.debt,
        "written_off": clawed.written_off,
        "buckets": clawed.buckets,
        "tier": current_tier(state, programme),
    }


def _redeem(command: cmd.Redeem, state, decided, programme, at):
    redeemed = _event(decided, ev.PointsRedeemed)
    return {
        "redemption_id": command.redemption_id,
        "points": command.points,
        "consumed": redeemed.buckets,
        "available": available_points(state, at),
    }


def _reversal(command: cmd.ReverseRedemption, state, decided, programme, at):
    reversed_ = _event(decided, ev.RedemptionReversed)
    return {
        "redemption_id": command.redemption_id,
        "points": reversed_.points,
        "restored": reversed_.buckets,
        "expired": reversed_.expired,
        "available": available_points(state, at),
    }


def _coupon(command, state, decided, programme, at):
    return coupon_view(state.coupons[command.coupon_id], at)


def _adjust(command: cmd.Adjust, state, decided, programme, at):
    adjusted = _event(decided, ev.PointsAdjusted)
    return {
        "adjustment_id": command.adjustment_id,
        "points": command.points,
        "reason": command.reason,
        "buckets": adjusted.buckets or ([adjusted.bucket] if adjusted.bucket else []),
        "debt_paid": adjusted.debt_paid,
        "available": available_points(state, at),
    }


def _activity(command: cmd.RecordActivity, state, decided, programme, at):
    recorded = _event(decided, ev.ActivityRecorded)
    return {
        "activity_id": command.activity_id,
        "type": recorded.type,
        "points": recorded.points,
        "growth": recorded.growth,
        "tier": current_tier(state, programme),
    }


def _job(command, state, decided, programme, at):
    return {"appended": len(decided)}


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

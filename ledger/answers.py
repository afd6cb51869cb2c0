"""The answer a command gives, from the member's state after its events.

Pure: (command, state after, recorded envelopes, programme) -> JSON-able dict.
"""

from __future__ import annotations

from typing import Any

from events.envelope import Envelope
from ledger import commands as cmd
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


def _data(recorded: list[Envelope], type_name: str) -> dict[str, Any]:
    return next(e.data for e in recorded if e.type == type_name)


def answer(command: cmd.Command, state: MemberState, recorded: list[Envelope], programme: Programme) -> dict[str, Any]:
    at = recorded[0].occurred_at
    body = _ANSWERS[type(command)](command, state, recorded, programme, at)
    body["position"] = recorded[-1].position
    body["stream_version"] = recorded[-1].stream_version
    return body


def _enrolled(command, state, recorded, programme, at):
    body = member_view(state, at, programme)
    body["coupons"] = [coupon_view(c, at) for c in state.coupons.values()]
    return body


def _purchase(command: cmd.RecordPurchase, state, recorded, programme, at):
    earned = _data(recorded, "points_earned")
    return {
        "purchase_id": command.purchase_id,
        "points": earned["points"],
        "growth": earned["growth"],
        "tier": current_tier(state, programme),
        "debt_paid": earned["debt_paid"],
    }


def _return(command: cmd.RecordReturn, state, recorded, programme, at):
    clawed = _data(recorded, "points_clawed_back")
    return {
        "return_id": command.return_id,
        "purchase_id": command.purchase_id,
        "points_clawed": clawed["points"],
        "growth_clawed": clawed["growth"],
        "debt": state.debt,
        "written_off": clawed["written_off"],
        "buckets": clawed["buckets"],
        "tier": current_tier(state, programme),
    }


def _redeem(command: cmd.Redeem, state, recorded, programme, at):
    redeemed = _data(recorded, "points_redeemed")
    return {
        "redemption_id": command.redemption_id,
        "points": command.points,
        "consumed": redeemed["buckets"],
        "available": available_points(state, at),
    }


def _reversal(command: cmd.ReverseRedemption, state, recorded, programme, at):
    reversed_ = _data(recorded, "redemption_reversed")
    return {
        "redemption_id": command.redemption_id,
        "points": reversed_["points"],
        "restored": reversed_["buckets"],
        "expired": reversed_["expired"],
        "available": available_points(state, at),
    }


def _coupon(command, state, recorded, programme, at):
    return coupon_view(state.coupons[command.coupon_id], at)


def _adjust(command: cmd.Adjust, state, recorded, programme, at):
    adjusted = _data(recorded, "points_adjusted")
    return {
        "adjustment_id": command.adjustment_id,
        "points": command.points,
        "reason": command.reason,
        "buckets": adjusted["buckets"] or ([adjusted["bucket"]] if adjusted["bucket"] else []),
        "debt_paid": adjusted["debt_paid"],
        "available": available_points(state, at),
    }


def _job(command, state, recorded, programme, at):
    return {"appended": len(recorded)}


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
    cmd.ExpireDue: _job,
    cmd.ReviewTier: _job,
    cmd.IssueBirthdayCoupon: _job,
}

"""Read model ``coupons``: every member's coupon wallet.

The stored status is ``issued``, ``redeemed`` or ``voided``; ``expired`` is
read from ``expires_at`` at read time (CONTRACT §2), so a coupon is right
before the expire job has run. One row per coupon, ~200 bytes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Callable

import asyncpg

from events import catalogue as ev
from projections.feed import Decoded, FeedEnvelope
from projections.tables import Rows, Target

NAME = "coupons"
TABLES = ("member_coupons",)
EVENT_TYPES = frozenset({"coupon_issued", "coupon_redeemed", "coupon_redemption_reversed", "coupon_voided"})
STATUSES = ("issued", "redeemed", "expired", "voided")

COLUMNS = (
    "stream_id", "coupon_id", "template", "value_cents", "min_spend_cents", "valid_from", "expires_at", "source",
    "points_cost", "status", "order_ref", "issued_at", "position",
)


def ddl(target: Target) -> list[str]:
    coupons = target.table("member_coupons")
    return [
        f"""CREATE TABLE IF NOT EXISTS {coupons} (
            stream_id       text NOT NULL,
            coupon_id       text NOT NULL,
            template        text NOT NULL,
            value_cents     bigint NOT NULL,
            min_spend_cents bigint NOT NULL,
            valid_from      timestamptz NOT NULL,
            expires_at      timestamptz NOT NULL,
            source          text NOT NULL,
            points_cost     bigint NOT NULL,
            status          text NOT NULL CHECK (status IN ('issued', 'redeemed', 'voided')),
            order_ref       text,
            issued_at       timestamptz NOT NULL,
            position        bigint NOT NULL,
            PRIMARY KEY (stream_id, coupon_id)
        )""",
    ]


async def apply(conn: asyncpg.Connection, batch: list[Decoded], target: Target) -> None:
    coupons = Rows(target.table("member_coupons"), ("stream_id", "coupon_id"), COLUMNS)
    await coupons.load(conn, [(e.stream_id, x.coupon_id) for e, x in batch],
                       created=[(e.stream_id, x.coupon_id) for e, x in batch if type(x) is ev.CouponIssued])
    for envelope, event in batch:
        _APPLIERS[type(event)](coupons, envelope, event)
    await coupons.save(conn)


def _coupon(coupons: Rows, envelope: FeedEnvelope, coupon_id: str) -> dict[str, Any]:
    coupon = coupons.get(envelope.stream_id, coupon_id)
    assert coupon is not None, f"{envelope.type} at {envelope.position} names unknown coupon {coupon_id}"
    return coupons.touch(coupon)


def _issued(coupons: Rows, envelope: FeedEnvelope, event: ev.CouponIssued) -> None:
    coupons.put(
        {
            "stream_id": envelope.stream_id, "coupon_id": event.coupon_id, "template": event.template,
            "value_cents": event.value_cents, "min_spend_cents": event.min_spend_cents,
            "valid_from": event.valid_from, "expires_at": event.expires_at, "source": event.source,
            "points_cost": event.points_cost, "status": "issued", "order_ref": None,
            "issued_at": envelope.occurred_at, "position": envelope.position,
        }
    )


def _redeemed(coupons: Rows, envelope: FeedEnvelope, event: ev.CouponRedeemed) -> None:
    coupon = _coupon(coupons, envelope, event.coupon_id)
    coupon["status"], coupon["order_ref"] = "redeemed", event.order_ref


def _redemption_reversed(coupons: Rows, envelope: FeedEnvelope, event: ev.CouponRedemptionReversed) -> None:
    coupon = _coupon(coupons, envelope, event.coupon_id)
    coupon["status"], coupon["order_ref"] = "issued", None


def _voided(coupons: Rows, envelope: FeedEnvelope, event: ev.CouponVoided) -> None:
    _coupon(coupons, envelope, event.coupon_id)["status"] = "voided"


_APPLIERS: dict[type, Callable[[Rows, FeedEnvelope, Any], None]] = {
    ev.CouponIssued: _issued,
    ev.CouponRedeemed: _redeemed,
    ev.CouponRedemptionReversed: _redemption_reversed,
    ev.CouponVoided: _voided,
}
assert set(_APPLIERS) == {ev.EVENT_TYPES[name] for name in EVENT_TYPES}


def status_at(row: dict[str, Any], at: datetime) -> str:
    """Like ``ledger.state.Coupon.status_at``: an issued coupon past ``expires_at`` is expired."""
    if row["status"] == "issued" and row["expires_at"] <= at:
        return "expired"
    return row["status"]


async def wallet(conn, stream_id: str, at: datetime, target: Target = Target()) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"SELECT {', '.join(COLUMNS)} FROM {target.table('member_coupons')} WHERE stream_id = $1 ORDER BY position",
        stream_id,
    )
    return [{**{k: v for k, v in row.items() if k != "stream_id"}, "status": status_at(row, at)} for row in rows]

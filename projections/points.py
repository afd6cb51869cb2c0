"""Read model ``points``: points buckets and the ledger trail (CONTRACT §4 ``/ledger``).

The trail has one line per bucket a points movement touched, signed, with
the command's id (``ref``), a reason and the member's running balance. A
debt is a bucket of its own here: a claw-back's owed part, and a credit's
part that pays debt off, are lines with ``bucket_id`` null. So the running
balance is always the sum of bucket remainders minus debt, less what the
trail shows as expired: after the expire job has run at T it equals
available + pending as of T.

The trail answers "what was this balance on that date, and why": a
bucket's remainder as of T is the sum of its non-expiry lines up to T, the
debt as of T minus the sum of the null-bucket lines up to T, and the
lifetime totals sums of lines by kind; ``state_as_of`` rebuilds exactly the
parts of the member's state that ``ledger.views.balance`` reads.

Back of the envelope: ~1.3 lines per points event (a burn touches one or
two buckets), ~150 bytes a line; one bucket row (~120 bytes) per credit.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Callable

import asyncpg

from events import catalogue as ev
from ledger.state import Bucket, MemberState, Totals
from projections.feed import Decoded, FeedEnvelope
from projections.tables import Row, Rows, Target, apply_in_memory, insert_rows

NAME = "points"
TABLES = ("point_buckets", "ledger_lines")
EVENT_TYPES = frozenset(
    {
        "points_earned",
        "points_clawed_back",
        "points_redeemed",
        "redemption_reversed",
        "points_expired",
        "points_adjusted",
        "coupon_issued",
    }
)
KINDS = (
    "earn", "campaign", "activity", "referral", "clawback", "redeem", "redeem_reversal", "coupon_purchase", "adjust",
    "expire",
)

BUCKET_COLUMNS = (
    "stream_id", "bucket_id", "ref", "occurred_at", "available_at", "expires_at", "amount", "remaining", "position",
)
LINE_COLUMNS = (
    "stream_id", "line", "position", "occurred_at", "kind", "points", "bucket_id", "ref", "reason", "running_balance",
)


def ddl(target: Target) -> list[str]:
    buckets, lines = (target.table(t) for t in TABLES)
    kinds = ", ".join(f"'{k}'" for k in KINDS)
    return [
        f"""CREATE TABLE IF NOT EXISTS {buckets} (
            stream_id    text NOT NULL,
            bucket_id    text NOT NULL,
            ref          text NOT NULL,          -- the purchase or adjustment that credited it
            occurred_at  timestamptz NOT NULL,
            available_at timestamptz NOT NULL,
            expires_at   timestamptz NOT NULL,
            amount       bigint NOT NULL CHECK (amount > 0),
            remaining    bigint NOT NULL CHECK (remaining BETWEEN 0 AND amount),
            position     bigint NOT NULL,        -- of the credit: the burn order's last tie-break
            PRIMARY KEY (stream_id, bucket_id)
        )""",
        f"""CREATE TABLE IF NOT EXISTS {lines} (
            stream_id       text NOT NULL,
            line            integer NOT NULL CHECK (line >= 1),  -- the member's lines count from 1
            position        bigint NOT NULL,
            occurred_at     timestamptz NOT NULL,
            kind            text NOT NULL CHECK (kind IN ({kinds})),
            points          bigint NOT NULL CHECK (points <> 0),
            bucket_id       text,                -- null: the debt
            ref             text NOT NULL,
            reason          text NOT NULL,
            running_balance bigint NOT NULL,
            PRIMARY KEY (stream_id, line)
        )""",
    ]


# -- apply ----------------------------------------------------------------------------------


class _Batch:
    """Buckets the batch touches, each member's last line, and the lines it appends."""

    def __init__(self, target: Target) -> None:
        self.buckets = Rows(target.table("point_buckets"), ("stream_id", "bucket_id"), BUCKET_COLUMNS)
        self.lines_table = target.table("ledger_lines")
        self.last_line: dict[str, tuple[int, int]] = {}  # stream_id -> (line, running_balance)
        self.new_lines: list[Row] = []

    async def load(self, conn: asyncpg.Connection, batch: list[Decoded]) -> None:
        await self.buckets.load(conn, [(e.stream_id, b) for e, x in batch for b in _buckets_named(x)],
                                created=credited(batch))
        rows = await conn.fetch(  # one index probe per member, however long its trail
            f"""SELECT s.stream_id, last.line, last.running_balance FROM unnest($1::text[]) AS s (stream_id)
                CROSS JOIN LATERAL (SELECT line, running_balance FROM {self.lines_table}
                                    WHERE stream_id = s.stream_id ORDER BY line DESC LIMIT 1) AS last""",
            list({e.stream_id for e, _ in batch}),
        )
        self.last_line = {r["stream_id"]: (r["line"], r["running_balance"]) for r in rows}

    async def save(self, conn: asyncpg.Connection) -> None:
        await self.buckets.save(conn)
        await insert_rows(conn, self.lines_table, LINE_COLUMNS, self.new_lines)

    def bucket(self, envelope: FeedEnvelope, bucket_id: str) -> Row:
        bucket = self.buckets.get(envelope.stream_id, bucket_id)
        assert bucket is not None, f"{envelope.type} at {envelope.position} names unknown bucket {bucket_id}"
        return bucket

    def line(self, envelope: FeedEnvelope, kind: str, points: int, bucket_id: str | None, ref: str, reason: str) -> None:
        if points == 0:
            return
        number, balance = self.last_line.get(envelope.stream_id, (0, 0))
        number, balance = number + 1, balance + points
        self.last_line[envelope.stream_id] = (number, balance)
        self.new_lines.append(
            {
                "stream_id": envelope.stream_id, "line": number, "position": envelope.position,
                "occurred_at": envelope.occurred_at, "kind": kind, "points": points, "bucket_id": bucket_id,
                "ref": ref, "reason": reason, "running_balance": balance,
            }
        )

    def credit(self, envelope: FeedEnvelope, new: ev.NewBucket, ref: str) -> None:
        self.buckets.put(
            {
                "stream_id": envelope.stream_id, "bucket_id": new.bucket_id, "ref": ref,
                "occurred_at": envelope.occurred_at, "available_at": new.available_at, "expires_at": new.expires_at,
                "amount": new.amount, "remaining": new.amount, "position": envelope.position,
            }
        )

    def move(self, envelope: FeedEnvelope, kind: str, parts: list[ev.BucketPoints], sign: int, ref: str, reason: str) -> None:
        """Take points from (sign -1) or give them back to (sign +1) buckets, one line each."""
        for part in parts:
            bucket = self.buckets.touch(self.bucket(envelope, part.bucket_id))
            bucket["remaining"] += sign * part.points
            assert 0 <= bucket["remaining"] <= bucket["amount"], (envelope.position, bucket)
            self.line(envelope, kind, sign * part.points, part.bucket_id, ref, reason)


def credited(batch: list[Decoded]) -> list[tuple[str, str]]:
    """The buckets the batch's credits create (a purchase's earn, a positive adjustment)."""
    return [(e.stream_id, x.bucket.bucket_id) for e, x in batch if getattr(x, "bucket", None) is not None]


def _buckets_named(event: ev.Event) -> list[str]:
    """The existing buckets an event moves points in or out of (loaded before applying)."""
    parts = getattr(event, "buckets", None) or []
    named = [p.bucket_id for p in parts]
    named += [p.bucket_id for p in getattr(event, "expired", []) + getattr(event, "unexpired", [])]
    if type(event) is ev.PointsExpired:
        named.append(event.bucket_id)
    return named


async def apply(conn: asyncpg.Connection, batch: list[Decoded], target: Target) -> None:
    await apply_in_memory(conn, batch, _Batch(target), _APPLIERS)


def _burned(rows: _Batch, envelope: FeedEnvelope, kind: str, event, ref: str, reason: str) -> None:
    """A burn's lines; and, for points the expire job had already written off that this late burn
    (dated before expires_at) spent, a line taking that expiry back: the trail stays equal to the balance."""
    rows.move(envelope, kind, event.buckets, -1, ref, reason)
    for part in event.unexpired:
        rows.bucket(envelope, part.bucket_id)
        rows.line(envelope, "expire", part.points, part.bucket_id, ref, "expiry taken back: spent before expires_at")


def _earned_for(event: ev.PointsEarned) -> tuple[str, str, str]:
    """The ledger kind, ref and reason of a credit: a purchase's, a campaign's, an activity's or a referral's."""
    if event.activity_id is not None:
        return "activity", event.activity_id, "activity"
    if event.referral_of is not None:
        return "referral", event.referral_of, f"referral: first purchase of {event.referral_of}"
    if event.campaign_id is not None:
        return "campaign", event.purchase_id or "", f"campaign {event.campaign_id}"
    return "earn", event.purchase_id or "", "purchase"


def _earned(rows: _Batch, envelope: FeedEnvelope, event: ev.PointsEarned) -> None:
    kind, ref, reason = _earned_for(event)
    if event.bucket is not None:
        rows.credit(envelope, event.bucket, ref)
        rows.line(envelope, kind, event.bucket.amount, event.bucket.bucket_id, ref, reason)
    rows.line(envelope, kind, event.debt_paid, None, ref, f"{reason} pays debt")


def _clawed_back(rows: _Batch, envelope: FeedEnvelope, event: ev.PointsClawedBack) -> None:
    _burned(rows, envelope, "clawback", event, event.return_id, f"return of {event.purchase_id}")
    rows.line(envelope, "clawback", -event.debt, None, event.return_id, f"return of {event.purchase_id}: owed (debt)")
    # A written-off shortfall (absorb) moves no points: no line.


def _redeemed(rows: _Batch, envelope: FeedEnvelope, event: ev.PointsRedeemed) -> None:
    reason = f"redemption for order {event.order_ref}" if event.order_ref else "redemption"
    _burned(rows, envelope, "redeem", event, event.redemption_id, reason)


def _reversed(rows: _Batch, envelope: FeedEnvelope, event: ev.RedemptionReversed) -> None:
    rows.move(envelope, "redeem_reversal", event.buckets, +1, event.redemption_id, "redemption reversed")
    for part in event.expired:
        # Restored into a bucket already past expires_at: expired at once.
        rows.bucket(envelope, part.bucket_id)
        rows.line(envelope, "expire", -part.points, part.bucket_id, event.redemption_id, "restored after expiry")


def _expired(rows: _Batch, envelope: FeedEnvelope, event: ev.PointsExpired) -> None:
    bucket = rows.bucket(envelope, event.bucket_id)
    rows.line(envelope, "expire", -event.points, event.bucket_id, bucket["ref"], "expired")


def _adjusted(rows: _Batch, envelope: FeedEnvelope, event: ev.PointsAdjusted) -> None:
    if event.bucket is not None:
        rows.credit(envelope, event.bucket, event.adjustment_id)
        rows.line(envelope, "adjust", event.bucket.amount, event.bucket.bucket_id, event.adjustment_id, event.reason)
    rows.line(envelope, "adjust", event.debt_paid, None, event.adjustment_id, f"{event.reason} (pays debt)")
    _burned(rows, envelope, "adjust", event, event.adjustment_id, event.reason)


def _coupon_bought(rows: _Batch, envelope: FeedEnvelope, event: ev.CouponIssued) -> None:
    _burned(rows, envelope, "coupon_purchase", event, event.coupon_id, f"coupon {event.template}")


_APPLIERS: dict[type, Callable[[_Batch, FeedEnvelope, Any], None]] = {
    ev.PointsEarned: _earned,
    ev.PointsClawedBack: _clawed_back,
    ev.PointsRedeemed: _redeemed,
    ev.RedemptionReversed: _reversed,
    ev.PointsExpired: _expired,
    ev.PointsAdjusted: _adjusted,
    ev.CouponIssued: _coupon_bought,
}
assert set(_APPLIERS) == {ev.EVENT_TYPES[name] for name in EVENT_TYPES}


# -- reads ------------------------------------------------------------------------------------


async def ledger_page(conn, stream_id: str, after_line: int, limit: int, target: Target = Target()) -> list[dict]:
    """The member's trail lines after line ``after_line``, at most ``limit``, in log order."""
    rows = await conn.fetch(  # ::bigint: a client's ``after`` may exceed the column's integer range
        f"""SELECT {', '.join(LINE_COLUMNS)} FROM {target.table('ledger_lines')}
            WHERE stream_id = $1 AND line > $2::bigint ORDER BY line LIMIT $3""",
        stream_id, after_line, limit,
    )
    return [{k: v for k, v in row.items() if k != "stream_id"} for row in rows]


# Lifetime totals as sums of trail lines by kind (expiry lines are read from dates instead).
_TOTAL_SIGNS = {
    "earned": {"earn": 1, "campaign": 1, "activity": 1, "referral": 1},
    "clawed": {"clawback": -1},
    "adjusted": {"adjust": 1},
    "redeemed": {"redeem": -1, "coupon_purchase": -1, "redeem_reversal": -1},
}


async def state_as_of(conn, stream_id: str, at: datetime, target: Target = Target()) -> MemberState:
    """The buckets, debt and lifetime totals of the member as the events up to ``at`` made them."""
    lines = target.table("ledger_lines")
    sums = await conn.fetch(
        f"""SELECT kind, bucket_id IS NULL AS owed, sum(points)::bigint AS points FROM {lines}
            WHERE stream_id = $1 AND occurred_at <= $2 AND kind <> 'expire' GROUP BY kind, owed""",
        stream_id, at,
    )
    totals = Totals()
    for name, signs in _TOTAL_SIGNS.items():
        setattr(totals, name, sum(signs.get(r["kind"], 0) * r["points"] for r in sums))
    state = MemberState(member_id=stream_id, totals=totals, debt=-sum(r["points"] for r in sums if r["owed"]))
    buckets = await conn.fetch(
        f"""SELECT b.bucket_id, b.ref, b.occurred_at, b.available_at, b.expires_at, b.amount, b.position,
                   sum(l.points)::bigint AS remaining
            FROM {target.table('point_buckets')} b
            JOIN {lines} l ON l.stream_id = b.stream_id AND l.bucket_id = b.bucket_id
            WHERE b.stream_id = $1 AND l.occurred_at <= $2 AND l.kind <> 'expire'
            GROUP BY b.bucket_id, b.ref, b.occurred_at, b.available_at, b.expires_at, b.amount, b.position""",
        stream_id, at,
    )
    for row in buckets:
        state.buckets[row["bucket_id"]] = Bucket(
            bucket_id=row["bucket_id"], ref=row["ref"], occurred_at=row["occurred_at"],
            available_at=row["available_at"], expires_at=row["expires_at"], amount=row["amount"],
            remaining=row["remaining"], version=row["position"],
        )
    return state

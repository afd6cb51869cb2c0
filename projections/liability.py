"""Read model ``liability``: the programme's points liability, as of any time, by month.

Every points movement is a set of deltas to the lifetime totals, each at a
business time. Expiry is read from bucket dates (CONTRACT §2), and it is
additive too: whatever a bucket still holds at its ``expires_at`` expires
then. So a credit of A points into a bucket adds ``expired += A`` at the
bucket's ``expires_at``, and a movement of p points out of (into) it at
time t subtracts (adds) p there, at ``max(t, expires_at)``: a reversal that
restores points into an expired bucket expires them at once. Summing the
deltas up to T gives, exactly, the sum over members of their balance's
lifetime totals as of T, and

    outstanding = earned - clawed + adjusted - redeemed - expired

is the sum over members of available + pending (the contract's identity).

Deltas are kept twice: by exact moment (``liability_moments``) and rolled
up by calendar month in the programme's timezone (``liability_months``).
An answer as of T reads the whole months that ended by T and the moments of
T's own month only, so its cost is bounded by one month's movements,
however long the history. Back of the envelope: ~2 moment rows per points
event (the movement and its expiry-date counterpart), ~70 bytes each.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, Callable
from zoneinfo import ZoneInfo

import asyncpg

from events import catalogue as ev
from ledger.programme import Programme
from projections import points
from projections.feed import Decoded, FeedEnvelope
from projections.tables import Rows, Target, upsert

NAME = "liability"
TABLES = ("liability_buckets", "liability_moments", "liability_months")
EVENT_TYPES = frozenset(
    {"points_earned", "points_clawed_back", "points_redeemed", "redemption_reversed", "points_adjusted", "coupon_issued"}
)
FIGURES = ("earned", "clawed", "adjusted", "redeemed", "expired")  # by month
SUMS = FIGURES + ("debt",)  # debt is a total only


def ddl(target: Target) -> list[str]:
    buckets, moments, months = (target.table(t) for t in TABLES)
    sums = ",\n".join(f"            {name} bigint NOT NULL DEFAULT 0" for name in SUMS)
    return [
        # Which bucket expires when: burns name buckets, the expiry delta needs the date.
        f"""CREATE TABLE IF NOT EXISTS {buckets} (
            stream_id  text NOT NULL,
            bucket_id  text NOT NULL,
            expires_at timestamptz NOT NULL,
            PRIMARY KEY (stream_id, bucket_id)
        )""",
        f"""CREATE TABLE IF NOT EXISTS {moments} (
            at timestamptz PRIMARY KEY,
{sums}
        )""",
        f"""CREATE TABLE IF NOT EXISTS {months} (
            month     text PRIMARY KEY,      -- 2025-01, in the programme's timezone
            starts_at timestamptz NOT NULL,
            ends_at   timestamptz NOT NULL,
{sums}
        )""",
        f"CREATE INDEX IF NOT EXISTS {months}_by_end ON {months} (ends_at)",
    ]


def month_of(at: datetime, zone: ZoneInfo) -> tuple[str, datetime, datetime]:
    """The calendar month (programme timezone) holding ``at``: its label, start and end in UTC."""
    local = at.astimezone(zone)
    starts = datetime(local.year, local.month, 1, tzinfo=zone)
    ends = datetime(local.year + local.month // 12, local.month % 12 + 1, 1, tzinfo=zone)
    return f"{local.year:04d}-{local.month:02d}", starts.astimezone(timezone.utc), ends.astimezone(timezone.utc)


# -- apply ----------------------------------------------------------------------------------


class _Deltas:
    """The batch's deltas, summed by moment, and the bucket expiry dates they need."""

    def __init__(self, target: Target) -> None:
        self.buckets = Rows(target.table("liability_buckets"), ("stream_id", "bucket_id"), ("stream_id", "bucket_id", "expires_at"))
        self.by_moment: dict[datetime, dict[str, int]] = defaultdict(lambda: dict.fromkeys(SUMS, 0))

    def add(self, at: datetime, figure: str, amount: int) -> None:
        if amount:
            self.by_moment[at][figure] += amount

    def credit(self, envelope: FeedEnvelope, bucket: ev.NewBucket | None) -> None:
        if bucket is None:
            return
        self.buckets.put({"stream_id": envelope.stream_id, "bucket_id": bucket.bucket_id, "expires_at": bucket.expires_at})
        self.add(bucket.expires_at, "expired", bucket.amount)

    def move(self, envelope: FeedEnvelope, parts: list[ev.BucketPoints], sign: int) -> None:
        """Points out of (sign -1) or back into (+1) buckets change what expires, and when."""
        for part in parts:
            bucket = self.buckets.get(envelope.stream_id, part.bucket_id)
            assert bucket is not None, f"{envelope.type} at {envelope.position} names unknown bucket {part.bucket_id}"
            self.add(max(envelope.occurred_at, bucket["expires_at"]), "expired", sign * part.points)


async def apply(conn: asyncpg.Connection, batch: list[Decoded], target: Target) -> None:
    deltas = _Deltas(target)
    await deltas.buckets.load(conn, [(e.stream_id, p.bucket_id) for e, x in batch for p in getattr(x, "buckets", [])],
                              created=points.credited(batch))
    for envelope, event in batch:
        _APPLIERS[type(event)](deltas, envelope.occurred_at, envelope, event)
    await deltas.buckets.save(conn)
    await _save_moments(conn, deltas.by_moment, target)
    await _save_months(conn, deltas.by_moment, target)


def _earned(deltas: _Deltas, at: datetime, envelope: FeedEnvelope, event: ev.PointsEarned) -> None:
    deltas.add(at, "earned", event.points)
    deltas.add(at, "debt", -event.debt_paid)
    deltas.credit(envelope, event.bucket)


def _clawed_back(deltas: _Deltas, at: datetime, envelope: FeedEnvelope, event: ev.PointsClawedBack) -> None:
    deltas.add(at, "clawed", event.points - event.written_off)
    deltas.add(at, "debt", event.debt)
    deltas.move(envelope, event.buckets, -1)


def _redeemed(deltas: _Deltas, at: datetime, envelope: FeedEnvelope, event: ev.PointsRedeemed) -> None:
    deltas.add(at, "redeemed", event.points)
    deltas.move(envelope, event.buckets, -1)


def _reversed(deltas: _Deltas, at: datetime, envelope: FeedEnvelope, event: ev.RedemptionReversed) -> None:
    deltas.add(at, "redeemed", -event.points)
    deltas.move(envelope, event.buckets, +1)  # event.expired is implied by the dates


def _adjusted(deltas: _Deltas, at: datetime, envelope: FeedEnvelope, event: ev.PointsAdjusted) -> None:
    deltas.add(at, "adjusted", event.points)
    deltas.add(at, "debt", -event.debt_paid)
    deltas.credit(envelope, event.bucket)
    deltas.move(envelope, event.buckets, -1)


def _coupon_bought(deltas: _Deltas, at: datetime, envelope: FeedEnvelope, event: ev.CouponIssued) -> None:
    deltas.add(at, "redeemed", event.points_cost)
    deltas.move(envelope, event.buckets, -1)


_APPLIERS: dict[type, Callable[[_Deltas, datetime, FeedEnvelope, Any], None]] = {
    ev.PointsEarned: _earned,
    ev.PointsClawedBack: _clawed_back,
    ev.PointsRedeemed: _redeemed,
    ev.RedemptionReversed: _reversed,
    ev.PointsAdjusted: _adjusted,
    ev.CouponIssued: _coupon_bought,
}
assert set(_APPLIERS) == {ev.EVENT_TYPES[name] for name in EVENT_TYPES}

_ADD_SUMS = ", ".join(f"{name} = t.{name} + excluded.{name}" for name in SUMS)


async def _save_moments(conn: asyncpg.Connection, by_moment: dict[datetime, dict[str, int]], target: Target) -> None:
    await upsert(conn, target.table("liability_moments"), ("at",), ("at", *SUMS),
                 [{"at": at, **sums} for at, sums in sorted(by_moment.items())], _ADD_SUMS)


async def _save_months(conn: asyncpg.Connection, by_moment: dict[datetime, dict[str, int]], target: Target) -> None:
    zone = target.programme.zone
    by_month: dict[tuple[str, datetime, datetime], dict[str, int]] = defaultdict(lambda: dict.fromkeys(SUMS, 0))
    for at, sums in by_moment.items():
        month = by_month[month_of(at, zone)]
        for name in SUMS:
            month[name] += sums[name]
    await upsert(conn, target.table("liability_months"), ("month",), ("month", "starts_at", "ends_at", *SUMS),
                 [{"month": label, "starts_at": starts_at, "ends_at": ends_at, **sums}
                  for (label, starts_at, ends_at), sums in sorted(by_month.items())], _ADD_SUMS)


# -- reads ------------------------------------------------------------------------------------


async def liability(conn, at: datetime, programme: Programme, target: Target = Target()) -> dict[str, Any]:
    """CONTRACT §4 ``/v1/programme/liability``: totals as of ``at`` and the figures by month."""
    label, starts_at, _ends_at = month_of(at, programme.zone)
    columns = ", ".join(SUMS)
    months = await conn.fetch(
        f"SELECT month, {columns} FROM {target.table('liability_months')} WHERE ends_at <= $1 ORDER BY month", at
    )
    partial = await conn.fetchrow(
        f"""SELECT {', '.join(f'coalesce(sum({n}), 0)::bigint AS {n}' for n in SUMS)}
            FROM {target.table('liability_moments')} WHERE at >= $1 AND at <= $2""",
        starts_at, at,
    )
    rows = [dict(r) for r in months] + [{"month": label, **dict(partial)}]
    totals = {name: sum(r[name] for r in rows) for name in SUMS}
    by_month, outstanding = [], 0
    for row in rows:
        # Each month also says what was outstanding at its end (as of ``at`` for the last one),
        # so the console charts the liability without a rule of its own.
        outstanding += _outstanding(row)
        if any(row[n] for n in FIGURES):
            by_month.append({"month": row["month"], **{n: row[n] for n in FIGURES}, "outstanding": outstanding})
    assert outstanding == _outstanding(totals)
    return {"as_of": at, **totals, "outstanding": outstanding, "by_month": by_month}


def _outstanding(figures: dict[str, int]) -> int:
    """CONTRACT §2's identity: what members hold (available + pending), summed."""
    return figures["earned"] - figures["clawed"] + figures["adjusted"] - figures["redeemed"] - figures["expired"]

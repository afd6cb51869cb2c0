"""Read model ``members``: member summary, purchases, returns and tier history.

Serves the segment listings (lifecycle) and, with the ``points`` model, the
auditors' replay (tier as of any time). Everything time-dependent
(lifecycle, RFM, rolling growth) is computed at read time from stored dates,
with the caller's clock, so rows never go stale as time passes.

Back of the envelope: one summary row per member (~200 bytes), one purchase
row per purchase (~120 bytes), one return row per return, one tier row per
tier change. 10 million members with 50 purchases each: ~60 GB of purchases,
all keyed by stream_id first so a member's rows sit together.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Callable

import asyncpg

from events import catalogue as ev
from ledger.programme import Programme
from ledger.state import Activity, MemberState, Purchase
from ledger.views import LOYAL_WINDOW, rfm
from projections.feed import Decoded, FeedEnvelope
from projections.tables import Row, Rows, Target, apply_in_memory, insert_rows

NAME = "members"
TABLES = ("member_summary", "member_purchases", "member_returns", "member_tiers", "member_activities")
EVENT_TYPES = frozenset(
    {
        "member_enrolled",
        "purchase_recorded",
        "points_earned",
        "purchase_returned",
        "points_clawed_back",
        "points_redeemed",
        "redemption_reversed",
        "points_adjusted",
        "coupon_issued",
        "tier_changed",
        "activity_recorded",
    }
)

SUMMARY_COLUMNS = (
    "stream_id", "enrolled_at", "birthday", "status", "tier", "hold_until", "debt",
    "lifetime_earned", "lifetime_clawed", "lifetime_adjusted", "lifetime_redeemed", "lifetime_written_off",
    "first_purchase_at", "last_purchase_at", "referred_by", "referrals_rewarded",
)
PURCHASE_COLUMNS = (
    "stream_id", "purchase_id", "store_id", "occurred_at", "amount_cents", "points", "growth", "returned_cents", "position",
)
RETURN_COLUMNS = ("stream_id", "return_id", "purchase_id", "occurred_at", "amount_cents", "points", "growth", "position")
TIER_COLUMNS = ("stream_id", "position", "occurred_at", "from_tier", "to_tier", "reason", "cause_id", "hold_until")
ACTIVITY_COLUMNS = ("stream_id", "position", "activity_id", "type", "occurred_at", "points", "growth", "ref")


def ddl(target: Target) -> list[str]:
    summary, purchases, returns, tiers, activities = (target.table(t) for t in TABLES)
    return [
        f"""CREATE TABLE IF NOT EXISTS {summary} (
            stream_id            text PRIMARY KEY,
            enrolled_at          timestamptz,
            birthday             text,
            status               text NOT NULL CHECK (status IN ('prospect', 'member')),
            tier                 text,          -- null: the programme's lowest tier
            hold_until           timestamptz,
            debt                 bigint NOT NULL CHECK (debt >= 0),
            lifetime_earned      bigint NOT NULL,
            lifetime_clawed      bigint NOT NULL,
            lifetime_adjusted    bigint NOT NULL,
            lifetime_redeemed    bigint NOT NULL,
            lifetime_written_off bigint NOT NULL,
            first_purchase_at    timestamptz,
            last_purchase_at     timestamptz,
            referred_by          text,           -- CONTRACT §6.4
            referrals_rewarded   integer NOT NULL DEFAULT 0
        )""",
        # A table made before referrals (§6.4) gains their columns.
        f"""ALTER TABLE {summary} ADD COLUMN IF NOT EXISTS referred_by text,
            ADD COLUMN IF NOT EXISTS referrals_rewarded integer NOT NULL DEFAULT 0""",
        # Dormant and active segments are ranges of last_purchase_at.
        f"CREATE INDEX IF NOT EXISTS {summary}_by_last_purchase ON {summary} (last_purchase_at)",
        f"""CREATE TABLE IF NOT EXISTS {purchases} (
            stream_id      text NOT NULL,
            purchase_id    text NOT NULL,
            store_id       text NOT NULL,
            occurred_at    timestamptz NOT NULL,
            amount_cents   bigint NOT NULL,
            points         bigint NOT NULL,
            growth         bigint NOT NULL,
            returned_cents bigint NOT NULL CHECK (returned_cents BETWEEN 0 AND amount_cents),
            position       bigint NOT NULL,
            PRIMARY KEY (stream_id, purchase_id)
        )""",
        f"""CREATE TABLE IF NOT EXISTS {returns} (
            stream_id    text NOT NULL,
            return_id    text NOT NULL,
            purchase_id  text NOT NULL,
            occurred_at  timestamptz NOT NULL,
            amount_cents bigint NOT NULL,
            points       bigint NOT NULL,
            growth       bigint NOT NULL,
            position     bigint NOT NULL,
            PRIMARY KEY (stream_id, return_id)
        )""",
        f"""CREATE TABLE IF NOT EXISTS {tiers} (
            stream_id   text NOT NULL,
            position    bigint NOT NULL,
            occurred_at timestamptz NOT NULL,
            from_tier   text NOT NULL,
            to_tier     text NOT NULL,
            reason      text NOT NULL,
            cause_id    text,
            hold_until  timestamptz,
            PRIMARY KEY (stream_id, position)
        )""",
        # A member's page of activities reads by position; the rolling growth of the replay by date.
        f"""CREATE TABLE IF NOT EXISTS {activities} (
            stream_id   text NOT NULL,
            position    bigint NOT NULL,
            activity_id text NOT NULL,
            type        text NOT NULL,
            occurred_at timestamptz NOT NULL,
            points      bigint NOT NULL,
            growth      bigint NOT NULL,
            ref         text,
            PRIMARY KEY (stream_id, position)
        )""",
    ]


# -- apply ----------------------------------------------------------------------------


class _Batch:
    """The rows one batch of events touches, and the tier rows it appends."""

    def __init__(self, target: Target) -> None:
        summary, purchases, returns, tiers, activities = (target.table(t) for t in TABLES)
        self.summaries = Rows(summary, ("stream_id",), SUMMARY_COLUMNS)
        self.purchases = Rows(purchases, ("stream_id", "purchase_id"), PURCHASE_COLUMNS)
        self.returns = Rows(returns, ("stream_id", "return_id"), RETURN_COLUMNS)
        self.tiers_table = tiers
        self.new_tiers: list[Row] = []
        self.activities_table = activities
        self.new_activities: list[Row] = []

    async def load(self, conn: asyncpg.Connection, batch: list[Decoded]) -> None:
        # type(x) is, not isinstance: 0.48 us an event on these structs, twice per event here
        await self.summaries.load(conn, [(e.stream_id,) for e, _ in batch],
                                  created=[(e.stream_id,) for e, x in batch if type(x) is ev.MemberEnrolled])
        await self.purchases.load(conn, [(e.stream_id, x.purchase_id) for e, x in batch
                                         if getattr(x, "purchase_id", None) is not None],
                                  created=[(e.stream_id, x.purchase_id) for e, x in batch
                                           if type(x) is ev.PurchaseRecorded])
        await self.returns.load(conn, [(e.stream_id, x.return_id) for e, x in batch if hasattr(x, "return_id")],
                                created=[(e.stream_id, x.return_id) for e, x in batch
                                         if type(x) is ev.PurchaseReturned])

    async def save(self, conn: asyncpg.Connection) -> None:
        await self.summaries.save(conn)
        await self.purchases.save(conn)
        await self.returns.save(conn)
        await insert_rows(conn, self.tiers_table, TIER_COLUMNS, self.new_tiers)
        await insert_rows(conn, self.activities_table, ACTIVITY_COLUMNS, self.new_activities)


async def apply(conn: asyncpg.Connection, batch: list[Decoded], target: Target) -> None:
    await apply_in_memory(conn, batch, _Batch(target), _APPLIERS)


def _summary(rows: _Batch, envelope: FeedEnvelope) -> Row:
    summary = rows.summaries.get(envelope.stream_id)
    assert summary is not None, f"{envelope.type} at {envelope.position} before the member's enrolment"
    return rows.summaries.touch(summary)


def _enrolled(rows: _Batch, envelope: FeedEnvelope, event: ev.MemberEnrolled) -> None:
    rows.summaries.put(
        {
            "stream_id": envelope.stream_id, "enrolled_at": envelope.occurred_at, "birthday": event.birthday,
            "status": "prospect", "tier": None, "hold_until": None, "debt": 0,
            "lifetime_earned": 0, "lifetime_clawed": 0, "lifetime_adjusted": 0, "lifetime_redeemed": 0,
            "lifetime_written_off": 0, "first_purchase_at": None, "last_purchase_at": None,
            "referred_by": event.referred_by, "referrals_rewarded": 0,
        }
    )


def _purchase_recorded(rows: _Batch, envelope: FeedEnvelope, event: ev.PurchaseRecorded) -> None:
    at = envelope.occurred_at
    rows.purchases.put(
        {
            "stream_id": envelope.stream_id, "purchase_id": event.purchase_id, "store_id": event.store_id,
            "occurred_at": at, "amount_cents": event.amount_cents, "points": 0, "growth": 0,
            "returned_cents": 0, "position": envelope.position,
        }
    )
    summary = _summary(rows, envelope)
    summary["status"] = "member"
    # Late purchases arrive out of business-time order: keep the extremes.
    summary["first_purchase_at"] = min(filter(None, (summary["first_purchase_at"], at)))
    summary["last_purchase_at"] = max(filter(None, (summary["last_purchase_at"], at)))


def _points_earned(rows: _Batch, envelope: FeedEnvelope, event: ev.PointsEarned) -> None:
    if event.purchase_id is not None:
        purchase = _purchase(rows, envelope, event.purchase_id)
        if event.campaign_id is None:
            purchase["points"], purchase["growth"] = event.points, event.growth
        else:  # a campaign's reward: the purchase's earned (what returns claw from) includes it
            purchase["points"] += event.points
    summary = _summary(rows, envelope)
    summary["lifetime_earned"] += event.points
    summary["debt"] -= event.debt_paid
    if event.referral_of is not None:
        summary["referrals_rewarded"] += 1


def _purchase(rows: _Batch, envelope: FeedEnvelope, purchase_id: str) -> Row:
    purchase = rows.purchases.get(envelope.stream_id, purchase_id)
    assert purchase is not None, f"{envelope.type} at {envelope.position} names unknown purchase {purchase_id}"
    return rows.purchases.touch(purchase)


def _purchase_returned(rows: _Batch, envelope: FeedEnvelope, event: ev.PurchaseReturned) -> None:
    _purchase(rows, envelope, event.purchase_id)["returned_cents"] = event.returned_total_cents
    rows.returns.put(
        {
            "stream_id": envelope.stream_id, "return_id": event.return_id, "purchase_id": event.purchase_id,
            "occurred_at": envelope.occurred_at, "amount_cents": event.amount_cents, "points": 0, "growth": 0,
            "position": envelope.position,
        }
    )


def _points_clawed_back(rows: _Batch, envelope: FeedEnvelope, event: ev.PointsClawedBack) -> None:
    returned = rows.returns.get(envelope.stream_id, event.return_id)
    assert returned is not None, f"claw-back at {envelope.position} for unknown return {event.return_id}"
    returned["points"], returned["growth"] = event.points, event.growth
    rows.returns.touch(returned)
    summary = _summary(rows, envelope)
    # Written-off points (absorb) are not clawed: CONTRACT §2.
    summary["lifetime_clawed"] += event.points - event.written_off
    summary["lifetime_written_off"] += event.written_off
    summary["debt"] += event.debt


def _points_redeemed(rows: _Batch, envelope: FeedEnvelope, event: ev.PointsRedeemed) -> None:
    _summary(rows, envelope)["lifetime_redeemed"] += event.points


def _redemption_reversed(rows: _Batch, envelope: FeedEnvelope, event: ev.RedemptionReversed) -> None:
    _summary(rows, envelope)["lifetime_redeemed"] -= event.points


def _points_adjusted(rows: _Batch, envelope: FeedEnvelope, event: ev.PointsAdjusted) -> None:
    summary = _summary(rows, envelope)
    summary["lifetime_adjusted"] += event.points
    summary["debt"] -= event.debt_paid


def _coupon_issued(rows: _Batch, envelope: FeedEnvelope, event: ev.CouponIssued) -> None:
    _summary(rows, envelope)["lifetime_redeemed"] += event.points_cost


def _tier_changed(rows: _Batch, envelope: FeedEnvelope, event: ev.TierChanged) -> None:
    summary = _summary(rows, envelope)
    summary["tier"], summary["hold_until"] = event.to_tier, event.hold_until
    rows.new_tiers.append(
        {
            "stream_id": envelope.stream_id, "position": envelope.position, "occurred_at": envelope.occurred_at,
            "from_tier": event.from_tier, "to_tier": event.to_tier, "reason": event.reason,
            "cause_id": event.cause_id, "hold_until": event.hold_until,
        }
    )


def _activity_recorded(rows: _Batch, envelope: FeedEnvelope, event: ev.ActivityRecorded) -> None:
    _summary(rows, envelope)
    rows.new_activities.append(
        {
            "stream_id": envelope.stream_id, "position": envelope.position, "activity_id": event.activity_id,
            "type": event.type, "occurred_at": envelope.occurred_at, "points": event.points,
            "growth": event.growth, "ref": event.ref,
        }
    )


_APPLIERS: dict[type, Callable[[_Batch, FeedEnvelope, Any], None]] = {
    ev.MemberEnrolled: _enrolled,
    ev.PurchaseRecorded: _purchase_recorded,
    ev.PointsEarned: _points_earned,
    ev.PurchaseReturned: _purchase_returned,
    ev.PointsClawedBack: _points_clawed_back,
    ev.PointsRedeemed: _points_redeemed,
    ev.RedemptionReversed: _redemption_reversed,
    ev.PointsAdjusted: _points_adjusted,
    ev.CouponIssued: _coupon_issued,
    ev.TierChanged: _tier_changed,
    ev.ActivityRecorded: _activity_recorded,
}
assert set(_APPLIERS) == {ev.EVENT_TYPES[name] for name in EVENT_TYPES}


# -- reads: segments (lifecycle and RFM are ledger.views' rules) --------------------------------


def _purchase_of(row: asyncpg.Record) -> Purchase:
    return Purchase(
        purchase_id=row["purchase_id"], store_id=row["store_id"], amount_cents=row["amount_cents"],
        occurred_at=row["occurred_at"], points=row["points"], growth=row["growth"],
        returned_cents=row["returned_cents"],
    )


async def segment_page(
    conn, lifecycle_name: str, after: str, limit: int, now: datetime, programme: Programme, target: Target = Target()
) -> list[dict[str, Any]]:
    """Members in one lifecycle at ``now``, by member id after ``after``; at most ``limit``.

    The SQL CASE is ``ledger.views.lifecycle``, written over the stored dates;
    each listed member's RFM is then computed by ``rfm`` itself, which
    asserts the two agree.
    """
    summary, purchases = target.table("member_summary"), target.table("member_purchases")
    rows = await conn.fetch(
        f"""SELECT s.stream_id, s.tier, s.last_purchase_at FROM {summary} s
            LEFT JOIN LATERAL (SELECT count(*) AS orders_30d FROM {purchases} p
                               WHERE p.stream_id = s.stream_id AND p.occurred_at > $4 AND p.occurred_at <= $5) recent
                ON true
            WHERE s.stream_id > $1 AND CASE
                WHEN s.last_purchase_at IS NULL THEN 'prospect'
                WHEN s.last_purchase_at <= $3 THEN 'dormant'
                WHEN recent.orders_30d >= $6 THEN 'loyal'
                ELSE 'active' END = $7
            ORDER BY s.stream_id LIMIT $2""",
        after, limit, now - timedelta(days=programme.dormant_after_days), now - LOYAL_WINDOW, now,
        programme.loyal_orders_30d, lifecycle_name,
    )
    bought = await purchases_of(conn, [r["stream_id"] for r in rows], target)
    listed = []
    for row in rows:
        member_rfm = rfm(bought.get(row["stream_id"], []), now, programme)
        assert member_rfm.lifecycle == lifecycle_name, (row["stream_id"], member_rfm, lifecycle_name)
        listed.append(
            {
                "member_id": row["stream_id"],
                "tier": row["tier"] or programme.lowest_tier.name,
                "last_purchase_at": row["last_purchase_at"],
                **member_rfm.as_dict(),
            }
        )
    return listed


async def purchases_of(conn, stream_ids: list[str], target: Target = Target()) -> dict[str, list[Purchase]]:
    rows = await conn.fetch(
        f"SELECT * FROM {target.table('member_purchases')} WHERE stream_id = ANY($1::text[]) ORDER BY position",
        stream_ids,
    )
    bought: dict[str, list[Purchase]] = {}
    for row in rows:
        bought.setdefault(row["stream_id"], []).append(_purchase_of(row))
    return bought


# -- reads: the member as of a time (for the replay) --------------------------------------


async def state_as_of(conn, stream_id: str, at: datetime, target: Target = Target()) -> MemberState | None:
    """The parts of the member's state the tier view reads, as events up to ``at`` made them.

    Tier and hold come from the last tier change in log order with
    ``occurred_at <= at``; rolling growth from the purchases, returns and
    activities up to ``at``.
    """
    summary = await conn.fetchrow(
        f"SELECT stream_id, enrolled_at FROM {target.table('member_summary')} WHERE stream_id = $1", stream_id
    )
    if summary is None or summary["enrolled_at"] > at:
        return None
    tier = await conn.fetchrow(
        f"""SELECT to_tier, hold_until FROM {target.table('member_tiers')}
            WHERE stream_id = $1 AND occurred_at <= $2 ORDER BY position DESC LIMIT 1""",
        stream_id, at,
    )
    state = MemberState(member_id=stream_id, tier=tier["to_tier"] if tier else None,
                        hold_until=tier["hold_until"] if tier else None)
    purchases = await conn.fetch(
        f"""SELECT * FROM {target.table('member_purchases')} WHERE stream_id = $1 AND occurred_at <= $2
            ORDER BY position""",
        stream_id, at,
    )
    for row in purchases:
        purchase = state.purchases[row["purchase_id"]] = _purchase_of(row)
        state.growth.add(purchase.occurred_at, purchase.growth)
    returns = await conn.fetch(
        f"""SELECT purchase_id, occurred_at, growth FROM {target.table('member_returns')}
            WHERE stream_id = $1 AND occurred_at <= $2 ORDER BY position""",
        stream_id, at,
    )
    for row in returns:
        purchase = state.purchases.get(row["purchase_id"])
        if purchase is not None:
            state.growth.take_back(purchase.occurred_at, row["occurred_at"], row["growth"])
    activities = await conn.fetch(
        f"""SELECT * FROM {target.table('member_activities')} WHERE stream_id = $1 AND occurred_at <= $2
            ORDER BY position""",
        stream_id, at,
    )
    for row in activities:
        state.activities[row["activity_id"]] = Activity(
            activity_id=row["activity_id"], type=row["type"], occurred_at=row["occurred_at"], points=row["points"],
            growth=row["growth"], ref=row["ref"], version=row["position"],
        )
        state.growth.add(row["occurred_at"], row["growth"])
    return state

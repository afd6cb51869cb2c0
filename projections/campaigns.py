"""Read model ``campaigns``: every campaign with its live counters (CONTRACT §6.2).

A campaign row holds the definition as ``campaign_created`` gave it, the
``ended_at`` of ``campaign_ended``, and what the campaign has granted:
``awarded_points`` (campaign ``points_earned``), ``awarded_coupons``
(campaign ``coupon_issued``) and ``members_rewarded`` (distinct members, one
``campaign_members`` row each). Returns never reduce them. ``status`` is read
from the dates at read time.

Back of the envelope: one row per campaign (~1 KB), one ~60-byte row per
member rewarded by a campaign; every points_earned and coupon_issued passes
through the apply, but only campaign rewards touch a row.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Callable

import asyncpg
import msgspec

from events import catalogue as ev
from ledger.campaigns import Campaign, Spend, campaign_of
from projections.feed import Decoded, FeedEnvelope
from projections.tables import Rows, Target, apply_in_memory

NAME = "campaigns"
TABLES = ("campaigns", "campaign_members")
EVENT_TYPES = frozenset({"campaign_created", "campaign_ended", "points_earned", "coupon_issued"})

COLUMNS = (
    "campaign_id", "name", "starts_at", "ends_at", "ended_at", "conditions", "reward", "budget_points",
    "budget_coupons", "per_member_limit", "per_member_period", "awarded_points", "awarded_coupons",
    "members_rewarded", "position",
)
MEMBER_COLUMNS = ("campaign_id", "stream_id")
STATUSES = ("scheduled", "active", "ended")


def ddl(target: Target) -> list[str]:
    campaigns, members = (target.table(t) for t in TABLES)
    return [
        f"""CREATE TABLE IF NOT EXISTS {campaigns} (
            campaign_id       text PRIMARY KEY,
            name              text NOT NULL,
            starts_at         timestamptz NOT NULL,
            ends_at           timestamptz NOT NULL,
            ended_at          timestamptz,
            conditions        text NOT NULL,   -- JSON, as campaign_created holds it
            reward            text NOT NULL,   -- JSON
            budget_points     bigint,
            budget_coupons    bigint,
            per_member_limit  bigint,
            per_member_period text NOT NULL,
            awarded_points    bigint NOT NULL CHECK (awarded_points >= 0),
            awarded_coupons   bigint NOT NULL CHECK (awarded_coupons >= 0),
            members_rewarded  bigint NOT NULL CHECK (members_rewarded >= 0),
            position          bigint NOT NULL  -- of campaign_created
        )""",
        f"""CREATE TABLE IF NOT EXISTS {members} (
            campaign_id text NOT NULL,
            stream_id   text NOT NULL,
            PRIMARY KEY (campaign_id, stream_id)
        )""",
    ]


class _Batch:
    def __init__(self, target: Target) -> None:
        self.campaigns = Rows(target.table("campaigns"), ("campaign_id",), COLUMNS)
        self.members = Rows(target.table("campaign_members"), MEMBER_COLUMNS, MEMBER_COLUMNS)

    async def load(self, conn: asyncpg.Connection, batch: list[Decoded]) -> None:
        created = [(x.campaign_id,) for _, x in batch if type(x) is ev.CampaignCreated]
        named = [(x.campaign_id,) for _, x in batch if getattr(x, "campaign_id", None) is not None]
        await self.campaigns.load(conn, named, created=created)
        await self.members.load(
            conn, [(x.campaign_id, e.stream_id) for e, x in batch if _is_reward(x)]
        )

    async def save(self, conn: asyncpg.Connection) -> None:
        await self.campaigns.save(conn)
        await self.members.save(conn)

    def campaign(self, envelope: FeedEnvelope, campaign_id: str) -> dict[str, Any]:
        row = self.campaigns.get(campaign_id)
        assert row is not None, f"{envelope.type} at {envelope.position} names unknown campaign {campaign_id}"
        return self.campaigns.touch(row)

    def rewarded(self, envelope: FeedEnvelope, campaign_id: str, points: int, coupons: int) -> None:
        row = self.campaign(envelope, campaign_id)
        row["awarded_points"] += points
        row["awarded_coupons"] += coupons
        if self.members.get(campaign_id, envelope.stream_id) is None:
            self.members.put({"campaign_id": campaign_id, "stream_id": envelope.stream_id})
            row["members_rewarded"] += 1


def _is_reward(event: Any) -> bool:
    return type(event) in (ev.PointsEarned, ev.CouponIssued) and event.campaign_id is not None


async def apply(conn: asyncpg.Connection, batch: list[Decoded], target: Target) -> None:
    await apply_in_memory(conn, batch, _Batch(target), _APPLIERS)


_json = msgspec.json.Encoder(order="sorted")


def _created(rows: _Batch, envelope: FeedEnvelope, event: ev.CampaignCreated) -> None:
    rows.campaigns.put(
        {
            "campaign_id": event.campaign_id, "name": event.name, "starts_at": event.starts_at,
            "ends_at": event.ends_at, "ended_at": None, "conditions": _json.encode(event.conditions).decode(),
            "reward": _json.encode(event.reward).decode(), "budget_points": event.budget_points,
            "budget_coupons": event.budget_coupons, "per_member_limit": event.per_member_limit,
            "per_member_period": event.per_member_period, "awarded_points": 0, "awarded_coupons": 0,
            "members_rewarded": 0, "position": envelope.position,
        }
    )


def _ended(rows: _Batch, envelope: FeedEnvelope, event: ev.CampaignEnded) -> None:
    rows.campaign(envelope, event.campaign_id)["ended_at"] = event.ended_at


def _points(rows: _Batch, envelope: FeedEnvelope, event: ev.PointsEarned) -> None:
    if event.campaign_id is not None:
        rows.rewarded(envelope, event.campaign_id, event.points, 0)


def _coupon(rows: _Batch, envelope: FeedEnvelope, event: ev.CouponIssued) -> None:
    if event.campaign_id is not None:
        rows.rewarded(envelope, event.campaign_id, 0, 1)


_APPLIERS: dict[type, Callable[[_Batch, FeedEnvelope, Any], None]] = {
    ev.CampaignCreated: _created,
    ev.CampaignEnded: _ended,
    ev.PointsEarned: _points,
    ev.CouponIssued: _coupon,
}
assert set(_APPLIERS) == {ev.EVENT_TYPES[name] for name in EVENT_TYPES}


# -- reads ------------------------------------------------------------------------------------


def _campaign(row) -> Campaign:
    created = ev.CampaignCreated(
        campaign_id=row["campaign_id"], name=row["name"], starts_at=row["starts_at"], ends_at=row["ends_at"],
        conditions=msgspec.json.decode(row["conditions"]), reward=msgspec.json.decode(row["reward"]),
        budget_points=row["budget_points"], budget_coupons=row["budget_coupons"],
        per_member_limit=row["per_member_limit"], per_member_period=row["per_member_period"],
    )
    campaign = campaign_of(created)
    campaign.ended_at = row["ended_at"]
    return campaign


def view(row, now: datetime) -> dict[str, Any]:
    """The campaign as ``GET /v1/campaigns/{id}`` shows it."""
    spend = Spend(row["awarded_points"], row["awarded_coupons"], row["members_rewarded"])
    return _campaign(row).view(now, spend)


async def campaign(conn, campaign_id: str, now: datetime, target: Target = Target()) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        f"SELECT {', '.join(COLUMNS)} FROM {target.table('campaigns')} WHERE campaign_id = $1", campaign_id
    )
    return None if row is None else view(row, now)


def _status_sql(status: str | None) -> str:
    """The SQL form of ``Campaign.status_at`` ($3 is now), so a page filters before its limit."""
    return {
        None: "$3::timestamptz IS NOT NULL",
        "ended": "(ends_at <= $3 OR ended_at <= $3)",
        "active": "(starts_at <= $3 AND ends_at > $3 AND (ended_at IS NULL OR ended_at > $3))",
        "scheduled": "(starts_at > $3 AND ends_at > $3 AND (ended_at IS NULL OR ended_at > $3))",
    }[status]


async def campaign_page(
    conn, after: str, limit: int, now: datetime, status: str | None = None, target: Target = Target()
) -> list[dict[str, Any]]:
    """Campaigns after ``after`` in campaign_id (byte) order, of one status or all, at most ``limit``."""
    rows = await conn.fetch(
        f"""SELECT {', '.join(COLUMNS)} FROM {target.table('campaigns')}
            WHERE campaign_id COLLATE "C" > $1 AND {_status_sql(status)}
            ORDER BY campaign_id COLLATE "C" LIMIT $2""",
        after, limit, now,
    )
    return [view(row, now) for row in rows]

"""The auditors' replay: recompute from the log alone, compare with the projections.

For every member (or one), the member's events are folded with the pure
domain functions (``ledger.state.fold``), and the answers of
``ledger.views.balance`` and ``tier_view`` as of T are compared with the
same views over the state the projections give as of T
(``points.state_as_of``, ``members.state_as_of``). The projections' rows
themselves (summary, purchases, buckets, coupons) are compared with the
folded state too, and, for the whole programme, the liability as of T with
the sum of every member's balance; and every campaign's row (its end and its
counters) with the ``$campaigns`` stream and the members' campaign rewards.

Everything is read in one repeatable-read snapshot, and each projection is
compared with the log up to its own checkpoint, so a projector running
meanwhile cannot cause a false alarm. Memory is bounded by one page of
members and their events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable

import msgspec

from events.envelope import Envelope
from ledger.application import fact_of
from ledger.campaigns import CAMPAIGNS_STREAM, CampaignBook
from ledger.programme import Programme
from ledger.state import MemberState, fold
from ledger.store import envelope_from_row
from ledger.views import balance, status, tier_view
from projections import campaigns, liability, members, points
from projections.runtime import PROJECTIONS

MEMBERS_PER_PAGE = 200
_COLUMNS = ("position, stream_id, stream_version, type, schema_version, occurred_at, recorded_at,"
            " command_id, actor, programme_version, data::text AS data, hash")
LIABILITY_FIGURES = ("earned", "clawed", "adjusted", "redeemed", "expired", "debt", "outstanding")


@dataclass
class ReplayReport:
    as_of: datetime
    head: int
    positions: dict[str, int]
    members_checked: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def summary(self) -> str:
        compared = ", ".join(f"{name} at {position}" for name, position in self.positions.items())
        verdict = "agree" if self.ok else f"DISAGREE in {len(self.mismatches)} place(s)"
        summary = (f"replayed {self.members_checked} member(s) as of {self.as_of.isoformat()}; log head {self.head};"
                   f" projections ({compared}) {verdict} with the log")
        behind = [name for name, position in self.positions.items() if position < self.head]
        if behind:  # an agreement on part of the log is no verdict on the rest
            summary += (f"; {', '.join(behind)} not caught up: only the events they have applied were compared"
                        " (run `loyalty serve` or `loyalty project` until they reach the head, then replay again)")
        return summary


def differences(what: str, from_log: Any, from_projection: Any) -> list[str]:
    """Readable lines, one per field that differs: ``what: field: log X, projection Y``."""
    log_fields, projection_fields = _as_dict(from_log), _as_dict(from_projection)
    return [
        f"{what}: {name}: log {log_fields.get(name)!r}, projection {projection_fields.get(name)!r}"
        for name in sorted(set(log_fields) | set(projection_fields))
        if log_fields.get(name) != projection_fields.get(name)
    ]


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, msgspec.Struct):
        return msgspec.structs.asdict(value)
    return dict(value)


class UnfoldableLog(Exception):
    """The pure fold refused the member's events (up to a position, as of a time): a finding, not a crash."""


class _Member:
    """One member's events, folded up to any position and time (each fold done once)."""

    def __init__(self, member_id: str, envelopes: list[Envelope]) -> None:
        self.member_id = member_id
        self.envelopes = envelopes
        self._folds: dict[tuple[int, datetime | None], MemberState] = {}

    def state(self, position: int, at: datetime | None = None) -> MemberState:
        key = (position, at)
        if key not in self._folds:
            try:
                self._folds[key] = fold(
                    fact_of(e) for e in self.envelopes
                    if e.position <= position and (at is None or e.occurred_at <= at)
                )
            except (KeyError, AssertionError, LookupError) as error:
                when = f" as of {at.isoformat()}" if at else ""
                raise UnfoldableLog(f"the log up to position {position}{when} cannot be folded: {error!r}") from error
        return self._folds[key]


async def replay(
    pool,
    programme: Programme,
    as_of: datetime,
    member_id: str | None = None,
    progress: Callable[[int], Any] | None = None,
) -> ReplayReport:
    async with pool.acquire() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            head = await conn.fetchval("SELECT position FROM event_head")
            rows = await conn.fetch("SELECT name, position FROM projection_checkpoints WHERE name = ANY($1::text[])",
                                    list(PROJECTIONS))
            report = ReplayReport(as_of, head, {r["name"]: r["position"] for r in rows})
            for name in PROJECTIONS:
                report.positions.setdefault(name, 0)
            totals = dict.fromkeys(LIABILITY_FIGURES, 0)
            rewards: dict[str, dict[str, Any]] = {}
            unfoldable = 0
            async for page in _member_pages(conn, member_id, max(report.positions.values())):
                for member in page:
                    _count_rewards(rewards, member, report.positions["campaigns"])
                    try:
                        report.mismatches += await _compare_member(conn, member, report.positions, as_of, programme)
                        _add_liability(totals, member.state(report.positions["liability"], as_of), as_of)
                    except UnfoldableLog as finding:
                        report.mismatches.append(f"member {member.member_id}: {finding}")
                        unfoldable += 1
                report.members_checked += len(page)
                if progress is not None:
                    progress(len(page))
            if member_id is None and unfoldable:
                report.mismatches.append(f"programme liability not compared: {unfoldable} member(s) could not be folded")
            elif member_id is None:
                projected = await liability.liability(conn, as_of, programme)
                report.mismatches += differences(f"programme liability as of {as_of.isoformat()}", totals,
                                                 {k: projected[k] for k in LIABILITY_FIGURES})
            if member_id is None:
                report.mismatches += await _compare_campaigns(conn, report.positions["campaigns"], rewards)
    return report


def _count_rewards(rewards: dict[str, dict[str, Any]], member: _Member, position: int) -> None:
    """The member's campaign rewards up to ``position``, added to each campaign's counters."""
    for envelope in member.envelopes:
        campaign_id = envelope.data.get("campaign_id")
        if envelope.position > position or campaign_id is None:
            continue
        counters = rewards.setdefault(
            campaign_id, {"awarded_points": 0, "awarded_coupons": 0, "members": set()}
        )
        if envelope.type == "points_earned":
            counters["awarded_points"] += envelope.data["points"]
        elif envelope.type == "coupon_issued":
            counters["awarded_coupons"] += 1
        counters["members"].add(member.member_id)


async def _compare_campaigns(conn, position: int, rewards: dict[str, dict[str, Any]]) -> list[str]:
    """Each campaign as the log has it up to ``position`` against its row in the read model."""
    book = CampaignBook()
    for row in await conn.fetch(
        f"""SELECT {_COLUMNS} FROM events WHERE stream_id = $1 AND position <= $2 ORDER BY stream_version""",
        CAMPAIGNS_STREAM, position,
    ):
        book.evolve(fact_of(envelope_from_row(row)).event)
    rows = {r["campaign_id"]: r for r in await conn.fetch(f"SELECT {', '.join(campaigns.COLUMNS)} FROM campaigns")}
    found = []
    for campaign_id in sorted(set(book.campaigns) | set(rows) | set(rewards)):
        campaign = book.campaigns.get(campaign_id)
        counted = rewards.get(campaign_id, {"awarded_points": 0, "awarded_coupons": 0, "members": set()})
        from_log = None if campaign is None else {
            "ended_at": campaign.ended_at, "awarded_points": counted["awarded_points"],
            "awarded_coupons": counted["awarded_coupons"], "members_rewarded": len(counted["members"]),
        }
        row = rows.get(campaign_id)
        projected = None if row is None else {name: row[name] for name in (
            "ended_at", "awarded_points", "awarded_coupons", "members_rewarded")}
        found += differences(f"campaign {campaign_id}", from_log, projected)
    return found


async def count_members(pool) -> int:
    return await pool.fetchval("SELECT count(*) FROM events WHERE stream_version = 1 AND stream_id NOT LIKE '$%'")


async def _member_pages(conn, member_id: str | None, upto: int):
    """Pages of members (by id) with their events up to ``upto``."""
    after = ""
    while True:
        ids = [
            r["stream_id"]
            for r in await conn.fetch(
                """SELECT stream_id FROM events WHERE stream_version = 1 AND stream_id > $1
                   AND stream_id NOT LIKE '$%' AND ($3::text IS NULL OR stream_id = $3)
                   ORDER BY stream_id LIMIT $2""",
                after, MEMBERS_PER_PAGE, member_id,
            )
        ]
        if not ids:
            return
        rows = await conn.fetch(
            f"""SELECT {_COLUMNS} FROM events WHERE stream_id = ANY($1::text[]) AND position <= $2
                ORDER BY stream_id, stream_version""",
            ids, upto,
        )
        by_member: dict[str, list[Envelope]] = {i: [] for i in ids}
        for row in rows:
            by_member[row["stream_id"]].append(envelope_from_row(row))
        yield [_Member(i, by_member[i]) for i in ids]
        after = ids[-1]


def _add_liability(totals: dict[str, int], state: MemberState, at: datetime) -> None:
    # Not "if enrolled": a purchase may be dated before its member's enrolment, and its points count.
    b = balance(state, at)
    for name, value in (("earned", b.lifetime_earned), ("clawed", b.lifetime_clawed),
                        ("adjusted", b.lifetime_adjusted), ("redeemed", b.lifetime_redeemed),
                        ("expired", b.lifetime_expired), ("debt", b.debt), ("outstanding", b.available + b.pending)):
        totals[name] += value


async def _compare_member(conn, member: _Member, positions: dict[str, int], at: datetime,
                          programme: Programme) -> list[str]:
    who = f"member {member.member_id}"
    when = at.isoformat()
    found: list[str] = []

    # Balance as of T: the log's fold against the state the trail and buckets give.
    log_state = member.state(positions["points"], at)
    projected = await points.state_as_of(conn, member.member_id, at)
    found += differences(f"{who}: balance as of {when}", balance(log_state, at), balance(projected, at))

    # Tier as of T.
    log_state = member.state(positions["members"], at)
    projected_tiers = await members.state_as_of(conn, member.member_id, at)
    if log_state.enrolled or projected_tiers is not None:
        found += differences(
            f"{who}: tier as of {when}",
            tier_view(log_state, at, programme) if log_state.enrolled else None,
            tier_view(projected_tiers, at, programme) if projected_tiers is not None else None,
        )

    # The projections' rows against the whole fold up to each checkpoint.
    found += await _compare_summary(conn, who, member.state(positions["members"]))
    found += await _compare_rows(conn, f"{who}: bucket", "point_buckets", "bucket_id", member.member_id,
                                 _buckets_of(member.state(positions["points"])), _BUCKET_FIELDS)
    found += await _compare_rows(conn, f"{who}: purchase", "member_purchases", "purchase_id", member.member_id,
                                 _purchases_of(member.state(positions["members"])), _PURCHASE_FIELDS)
    found += await _compare_rows(conn, f"{who}: coupon", "member_coupons", "coupon_id", member.member_id,
                                 _coupons_of(member.state(positions["coupons"])), _COUPON_FIELDS)
    return found


async def _compare_summary(conn, who: str, state: MemberState) -> list[str]:
    if not state.enrolled:
        return []  # not enrolled at the checkpoint: no summary to compare
    expected = {
        "enrolled_at": state.enrolled_at,
        "birthday": state.birthday,
        "status": status(state),
        "tier": state.tier,
        "hold_until": state.hold_until,
        "debt": state.debt,
        "lifetime_earned": state.totals.earned,
        "lifetime_clawed": state.totals.clawed,
        "lifetime_adjusted": state.totals.adjusted,
        "lifetime_redeemed": state.totals.redeemed,
        "lifetime_written_off": state.totals.written_off,
        "first_purchase_at": min((p.occurred_at for p in state.purchases.values()), default=None),
        "last_purchase_at": state.last_purchase_at,
    }
    row = await conn.fetchrow("SELECT * FROM member_summary WHERE stream_id = $1", state.member_id)
    if row is None:
        return [f"{who}: summary: missing from the projection"]
    return differences(f"{who}: summary", expected, {k: row[k] for k in expected})


_BUCKET_FIELDS = ("ref", "occurred_at", "available_at", "expires_at", "amount", "remaining")
_PURCHASE_FIELDS = ("store_id", "occurred_at", "amount_cents", "points", "growth", "returned_cents")
_COUPON_FIELDS = ("template", "value_cents", "min_spend_cents", "valid_from", "expires_at", "source", "points_cost",
                  "status", "order_ref")


def _buckets_of(state: MemberState) -> dict[str, dict[str, Any]]:
    return {b.bucket_id: {f: getattr(b, f) for f in _BUCKET_FIELDS} for b in state.buckets.values()}


def _purchases_of(state: MemberState) -> dict[str, dict[str, Any]]:
    return {p.purchase_id: {f: getattr(p, f) for f in _PURCHASE_FIELDS} for p in state.purchases.values()}


def _coupons_of(state: MemberState) -> dict[str, dict[str, Any]]:
    return {c.coupon_id: {f: getattr(c, f) for f in _COUPON_FIELDS} for c in state.coupons.values()}


async def _compare_rows(conn, what: str, table: str, key: str, member_id: str,
                        expected: dict[str, dict[str, Any]], fields: Iterable[str]) -> list[str]:
    rows = await conn.fetch(f"SELECT {key}, {', '.join(fields)} FROM {table} WHERE stream_id = $1", member_id)
    found = {r[key]: {f: r[f] for f in fields} for r in rows}
    lines = []
    for row_id in sorted(set(expected) | set(found)):
        if row_id not in found:
            lines.append(f"{what} {row_id}: missing from the projection")
        elif row_id not in expected:
            lines.append(f"{what} {row_id}: in the projection but not in the log")
        else:
            lines += differences(f"{what} {row_id}", expected[row_id], found[row_id])
    return lines


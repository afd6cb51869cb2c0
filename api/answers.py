"""The answers of the reads and operations that are no ledger command, as msgspec types.

Every answer type forbids unknown fields, so its schema says
``additionalProperties: false`` and a field a handler adds without
declaring it fails the response checks. A handler encodes one of these (or a ``ledger.answers`` / ``ledger.views``
type), and its ``Route.answer`` names the same type, so /openapi.json
describes exactly what is sent and schemathesis's response checks hold the
handlers to it. Rows read from the projections go through ``msgspec.convert``
into these types, so a column that drifts from its type fails loudly.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from api.auth import Role
from events.envelope import Envelope
from ledger.answers import CouponView
from ledger.campaigns import Conditions, Period, Reward
from ledger.commands import Timestamp
from ledger.programme import ProgrammeSettings
from ledger.views import LIFECYCLES
from projections.campaigns import STATUSES
from projections.liability import FIGURES
from projections.points import KINDS
from projections.runtime import PROJECTIONS

Lifecycle = Literal[LIFECYCLES]  # type: ignore[valid-type]  (the names are ledger.views')


class CouponWallet(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    coupons: list[CouponView]


class IdentityOwner(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    member_id: str


class EventsPage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    events: list[Envelope]
    next_after: int | None  # a position (the feed) or a stream_version (a member's stream); null on the last page


class LedgerLine(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    line: int
    position: int
    occurred_at: Timestamp
    kind: Literal[KINDS]  # type: ignore[valid-type]
    points: int
    bucket_id: str | None  # null: the owed part of a claw-back (debt)
    ref: str
    reason: str
    running_balance: int


class LedgerPage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    lines: list[LedgerLine]
    next_after: int | None


class LiabilityMonth(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    month: str
    earned: int
    clawed: int
    adjusted: int
    redeemed: int
    expired: int
    outstanding: int  # at the month's end (as of the read's time for the last month)


assert set(LiabilityMonth.__struct_fields__) == {"month", *FIGURES, "outstanding"}


class Liability(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    as_of: Timestamp
    earned: int
    clawed: int
    adjusted: int
    redeemed: int
    expired: int
    debt: int
    outstanding: int
    by_month: list[LiabilityMonth]


class SegmentMember(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    member_id: str
    tier: str
    last_purchase_at: Timestamp | None
    lifecycle: Lifecycle
    recency_days: int | None
    orders_365d: int
    spend_365d_cents: int


class Segment(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    lifecycle: Lifecycle
    as_of: Timestamp
    members: list[SegmentMember]
    next_after: str | None  # a member id


class RebuildProgress(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    position: int
    target_position: int


class ProjectionStatus(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    name: str
    position: int
    head: int
    lag_events: int
    lag_seconds: float
    state: Literal["live", "rebuilding", "failed"]
    rebuild: RebuildProgress | None = None  # present while a rebuild runs beside the live tables
    reason: str | None = None  # the publisher's (CONTRACT §7), while it is failed: why it cannot publish


class Projections(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    projections: list[ProjectionStatus]


class RebuildStarted(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Literal[tuple(PROJECTIONS)]  # type: ignore[valid-type]
    state: Literal["rebuilding"]


class JobFailure(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    member_id: str
    error: str  # the refusal's problem, or the exception


class JobReport(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    job: str
    as_of: Timestamp
    appended: int
    position: int | None  # the log's head after the job; null on a dry run
    failed: int  # members whose job command failed; the job went on past them
    failures: list[JobFailure]  # the first 20 of them
    dry_run: bool = False  # CONTRACT §6.5: true on a dry run only


class ProgrammeVersionView(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A programme version as ``GET /v1/programme`` shows it (CONTRACT §6.1)."""

    version: int
    effective_from: Timestamp | None  # null: in force for all time before the next version
    settings: ProgrammeSettings


class ProgrammeChanged(ProgrammeVersionView, kw_only=True, forbid_unknown_fields=True):
    position: int


class ProgrammeVersionEntry(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    version: int
    effective_from: Timestamp | None
    recorded_at: Timestamp | None
    actor: str | None  # the key's name that appended it; null for a version seeded at start


class ProgrammeVersions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    versions: list[ProgrammeVersionEntry]


class CampaignView(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A campaign with its live counters, as ``GET /v1/campaigns/{id}`` shows it (CONTRACT §6.2)."""

    campaign_id: str
    name: str
    starts_at: Timestamp
    ends_at: Timestamp
    ended_at: Timestamp | None
    conditions: Conditions
    reward: Reward
    budget_points: int | None
    budget_coupons: int | None
    per_member_limit: int | None
    per_member_period: Period
    status: Literal[STATUSES]  # type: ignore[valid-type]  (at the time of the read)
    awarded_points: int
    awarded_coupons: int
    members_rewarded: int


class CampaignChanged(CampaignView, kw_only=True, forbid_unknown_fields=True):
    position: int | None  # null on a dry run
    dry_run: bool = False  # CONTRACT §6.5: true on a dry run only


class CampaignPage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    campaigns: list[CampaignView]
    next_after: str | None  # a campaign id; null on the last page


class CreatedKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    key: str  # shown once: only its SHA-256 is stored
    key_id: str
    name: str
    role: Role


class Status(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    status: Literal["ok", "ready"]

"""The event catalogue: one tagged msgspec struct per event type.

Events are facts, named in the past tense, never renamed. The tag is the
envelope's ``type``; the struct's fields are the envelope's ``data``. Every
points movement lists the buckets it touched (``BucketPoints``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Union

import msgspec


class Event(msgspec.Struct, kw_only=True, frozen=True, tag_field="type"):
    """Base of every event's data."""


class Identity(msgspec.Struct, frozen=True):
    type: str
    value: str


class BucketPoints(msgspec.Struct, frozen=True):
    """Points moved into or out of one bucket."""

    bucket_id: str
    points: int


class NewBucket(msgspec.Struct, frozen=True):
    """A bucket created by a credit (purchase earn or positive adjustment)."""

    bucket_id: str
    amount: int
    available_at: datetime
    expires_at: datetime


class MemberEnrolled(Event, tag="member_enrolled", kw_only=True):
    member_id: str
    identities: list[Identity]
    birthday: str | None = None
    referred_by: str | None = None


class IdentityLinked(Event, tag="identity_linked", kw_only=True):
    identity_type: str
    value: str


class PurchaseRecorded(Event, tag="purchase_recorded", kw_only=True):
    purchase_id: str
    store_id: str
    amount_cents: int


class PointsEarned(Event, tag="points_earned", kw_only=True):
    # What earned the points: a purchase, or an activity (§6.3; then
    # purchase_id is null, growth is on activity_recorded, tier_pct and
    # day_pct are 100: no multiplier applies).
    purchase_id: str | None
    points: int
    growth: int
    tier: str
    tier_pct: int
    day_pct: int
    # The bucket gets ``points - debt_paid``: credits pay debt first.
    debt_paid: int
    bucket: NewBucket | None
    activity_id: str | None = None
    # Set on a campaign's reward for the purchase (CONTRACT §6.2): its own
    # bucket ``c:<campaign_id>:<purchase_id>``, growth 0.
    campaign_id: str | None = None
    # A referrer's reward for a referee's first purchase (§6.4): the referee's member id;
    # purchase_id is null then, growth 0, bucket r:<referee_id>.
    referral_of: str | None = None


class PurchaseReturned(Event, tag="purchase_returned", kw_only=True):
    return_id: str
    purchase_id: str
    amount_cents: int
    returned_total_cents: int


class PointsClawedBack(Event, tag="points_clawed_back", kw_only=True):
    return_id: str
    purchase_id: str
    points: int
    growth: int
    buckets: list[BucketPoints]
    # The part no bucket could cover: owed as debt, or written off (absorb).
    debt: int
    written_off: int
    # Burned points the expire job had already written off as expired (a late
    # event, dated before expires_at, spent them): the trail takes them back.
    unexpired: list[BucketPoints] = []


class PointsRedeemed(Event, tag="points_redeemed", kw_only=True):
    redemption_id: str
    points: int
    order_ref: str | None
    buckets: list[BucketPoints]
    # Burned points the expire job had already written off as expired (a late
    # event, dated before expires_at, spent them): the trail takes them back.
    unexpired: list[BucketPoints] = []


class RedemptionReversed(Event, tag="redemption_reversed", kw_only=True):
    redemption_id: str
    points: int
    buckets: list[BucketPoints]
    # Parts of restored buckets already past ``expires_at``: expired at once.
    expired: list[BucketPoints]


class PointsExpired(Event, tag="points_expired", kw_only=True):
    bucket_id: str
    points: int
    expires_at: datetime


class PointsAdjusted(Event, tag="points_adjusted", kw_only=True):
    adjustment_id: str
    points: int
    reason: str
    note: str | None
    # Positive: the new bucket (after paying debt); negative: the burn.
    bucket: NewBucket | None
    buckets: list[BucketPoints]
    debt_paid: int
    # Burned points the expire job had already written off as expired (a late
    # event, dated before expires_at, spent them): the trail takes them back.
    unexpired: list[BucketPoints] = []


class TierChanged(Event, tag="tier_changed", kw_only=True):
    from_tier: str
    to_tier: str
    reason: str  # upgrade | downgrade | return
    cause_id: str | None
    hold_until: datetime | None
    # What a return of the upgrading purchase restores.
    previous_hold_until: datetime | None = None


class CouponIssued(Event, tag="coupon_issued", kw_only=True):
    coupon_id: str
    template: str
    value_cents: int
    min_spend_cents: int
    valid_from: datetime
    expires_at: datetime
    source: str  # admin | welcome | birthday | points | campaign | referral
    points_cost: int = 0
    buckets: list[BucketPoints] = []
    # Burned points the expire job had already written off as expired (a late
    # event, dated before expires_at, spent them): the trail takes them back.
    unexpired: list[BucketPoints] = []
    campaign_id: str | None = None  # a campaign's reward (source "campaign")


class CouponRedeemed(Event, tag="coupon_redeemed", kw_only=True):
    coupon_id: str
    order_ref: str
    order_amount_cents: int


class CouponRedemptionReversed(Event, tag="coupon_redemption_reversed", kw_only=True):
    coupon_id: str
    order_ref: str


class CouponVoided(Event, tag="coupon_voided", kw_only=True):
    coupon_id: str
    reason: str


class CouponExpired(Event, tag="coupon_expired", kw_only=True):
    coupon_id: str
    expires_at: datetime


class ActivityRecorded(Event, tag=False, tag_field=None, kw_only=True):
    """A growth task done (§6.3); its points, when any, follow as points_earned.

    Its data has a field ``type`` (the contract's name for the activity's
    type), which the tag field cannot share: this struct is untagged and
    named by ``EVENT_NAME`` instead.
    """

    EVENT_NAME: ClassVar[str] = "activity_recorded"

    activity_id: str
    type: str
    points: int
    growth: int
    ref: str | None
class ProgrammeChanged(Event, tag="programme_changed", kw_only=True):
    """A programme version (stream ``$programme``): every setting, defaults filled in.

    ``effective_from`` null: in force for all time before the next version.
    """

    version: int
    effective_from: datetime | None
    settings: dict[str, Any]


class CampaignCreated(Event, tag="campaign_created", kw_only=True):
    """A campaign (stream ``$campaigns``), as ``POST /v1/campaigns`` took it (CONTRACT §6.2)."""

    campaign_id: str
    name: str
    starts_at: datetime
    ends_at: datetime
    conditions: dict[str, Any]
    reward: dict[str, Any]
    budget_points: int | None
    budget_coupons: int | None
    per_member_limit: int | None
    per_member_period: str


class CampaignEnded(Event, tag="campaign_ended", kw_only=True):
    campaign_id: str
    ended_at: datetime
    reason: str


AnyEvent = Union[
    MemberEnrolled,
    IdentityLinked,
    PurchaseRecorded,
    PointsEarned,
    PurchaseReturned,
    PointsClawedBack,
    PointsRedeemed,
    RedemptionReversed,
    PointsExpired,
    PointsAdjusted,
    TierChanged,
    CouponIssued,
    CouponRedeemed,
    CouponRedemptionReversed,
    CouponVoided,
    CouponExpired,
    ActivityRecorded,
    ProgrammeChanged,
    CampaignCreated,
    CampaignEnded,
]

def _name(cls: type[Event]) -> str:
    return cls.__struct_config__.tag or cls.EVENT_NAME  # type: ignore[attr-defined,return-value]


EVENT_TYPES: dict[str, type[Event]] = {_name(cls): cls for cls in AnyEvent.__args__}  # type: ignore[attr-defined]


def event_type(event: Event) -> str:
    return _name(type(event))

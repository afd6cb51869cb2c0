"""Commands: what checkout systems and admins ask for, as strict msgspec types.

The same structs decode HTTP bodies (unknown fields, wrong types and
out-of-range values are refused with the field named) and generate the
OpenAPI document, so the two cannot drift.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, get_args

import msgspec

MAX_AMOUNT = 10**11
ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"

Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN, description="1-64 of A-Z a-z 0-9 . _ : -")]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
OptionalText = Annotated[str, msgspec.Meta(max_length=256)]
Amount = Annotated[int, msgspec.Meta(gt=0, le=MAX_AMOUNT)]
NonNegativeAmount = Annotated[int, msgspec.Meta(ge=0, le=MAX_AMOUNT)]
SignedPoints = Annotated[int, msgspec.Meta(ge=-MAX_AMOUNT, le=MAX_AMOUNT)]
Timestamp = Annotated[datetime, msgspec.Meta(tz=True, description="RFC 3339 with offset, e.g. 2025-01-03T10:00:00Z")]
# MM-DD, a day of a leap year: 02-29 is a birthday, 02-30 and 04-31 are not.
Birthday = Annotated[str, msgspec.Meta(
    pattern=r"^((0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-9])|(0[13-9]|1[0-2])-30|(0[13578]|1[02])-31)$",
    description="MM-DD, a day of the year (02-29 included)",
)]
IdentityType = Literal["phone", "unionid", "openid", "email", "card"]
IDENTITY_TYPES: tuple[str, ...] = get_args(IdentityType)


class Command(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Base of every command body."""


class IdentityIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: IdentityType
    value: Text


class Enrol(Command, kw_only=True):
    member_id: Id | None = None
    identities: Annotated[list[IdentityIn], msgspec.Meta(max_length=16)] = []
    birthday: Birthday | None = None
    enrolled_at: Timestamp | None = None
    referred_by: Id | None = None  # the referrer's member id (CONTRACT §6.4)


class RecordPurchase(Command, kw_only=True):
    purchase_id: Id
    store_id: Id
    amount_cents: Amount
    occurred_at: Timestamp | None = None


class RecordReturn(Command, kw_only=True):
    return_id: Id
    purchase_id: Id
    amount_cents: Amount
    occurred_at: Timestamp | None = None


class Redeem(Command, kw_only=True):
    redemption_id: Id
    points: Amount
    order_ref: Id | None = None
    occurred_at: Timestamp | None = None


# The id a path names (redemption_id, coupon_id) is filled in from the path; a
# body may repeat it, and one that contradicts the path is refused (422
# path_mismatch). In a batch line, which has no path, the body carries it.
PathId = Id | None


class ReverseRedemption(Command, kw_only=True):
    redemption_id: PathId = None
    occurred_at: Timestamp | None = None


class IssueCoupon(Command, kw_only=True):
    coupon_id: Id | None = None
    template: Id
    value_cents: Amount
    min_spend_cents: NonNegativeAmount = 0
    valid_from: Timestamp | None = None
    expires_at: Timestamp
    points_cost: Amount | None = None
    occurred_at: Timestamp | None = None


class RedeemCoupon(Command, kw_only=True):
    coupon_id: PathId = None
    order_ref: Id
    order_amount_cents: Amount
    occurred_at: Timestamp | None = None


class ReverseCouponRedemption(Command, kw_only=True):
    coupon_id: PathId = None
    occurred_at: Timestamp | None = None


class VoidCoupon(Command, kw_only=True):
    coupon_id: PathId = None
    reason: Text
    occurred_at: Timestamp | None = None


class Adjust(Command, kw_only=True):
    adjustment_id: Id
    points: SignedPoints
    reason: Text
    note: OptionalText | None = None
    occurred_at: Timestamp | None = None


class RecordActivity(Command, kw_only=True):
    activity_id: Id
    # Any text: a type the programme does not list is 422 unknown_activity, malformed or not.
    type: Text
    ref: Id | None = None
    occurred_at: Timestamp | None = None


# The living programme (CONTRACT §6.1, §6.2): commands on the $programme and $campaigns streams.
CampaignId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]{1,32}$", description="1-32 of A-Z a-z 0-9 . _ : -")]
OptionalCount = Annotated[int, msgspec.Meta(ge=0, le=MAX_AMOUNT)] | None


class ChangeProgramme(Command, kw_only=True):
    # Checked by the domain (ledger.programme.validated), which names the setting at fault.
    settings: dict[str, Any]
    effective_from: Timestamp | None = None


class CreateCampaign(Command, kw_only=True):
    campaign_id: CampaignId
    name: Text
    starts_at: Timestamp
    ends_at: Timestamp
    # Checked by the domain (ledger.campaigns), which answers invalid_campaign naming the field.
    conditions: dict[str, Any] = {}
    reward: dict[str, Any]
    budget_points: OptionalCount = None
    budget_coupons: OptionalCount = None
    per_member_limit: Annotated[int, msgspec.Meta(gt=0, le=MAX_AMOUNT)] | None = None
    per_member_period: Literal["day", "week", "month", "campaign"] = "campaign"


class EndCampaign(Command, kw_only=True):
    campaign_id: CampaignId | None = None  # the path's
    reason: Text


class SimulationChanges(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    # Checked by the domain (ledger.simulation): settings as PUT /v1/programme checks them.
    settings: dict[str, Any] = {}
    campaigns: Annotated[list[CreateCampaign], msgspec.Meta(max_length=100)] = []


class Simulate(Command, kw_only=True):
    """``POST /v1/simulations`` (CONTRACT §6.5): the window [from, to) and the changes to try on it."""

    from_: Timestamp = msgspec.field(name="from")
    to: Timestamp
    changes: SimulationChanges = SimulationChanges()


# Time jobs, run per member by the job runner.
class ExpireDue(Command, kw_only=True):
    as_of: datetime


class ReviewTier(Command, kw_only=True):
    as_of: datetime


class IssueBirthdayCoupon(Command, kw_only=True):
    as_of: datetime


AnyCommand = (
    Enrol
    | RecordPurchase
    | RecordReturn
    | Redeem
    | ReverseRedemption
    | IssueCoupon
    | RedeemCoupon
    | ReverseCouponRedemption
    | VoidCoupon
    | Adjust
    | RecordActivity
    | ExpireDue
    | ReviewTier
    | IssueBirthdayCoupon
)

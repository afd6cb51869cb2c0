"""Campaigns (CONTRACT §6.2): their definitions, the rewards a purchase gets, budgets. Pure.

``CampaignBook`` is the fold of the ``$campaigns`` stream (``campaign_created``,
``campaign_ended``). ``rewards`` decides what a purchase gets from the
campaigns running at its ``occurred_at``, given what each campaign has spent
(``Spend``); ``grant_holds`` is the budget check the store repeats under the
head lock with the spend there is then, so a budget is never exceeded even
when purchases race from several processes: a reward decided on a stale
spend fails the check and the purchase is decided again. A simulation can
replay purchases through ``rewards`` with spends of its own.

Back of the envelope: a purchase checks every running campaign (20 in the
bench: a few microseconds each); a campaign is ~1 KB in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any, Iterable, Literal, Mapping, NamedTuple, Union

import msgspec

from events import catalogue as ev
from ledger.errors import Refusal, not_found
from ledger.programme import WEEKDAYS, Programme, Weekday

CAMPAIGNS_STREAM = "$campaigns"
PAST_TOLERANCE = timedelta(minutes=5)
ID_CHARSET = r"[A-Za-z0-9._:-]"
StoreId = Annotated[str, msgspec.Meta(pattern=rf"^{ID_CHARSET}{{1,64}}$")]
PositiveInt = Annotated[int, msgspec.Meta(gt=0, le=10**11)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0, le=10**11)]


class Conditions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Every condition is optional; all given must hold."""

    store_ids: Annotated[list[StoreId], msgspec.Meta(max_length=1000)] | None = None
    tiers: list[str] | None = None
    weekdays: list[Weekday] | None = None
    min_amount_cents: NonNegativeInt | None = None
    first_purchase_only: bool = False


class MultiplierReward(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="multiplier"):
    multiplier_pct: Annotated[int, msgspec.Meta(gt=100, le=100_000)]


class BonusReward(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="bonus"):
    points: PositiveInt


class CouponReward(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="coupon"):
    template: StoreId
    value_cents: PositiveInt
    min_spend_cents: NonNegativeInt
    valid_days: Annotated[int, msgspec.Meta(gt=0, le=36_500)]


Reward = Union[MultiplierReward, BonusReward, CouponReward]
Period = Literal["day", "week", "month", "campaign"]


@dataclass
class Campaign:
    campaign_id: str
    name: str
    starts_at: datetime
    ends_at: datetime
    conditions: Conditions
    reward: Reward
    budget_points: int | None
    budget_coupons: int | None
    per_member_limit: int | None
    per_member_period: str
    ended_at: datetime | None = None

    def running_at(self, at: datetime) -> bool:
        """A purchase at ``at`` may qualify: in [starts_at, ends_at) and before ended_at."""
        return self.starts_at <= at < self.ends_at and (self.ended_at is None or at < self.ended_at)

    def status_at(self, now: datetime) -> str:
        if self.ended_at is not None and self.ended_at <= now or self.ends_at <= now:
            return "ended"
        return "active" if self.starts_at <= now else "scheduled"

    def view(self, now: datetime, spend: Spend) -> dict[str, Any]:
        return {
            "campaign_id": self.campaign_id,
            "name": self.name,
            "starts_at": self.starts_at,
            "ends_at": self.ends_at,
            "ended_at": self.ended_at,
            "conditions": msgspec.to_builtins(self.conditions),
            "reward": msgspec.to_builtins(self.reward),
            "budget_points": self.budget_points,
            "budget_coupons": self.budget_coupons,
            "per_member_limit": self.per_member_limit,
            "per_member_period": self.per_member_period,
            "status": self.status_at(now),
            "awarded_points": spend.points,
            "awarded_coupons": spend.coupons,
            "members_rewarded": spend.members,
        }


class Spend(NamedTuple):
    """What a campaign has granted so far (returns never give any back), and to how many members."""

    points: int = 0
    coupons: int = 0
    members: int = 0  # counted by the store; no decision reads it


NO_SPEND = Spend()


@dataclass
class CampaignBook:
    """The fold of the ``$campaigns`` stream."""

    campaigns: dict[str, Campaign] = field(default_factory=dict)
    stream_version: int = 0

    def evolve(self, event: ev.Event) -> None:
        self.stream_version += 1
        if isinstance(event, ev.CampaignCreated):
            self.campaigns[event.campaign_id] = campaign_of(event)
        elif isinstance(event, ev.CampaignEnded):
            self.campaigns[event.campaign_id].ended_at = event.ended_at

    def running_at(self, at: datetime) -> list[Campaign]:
        """The campaigns a purchase at ``at`` may qualify for, in campaign_id (byte) order."""
        running = [c for c in self.campaigns.values() if c.running_at(at)]
        running.sort(key=lambda c: c.campaign_id.encode())
        return running


def campaign_of(event: ev.CampaignCreated) -> Campaign:
    return Campaign(
        campaign_id=event.campaign_id,
        name=event.name,
        starts_at=event.starts_at,
        ends_at=event.ends_at,
        conditions=msgspec.convert(event.conditions, Conditions),
        reward=msgspec.convert(event.reward, Reward),
        budget_points=event.budget_points,
        budget_coupons=event.budget_coupons,
        per_member_limit=event.per_member_limit,
        per_member_period=event.per_member_period,
    )


# -- creating and ending ------------------------------------------------------------------------


def _typed(value: Any, typ: Any, name: str):
    """Convert a JSON value, or 422 ``invalid_campaign`` naming the field at fault."""
    try:
        return msgspec.convert(value, typ)
    except msgspec.ValidationError as error:
        message = str(error)
        path = message.rpartition("at `$")[2].rstrip("`") if "at `$" in message else ""
        if "unknown field" in message:
            path = "." + message.split("`")[1]
        field_name = name + path.replace("[", ".").replace("]", "")
        raise Refusal(422, "invalid_campaign", f"{field_name}: {message}", field=field_name) from None


def decide_create(book: CampaignBook, command, now: datetime) -> ev.CampaignCreated:
    """``POST /v1/campaigns``: the checks of CONTRACT §6.2, in the order a caller can fix them."""
    if command.campaign_id in book.campaigns:
        raise Refusal(409, "campaign_exists", f"campaign {command.campaign_id} exists")
    conditions = _typed(command.conditions, Conditions, "conditions")
    reward = _typed(command.reward, Reward, "reward")
    if not command.starts_at < command.ends_at:
        raise Refusal(422, "invalid_window", "starts_at must be before ends_at", field="ends_at")
    if command.starts_at < now - PAST_TOLERANCE:
        raise Refusal(422, "starts_at_in_past", "starts_at is more than 5 minutes before now", field="starts_at")
    return ev.CampaignCreated(
        campaign_id=command.campaign_id,
        name=command.name,
        starts_at=command.starts_at,
        ends_at=command.ends_at,
        conditions=msgspec.to_builtins(conditions),
        reward=msgspec.to_builtins(reward),
        budget_points=command.budget_points,
        budget_coupons=command.budget_coupons,
        per_member_limit=command.per_member_limit,
        per_member_period=command.per_member_period,
    )


def decide_end(book: CampaignBook, campaign_id: str, reason: str, now: datetime) -> ev.CampaignEnded:
    campaign = book.campaigns.get(campaign_id)
    if campaign is None:
        raise not_found("campaign_not_found", f"campaign {campaign_id}")
    if campaign.ended_at is not None:
        raise Refusal(409, "campaign_ended", f"campaign {campaign_id} was ended at {campaign.ended_at.isoformat()}")
    return ev.CampaignEnded(campaign_id=campaign_id, ended_at=now, reason=reason)


# -- rewards ------------------------------------------------------------------------------------


class PurchaseFacts(NamedTuple):
    """What the conditions look at: the purchase and the member before it."""

    store_id: str
    amount_cents: int
    occurred_at: datetime
    tier: str  # the tier before the purchase (the one tier_pct uses)
    first_purchase: bool  # the member has no earlier purchase in the log
    regular_points: int  # tier and member day applied


class Grant(NamedTuple):
    """A campaign's reward to one purchase, with what the store re-checks under its head lock."""

    campaign_id: str
    points: int  # 0 for a coupon
    coupon: bool
    full_points: int  # before a budget cut
    budget_points: int | None
    budget_coupons: int | None

    @property
    def budgeted(self) -> bool:
        """Whether what the campaign has spent can change this grant (``grant_holds``)."""
        return (self.budget_coupons if self.coupon else self.budget_points) is not None


def qualifies(campaign: Campaign, purchase: PurchaseFacts, programme: Programme) -> bool:
    conditions = campaign.conditions
    if not campaign.running_at(purchase.occurred_at):
        return False
    if conditions.store_ids is not None and purchase.store_id not in conditions.store_ids:
        return False
    if conditions.tiers is not None and purchase.tier not in conditions.tiers:
        return False
    if conditions.weekdays is not None:
        if WEEKDAYS[purchase.occurred_at.astimezone(programme.zone).weekday()] not in conditions.weekdays:
            return False
    if conditions.min_amount_cents is not None and purchase.amount_cents < conditions.min_amount_cents:
        return False
    return not conditions.first_purchase_only or purchase.first_purchase


def period_key(at: datetime, period: str, programme: Programme) -> tuple[int, ...]:
    """The per-member limit's period containing ``at``: programme-local day, ISO week (Monday to
    Sunday), month, or the whole campaign."""
    local = at.astimezone(programme.zone)
    if period == "day":
        return (local.year, local.month, local.day)
    if period == "week":
        year, week, _ = local.isocalendar()
        return (year, week)
    if period == "month":
        return (local.year, local.month)
    return ()


def within_member_limit(campaign: Campaign, rewarded_at: Iterable[datetime], at: datetime, programme: Programme) -> bool:
    """The member has had fewer than ``per_member_limit`` rewards in the period of ``at``."""
    if campaign.per_member_limit is None:
        return True
    period = period_key(at, campaign.per_member_period, programme)
    taken = sum(1 for moment in rewarded_at if period_key(moment, campaign.per_member_period, programme) == period)
    return taken < campaign.per_member_limit


def full_points(reward: Reward, regular_points: int) -> int:
    """A multiplier grants the extra part of the regular points (never compounding); a bonus its points."""
    if isinstance(reward, MultiplierReward):
        return regular_points * (reward.multiplier_pct - 100) // 100
    if isinstance(reward, BonusReward):
        return reward.points
    return 0


def budgeted_points(full: int, budget_points: int | None, spent_points: int) -> int:
    """A reward larger than what remains of the budget is cut to the remainder."""
    if budget_points is None:
        return full
    return max(0, min(full, budget_points - spent_points))


def rewards(
    campaigns: Iterable[Campaign],
    spend: Mapping[str, Spend],
    rewarded_at: Mapping[str, list[datetime]],
    purchase: PurchaseFacts,
    programme: Programme,
) -> list[Grant]:
    """The rewards of a purchase, in campaign_id order; a reward of 0 points is not granted."""
    grants = []
    for campaign in campaigns:
        if not qualifies(campaign, purchase, programme):
            continue
        if not within_member_limit(campaign, rewarded_at.get(campaign.campaign_id, ()), purchase.occurred_at, programme):
            continue
        spent = spend.get(campaign.campaign_id, NO_SPEND)
        if isinstance(campaign.reward, CouponReward):
            if campaign.budget_coupons is not None and spent.coupons >= campaign.budget_coupons:
                continue
            grants.append(Grant(campaign.campaign_id, 0, True, 0, campaign.budget_points, campaign.budget_coupons))
            continue
        full = full_points(campaign.reward, purchase.regular_points)
        points = budgeted_points(full, campaign.budget_points, spent.points)
        if points > 0:
            grants.append(Grant(campaign.campaign_id, points, False, full, campaign.budget_points, campaign.budget_coupons))
    return grants


def grant_holds(grant: Grant, spent: Spend) -> bool:
    """Whether a grant decided on some earlier spend is still the one to make with ``spent``.

    Spends only grow, so an uncut reward stays right while it fits, and a cut
    one only while the spend is what it was cut against.
    """
    if grant.coupon:
        return grant.budget_coupons is None or spent.coupons < grant.budget_coupons
    return budgeted_points(grant.full_points, grant.budget_points, spent.points) == grant.points


def add_spend(spent: Spend, grant: Grant) -> Spend:
    return Spend(spent.points + grant.points, spent.coupons + (1 if grant.coupon else 0), spent.members)


def grants_in(events: Iterable[ev.Event], book: CampaignBook) -> list[Grant]:
    """The grants a decided purchase makes, as the store re-checks them (``grant_holds``)."""
    grants, regular_points = [], 0
    for event in events:
        campaign_id = getattr(event, "campaign_id", None)
        if isinstance(event, ev.PointsEarned) and campaign_id is None:
            regular_points = event.points
        elif campaign_id is not None:
            campaign = book.campaigns[campaign_id]
            coupon = isinstance(event, ev.CouponIssued)
            points = 0 if coupon else event.points
            full = 0 if coupon else full_points(campaign.reward, regular_points)
            grants.append(Grant(campaign_id, points, coupon, full, campaign.budget_points, campaign.budget_coupons))
    return grants

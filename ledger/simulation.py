"""Simulations (CONTRACT §6.5): what the purchases of a window of real history would have
granted under a changed programme with draft campaigns added. Pure: the application layer
reads the log and feeds its events here, in log order.

Nothing here re-states a rule: a purchase's regular points come from
``ledger.decide.regular_points`` and its campaign rewards from
``ledger.campaigns.rewards``, the functions that decide real purchases.

What it keeps, and why:
- each member's last purchase read (its events follow it in the log: the
  regular ``points_earned`` carries the tier the member actually had, the
  campaign ``points_earned``/``coupon_issued`` what was actually granted);
- the members that have purchased earlier in the log (``first_purchase_only``);
- per campaign what it has granted (budgets), and per member and campaign
  when it rewarded them (per-member limits): before ``from``, what was
  actually granted; in the window, what the simulation grants.
Back of the envelope: a member id, a set entry and a few datetimes per member:
~300 bytes a member, 300 MB for a million members.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, NamedTuple
from zoneinfo import ZoneInfo

import msgspec

from events import catalogue as ev
from ledger.campaigns import (
    Campaign, CampaignBook, PurchaseFacts, Spend, add_spend, campaign_of, decide_create, rewards,
)
from ledger.decide import regular_points
from ledger.errors import Refusal
from ledger.programme import Programme, ProgrammeHistory, validated

# The events a simulation reads: purchases and what they granted.
SIMULATION_EVENT_TYPES = (
    "purchase_recorded", "points_earned", "coupon_issued", "tier_changed", "campaign_created", "campaign_ended",
)
DRAFT_CAMPAIGNS_MAX = 100


class Granted(msgspec.Struct, frozen=True):
    """What a set of purchases granted: regular + campaign points (gross), campaign points, campaign coupons."""

    points: int = 0
    campaign_points: int = 0
    coupons: int = 0


class SimulationMonth(msgspec.Struct, frozen=True):
    month: str
    actual_points: int
    simulated_points: int


class SimulationAnswer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    purchases: int
    members: int
    actual: Granted
    simulated: Granted
    delta_points: int
    delta_cost_cents: int
    by_month: list[SimulationMonth]


class _Purchase(NamedTuple):
    purchase_id: str
    store_id: str
    amount_cents: int
    occurred_at: datetime
    first_purchase: bool
    where: int  # -1 before the window, 0 in it, 1 after it


@dataclass
class _Tally:
    points: int = 0
    campaign_points: int = 0
    coupons: int = 0

    def frozen(self) -> Granted:
        return Granted(self.points, self.campaign_points, self.coupons)


def draft_campaigns(book: CampaignBook, drafts: Iterable[Any]) -> list[Campaign]:
    """The draft campaigns (``CreateCampaign`` bodies), checked as ``POST /v1/campaigns`` checks them,
    except that a draft may start in the past (that is the point of a simulation)."""
    known = CampaignBook(dict(book.campaigns))
    campaigns = []
    for draft in drafts:
        created = decide_create(known, draft, now=draft.starts_at)
        known.evolve(created)
        campaigns.append(campaign_of(created))
    return campaigns


def changed_versions(history: ProgrammeHistory, settings: dict[str, Any]) -> dict[int, Programme]:
    """Each version with the changed settings merged in as ``PUT /v1/programme`` merges them
    (a setting named replaces that whole setting); 422 ``invalid_programme`` naming a bad one."""
    return {v.version: validated({**v.settings, **settings}, v.version) for v in history.versions}


@dataclass
class Simulation:
    """Feed it the log's purchases and grants in log order (``feed``); ``answer`` is the §6.5 answer."""

    window_from: datetime
    window_to: datetime
    history: ProgrammeHistory
    versions: dict[int, Programme]  # changed_versions
    # The drafts, and each real campaign from its creation on, with its end from when the end was
    # recorded: a purchase is judged on the campaigns as they stood at its place in the log.
    campaigns: list[Campaign]  # in campaign_id (byte) order
    real: dict[str, Campaign]  # every real campaign, by id, not yet ended
    spend: dict[str, Spend] = field(default_factory=dict)
    rewarded_at: dict[str, dict[str, list[datetime]]] = field(default_factory=dict)
    purchased: set[str] = field(default_factory=set)
    last_purchase: dict[str, _Purchase] = field(default_factory=dict)
    tiers: dict[str, str] = field(default_factory=dict)  # each member's tier so far, by the log's tier changes
    members: set[str] = field(default_factory=set)
    purchases: int = 0
    actual: _Tally = field(default_factory=_Tally)
    simulated: _Tally = field(default_factory=_Tally)
    by_month: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # (year, month) -> [actual, simulated]

    @classmethod
    def of(cls, window_from: datetime, window_to: datetime, history: ProgrammeHistory, book: CampaignBook,
           settings: dict[str, Any], drafts: Iterable[Any]) -> Simulation:
        """A simulation of the window, or a Refusal with the contract's code (nothing read yet)."""
        if not window_from < window_to:
            raise Refusal(422, "invalid_window", "from must be before to", field="to")
        versions = changed_versions(history, settings)
        real = {c.campaign_id: dataclasses.replace(c, ended_at=None) for c in book.campaigns.values()}
        return cls(window_from, window_to, history, versions, draft_campaigns(book, drafts), real)

    @property
    def programme_at_to(self) -> Programme:
        """The changed version in force at ``to``: its timezone dates the months, its rate prices the points."""
        return self.versions[self.history.version_at(self.window_to).version]

    def __post_init__(self) -> None:
        self.campaigns.sort(key=lambda c: c.campaign_id.encode())

    def feed(self, stream_id: str, occurred_at: datetime, programme_version: int | None, event: ev.Event) -> None:
        if isinstance(event, ev.CampaignCreated) and event.campaign_id in self.real:
            self.campaigns.append(self.real[event.campaign_id])
            self.campaigns.sort(key=lambda c: c.campaign_id.encode())
        elif isinstance(event, ev.CampaignEnded) and event.campaign_id in self.real:
            self.real[event.campaign_id].ended_at = event.ended_at
        elif isinstance(event, ev.PurchaseRecorded):
            self._purchase(stream_id, occurred_at, programme_version, event)
        elif isinstance(event, ev.TierChanged):
            self.tiers[stream_id] = event.to_tier
        elif isinstance(event, ev.PointsEarned) and event.purchase_id is not None:
            purchase = self.last_purchase.get(stream_id)
            if purchase is None or purchase.purchase_id != event.purchase_id:
                return  # not this member's purchase's own credit (a referrer's reward names the referee's)
            if event.campaign_id is None:
                self._earned(purchase, event.points)
            else:
                self._actual_grant(stream_id, purchase, event.campaign_id, event.points, 0)
        elif isinstance(event, ev.CouponIssued) and event.campaign_id is not None:
            self._actual_grant(stream_id, self.last_purchase[stream_id], event.campaign_id, 0, 1)

    def _purchase(
        self, stream_id: str, occurred_at: datetime, programme_version: int | None, event: ev.PurchaseRecorded,
    ) -> None:
        where = -1 if occurred_at < self.window_from else (0 if occurred_at < self.window_to else 1)
        purchase = _Purchase(
            event.purchase_id, event.store_id, event.amount_cents, occurred_at, stream_id not in self.purchased, where,
        )
        self.last_purchase[stream_id] = purchase
        self.purchased.add(stream_id)
        if where == 0:
            self.purchases += 1
            self.members.add(stream_id)
            self._simulate(stream_id, purchase, programme_version)

    @functools.cached_property
    def _zone(self) -> ZoneInfo:
        return self.programme_at_to.zone

    def _month(self, at: datetime) -> list[int]:
        # Twice a purchase: the zone is looked up once, and the month named only in the answer.
        local = at.astimezone(self._zone)
        return self.by_month.setdefault((local.year, local.month), [0, 0])

    def _earned(self, purchase: _Purchase, points: int) -> None:
        """The purchase's regular points, as actually credited."""
        if purchase.where == 0:
            self.actual.points += points
            self._month(purchase.occurred_at)[0] += points

    def _simulate(self, stream_id: str, purchase: _Purchase, programme_version: int | None) -> None:
        """What the purchase would have credited under the changed programme, on the tier the member
        actually had before it (the log's tier changes so far; a purchase of no regular points too)."""
        if programme_version is None:
            programme_version = self.history.version_at(purchase.occurred_at).version
        programme = self.versions[programme_version]
        tier = programme.tier(self.tiers.get(stream_id, ""))  # a tier the version does not name counts as its lowest
        _day_pct, points = regular_points(purchase.amount_cents, tier, purchase.occurred_at, programme)
        facts = PurchaseFacts(purchase.store_id, purchase.amount_cents, purchase.occurred_at, tier.name,
                              purchase.first_purchase, points)
        member_rewards = self.rewarded_at.setdefault(stream_id, {})
        grants = rewards(self.campaigns, self.spend, member_rewards, facts, programme)
        granted = points
        for grant in grants:
            self.spend[grant.campaign_id] = add_spend(self.spend.get(grant.campaign_id, Spend()), grant)
            member_rewards.setdefault(grant.campaign_id, []).append(purchase.occurred_at)
            self.simulated.campaign_points += grant.points
            self.simulated.coupons += 1 if grant.coupon else 0
            granted += grant.points
        self.simulated.points += granted
        self._month(purchase.occurred_at)[1] += granted

    def _actual_grant(self, stream_id: str, purchase: _Purchase, campaign_id: str, points: int, coupons: int) -> None:
        """A real campaign's reward: counted as actual in the window; before it, it spends the budget
        and counts toward the member's limit, as it did."""
        if purchase.where == 0:
            self.actual.points += points
            self.actual.campaign_points += points
            self.actual.coupons += coupons
            self._month(purchase.occurred_at)[0] += points
        elif purchase.where < 0:
            spent = self.spend.get(campaign_id, Spend())
            self.spend[campaign_id] = Spend(spent.points + points, spent.coupons + coupons, spent.members)
            self.rewarded_at.setdefault(stream_id, {}).setdefault(campaign_id, []).append(purchase.occurred_at)

    def answer(self) -> SimulationAnswer:
        delta_points = self.simulated.points - self.actual.points
        return SimulationAnswer(
            purchases=self.purchases,
            members=len(self.members),
            actual=self.actual.frozen(),
            simulated=self.simulated.frozen(),
            delta_points=delta_points,
            delta_cost_cents=delta_points * self.programme_at_to.redeem_cents_per_point,
            by_month=[SimulationMonth(f"{year:04d}-{month:02d}", actual, simulated)
                      for (year, month), (actual, simulated) in sorted(self.by_month.items())],
        )

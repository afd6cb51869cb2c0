"""The programme: every rule setting of CONTRACT §2, with its defaults.

A TOML file (path in ``LOYALTY_PROGRAMME``) overrides any setting. The
programme's ``version`` is recorded in every event that applied a rule; it is
given in the file, or derived from the file's content so that two different
programmes never share a version silently.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo

import msgspec

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


class Tier(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    threshold: int
    multiplier_pct: int


class CouponTemplate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    template: str
    value_cents: int
    min_spend_cents: int
    valid_days: int


class MemberDay(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    weekday: Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
    multiplier_pct: int


NonNegative = Annotated[int, msgspec.Meta(ge=0)]
ACTIVITY_TYPE_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"


class Activity(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A growth task (§6.3) and what it earns; a cap of 0 means none."""

    type: Annotated[str, msgspec.Meta(pattern=ACTIVITY_TYPE_PATTERN)]
    points: NonNegative
    growth: NonNegative
    daily_cap: NonNegative
    total_cap: NonNegative


def _default_activities() -> list[Activity]:
    return [
        Activity("check_in", 1, 10, 1, 0),
        Activity("review", 5, 20, 3, 0),
        Activity("profile_completed", 20, 50, 0, 1),
    ]


def _default_tiers() -> list[Tier]:
    return [Tier("regular", 0, 100), Tier("silver", 3000, 120), Tier("gold", 6000, 150)]


def _default_welcome_pack() -> list[CouponTemplate]:
    return [
        CouponTemplate("WELCOME20", 2000, 10000, 30),
        CouponTemplate("WELCOME20", 2000, 10000, 30),
        CouponTemplate("WELCOME30", 3000, 20000, 30),
        CouponTemplate("WELCOME30", 3000, 20000, 30),
    ]


class Programme(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    version: int = 1
    currency: str = "CNY"
    timezone: str = "Asia/Shanghai"
    earn_cents_per_point: int = 1000
    redeem_cents_per_point: int = 100
    growth_cents_per_unit: int = 100
    pending_days: int = 7
    points_expiry_days: int = 365
    tiers: list[Tier] = msgspec.field(default_factory=_default_tiers)
    tier_window_days: int = 365
    tier_hold_days: int = 365
    downgrade: Literal["one_step", "to_qualified", "never"] = "one_step"
    member_day: MemberDay = MemberDay("friday", 200)
    welcome_pack: list[CouponTemplate] = msgspec.field(default_factory=_default_welcome_pack)
    birthday_coupon: CouponTemplate = CouponTemplate("BIRTHDAY50", 5000, 10000, 30)
    return_shortfall: Literal["debt", "absorb"] = "debt"
    dormant_after_days: int = 180
    loyal_orders_30d: int = 4
    max_backdate_days: int = 30
    activities: list[Activity] = msgspec.field(default_factory=_default_activities)

    def __post_init__(self) -> None:
        if not self.tiers or self.tiers[0].threshold != 0:
            raise ValueError("tiers must start with a tier at threshold 0")
        thresholds = [tier.threshold for tier in self.tiers]
        if thresholds != sorted(set(thresholds)):
            raise ValueError("tier thresholds must be strictly increasing")
        for name in ("earn_cents_per_point", "redeem_cents_per_point", "growth_cents_per_unit"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        ZoneInfo(self.timezone)  # raises on an unknown zone
        if len({activity.type for activity in self.activities}) != len(self.activities):
            raise ValueError("activities: each type may be listed once")

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def lowest_tier(self) -> Tier:
        return self.tiers[0]

    def tier(self, name: str) -> Tier:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        return self.lowest_tier

    def tier_index(self, name: str) -> int:
        for index, tier in enumerate(self.tiers):
            if tier.name == name:
                return index
        return 0

    def qualified_tier(self, growth: int) -> Tier:
        """The highest tier whose threshold this rolling growth reaches."""
        reached = [tier for tier in self.tiers if tier.threshold <= growth]
        return reached[-1]

    def activity(self, activity_type: str) -> Activity | None:
        return next((a for a in self.activities if a.type == activity_type), None)

    def next_tier(self, name: str) -> Tier | None:
        index = self.tier_index(name)
        return self.tiers[index + 1] if index + 1 < len(self.tiers) else None


def load_programme(path: str | os.PathLike[str] | None = None) -> Programme:
    """The programme from a TOML file (``Settings.programme_path``), or the defaults without one."""
    if not path:
        return Programme()
    raw = Path(path).read_bytes()
    settings = tomllib.loads(raw.decode("utf-8"))
    if "version" not in settings:
        # Same file, same version; any edit gives a new one.
        settings["version"] = int.from_bytes(hashlib.sha256(raw).digest()[:3], "big") + 2
    return msgspec.convert(settings, Programme)

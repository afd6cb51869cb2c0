"""The programme: every rule setting of CONTRACT §2, with its defaults, and its versions (§6.1).

A TOML file (path in ``LOYALTY_PROGRAMME``) overrides any setting. The
programme lives in the log (stream ``$programme``, ``programme_changed``):
``ProgrammeHistory`` is the fold of those events, and a command is decided
by the version in force at its business time. The ``version`` of a
``Programme`` is its number in the log (a ``version`` in the file is ignored).
Everything here is pure.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from events.catalogue import ProgrammeChanged
from ledger.errors import Refusal

PROGRAMME_STREAM = "$programme"
PAST_TOLERANCE = timedelta(minutes=5)  # an effective_from this close behind now counts as now

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


# Every rate, day count and cap is a non-negative integer; the *_cents_per_* rates are positive.
Count = Annotated[int, msgspec.Meta(ge=0)]
Rate = Annotated[int, msgspec.Meta(gt=0)]
Weekday = Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


class Tier(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    threshold: Count
    multiplier_pct: Count


class CouponTemplate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    template: str
    value_cents: Count
    min_spend_cents: Count
    valid_days: Count


class MemberDay(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    weekday: Weekday
    multiplier_pct: Count


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


class ReferralRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """CONTRACT §6.4: what a referee's qualifying first purchase grants; monthly_cap 0 means none."""

    referrer_points: NonNegative = 20
    referee_coupon: CouponTemplate = CouponTemplate("REFERRAL10", 1000, 5000, 30)
    min_first_purchase_cents: NonNegative = 5000
    within_days: NonNegative = 30
    monthly_cap: NonNegative = 10


def _default_tiers() -> list[Tier]:
    return [Tier("regular", 0, 100), Tier("silver", 3000, 120), Tier("gold", 6000, 150)]


def _default_welcome_pack() -> list[CouponTemplate]:
    return [
        CouponTemplate("WELCOME20", 2000, 10000, 30),
        CouponTemplate("WELCOME20", 2000, 10000, 30),
        CouponTemplate("WELCOME30", 3000, 20000, 30),
        CouponTemplate("WELCOME30", 3000, 20000, 30),
    ]


class ProgrammeSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Every setting of CONTRACT §2 and §6 with its default: what ``programme_changed`` records and
    ``GET /v1/programme`` shows as ``settings``."""

    currency: str = "CNY"
    timezone: str = "Asia/Shanghai"
    earn_cents_per_point: Rate = 1000
    redeem_cents_per_point: Rate = 100
    growth_cents_per_unit: Rate = 100
    pending_days: Count = 7
    points_expiry_days: Count = 365
    tiers: list[Tier] = msgspec.field(default_factory=_default_tiers)
    tier_window_days: Count = 365
    tier_hold_days: Count = 365
    downgrade: Literal["one_step", "to_qualified", "never"] = "one_step"
    member_day: MemberDay = MemberDay("friday", 200)
    welcome_pack: list[CouponTemplate] = msgspec.field(default_factory=_default_welcome_pack)
    birthday_coupon: CouponTemplate = CouponTemplate("BIRTHDAY50", 5000, 10000, 30)
    return_shortfall: Literal["debt", "absorb"] = "debt"
    dormant_after_days: Count = 180
    loyal_orders_30d: Count = 4
    max_backdate_days: Count = 30
    activities: list[Activity] = msgspec.field(default_factory=_default_activities)
    referral: ReferralRule = ReferralRule()

    def __post_init__(self) -> None:
        # Messages start with the setting's name: ``validated`` names it in invalid_programme.
        if not self.tiers or self.tiers[0].threshold != 0:
            raise ValueError("tiers: must start with a tier at threshold 0")
        thresholds = [tier.threshold for tier in self.tiers]
        if thresholds != sorted(set(thresholds)):
            raise ValueError("tiers: thresholds must be strictly increasing")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone: unknown time zone {self.timezone!r}") from None
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


class Programme(ProgrammeSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The settings as one version of the log holds them."""

    version: int = 1  # the version's number in the log (``ProgrammeHistory``), not a setting


def settings_of(programme: Programme) -> dict[str, Any]:
    """Every setting with its value (defaults filled in): what ``programme_changed`` records."""
    settings = msgspec.to_builtins(programme)
    del settings["version"]
    return settings


_AT_SETTING = re.compile(r"at `\$\.([A-Za-z0-9_]+)")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")


def validated(settings: dict[str, Any], version: int = 1) -> Programme:
    """The programme these settings make, or 422 ``invalid_programme`` naming the setting at fault."""
    if "version" in settings:
        raise _invalid("version", "version is not a setting: versions are counted by the log")
    try:
        return msgspec.convert({**settings, "version": version}, Programme)
    except msgspec.ValidationError as error:
        message = str(error)
        named = _UNKNOWN_FIELD.search(message) or _AT_SETTING.search(message)
        setting = named.group(1) if named else message.partition(":")[0]
        raise _invalid(setting, message) from None


def _invalid(setting: str, detail: str) -> Refusal:
    return Refusal(422, "invalid_programme", f"{setting}: {detail}", setting=setting, field=setting)


def load_programme(path: str | os.PathLike[str] | None = None) -> Programme:
    """The programme from a TOML file (``Settings.programme_path``), or the defaults without one.

    A ``version`` in the file is ignored: the log counts versions (CONTRACT §6.1).
    """
    if not path:
        return Programme()
    return msgspec.convert(file_settings(tomllib.loads(Path(path).read_bytes().decode("utf-8"))), Programme)


def file_settings(table: dict[str, Any]) -> dict[str, Any]:
    """The settings a programme file holds: its table without a ``version``, which the log counts
    (CONTRACT §6.1: "a `version` in the file is ignored")."""
    return {name: value for name, value in table.items() if name != "version"}


@dataclass(frozen=True)
class ProgrammeVersion:
    version: int
    effective_from: datetime | None  # None: in force for all time before the next version
    programme: Programme
    recorded_at: datetime | None = None
    actor: str | None = None

    @property
    def settings(self) -> dict[str, Any]:
        return settings_of(self.programme)

    def view(self) -> dict[str, Any]:
        return {"version": self.version, "effective_from": self.effective_from, "settings": self.settings}


@dataclass
class ProgrammeHistory:
    """The fold of the ``$programme`` stream: every version, in log order."""

    versions: list[ProgrammeVersion] = field(default_factory=list)

    @property
    def stream_version(self) -> int:
        return len(self.versions)

    @property
    def latest(self) -> ProgrammeVersion | None:
        return self.versions[-1] if self.versions else None

    @property
    def latest_effective(self) -> ProgrammeVersion | None:
        """The version in force last, the one a change builds on (CONTRACT §6.1's "latest version"): the latest
        ``effective_from``, of equal ones the later recorded. It is the last recorded too, unless a file given
        at start was appended, effective then, while a version was already scheduled for later."""
        return max(self.versions, key=_effective_key, default=None)

    def evolve(self, event: ProgrammeChanged, recorded_at: datetime | None = None, actor: str | None = None) -> None:
        programme = msgspec.convert({**event.settings, "version": event.version}, Programme)
        self.versions.append(ProgrammeVersion(event.version, event.effective_from, programme, recorded_at, actor))

    def version_at(self, at: datetime) -> ProgrammeVersion:
        """The version in force at ``at``: of those effective at or before it, the latest effective,
        and of equal ``effective_from`` the later recorded (CONTRACT §6.1)."""
        assert self.versions, "the programme is seeded before any command is decided"
        best = None
        for candidate in self.versions:
            if candidate.effective_from is not None and candidate.effective_from > at:
                continue
            if best is None or _effective_key(candidate) >= _effective_key(best):
                best = candidate
        return best or self.versions[0]

    def in_force(self, at: datetime) -> Programme:
        return self.version_at(at).programme


def _effective_key(version: ProgrammeVersion) -> tuple[datetime, int]:
    return (version.effective_from or datetime.min.replace(tzinfo=timezone.utc), version.version)



def decide_seed(history: ProgrammeHistory, given: Programme, now: datetime):
    """What the start appends: version 1 on an empty log; the given programme as the next version,
    effective now, when it differs from the version in force now; else nothing."""
    settings = settings_of(given)
    if history.latest is None:
        return ProgrammeChanged(version=1, effective_from=None, settings=settings)
    if history.version_at(now).settings == settings:
        return None
    return ProgrammeChanged(version=history.latest.version + 1, effective_from=now, settings=settings)


def decide_change(history: ProgrammeHistory, changes: dict[str, Any], effective_from: datetime | None, now: datetime):
    """``PUT /v1/programme``: each setting named replaces that whole setting of the latest version (the one in
    force last); settings are checked before ``effective_from`` (CONTRACT §6.1)."""
    latest = history.latest_effective
    assert latest is not None and history.latest is not None, "the programme is seeded at start"
    programme = validated({**latest.settings, **changes}, history.latest.version + 1)
    effective_from = effective_from or now
    if effective_from < now - PAST_TOLERANCE:
        minutes = PAST_TOLERANCE.seconds // 60
        raise Refusal(422, "effective_from_in_past", f"effective_from is more than {minutes} minutes in the past; "
                      "a version changes only what comes after it (leave effective_from out for now)",
                      field="effective_from")
    if latest.effective_from is not None and effective_from < latest.effective_from:
        raise Refusal(
            422,
            "effective_from_in_past",
            f"effective_from is before the latest version's ({latest.effective_from.isoformat()})",
            field="effective_from",
        )
    return ProgrammeChanged(version=programme.version, effective_from=effective_from, settings=settings_of(programme))

"""A small pure model of CONTRACT §2 and §6.3, written from the contract's text alone.

It shares no code with ``ledger/`` except the ``Programme`` settings. Nothing
is clever: a member is a handful of flat lists of dated entries, and every
answer is recomputed by summing them. "As of T" keeps the entries dated
``<= T``, which is the contract's "fold the member's events with
``occurred_at <= T``" (sums do not care about order; "the last tier record"
does, and the tier list is kept in log order).

Every method answers like the application does: a dict on success, a
``Refused(status, code, reason)`` or a ``Duplicate(key)`` (the natural id
was used before). The same result types serve the drivers of the stateful
test, so model and system are compared value by value.

Choices the contract leaves open, made as the brief for issue 4 says:
bucket ids are ``p:<purchase_id>`` / ``a:<adjustment_id>``; a purchase that
earns 0 points (or whose points all pay debt) makes no bucket; a return
cannot occur before its purchase (422 ``return_before_purchase``); the tier
revert on return reads rolling growth at the return's ``occurred_at``;
reversing a reversed redemption is a duplicate; reversing a coupon
redemption that is not redeemed is 409 ``coupon_not_redeemed``; welcome
coupons are ``welcome-1..n``, birthday coupons ``birthday-<year>``;
``points_expired`` carries the points not already recorded as expired.
A return does not take points from its purchase's bucket once that bucket
has expired (expired points are gone; the claw-back looks elsewhere).
Reversals (of redemptions and of coupon redemptions) cannot be dated before
what they undo (422 ``occurred_at_before_original``). "Never overdraws" holds
in every as-of view: a burn dated ``at`` takes from a bucket at most what the
bucket holds in the emptiest view from ``at`` on, and less today's debt; a
late burn of points the expire job already recorded takes that record back.

Programme versions and campaigns (CONTRACT §6.1, §6.2), from the contract's
text too: a version is in force from its ``effective_from`` (the latest
effective, then the latest recorded, wins); a command is decided by the
version in force at its business time. A campaign rewards a purchase dated
in its window (and before it was ended) whose conditions all hold, in
campaign id order, within its per-member limit and its budget (the last
reward cut to what is left). Its points go into ``c:<campaign>:<purchase>``,
pending and expiring like the purchase's; its coupons are
``<campaign>-<n>``. A return claws from the purchase's own buckets first:
the regular one, then the campaign ones in campaign id order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import msgspec

from ledger.programme import Programme

WEEKDAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
FUTURE_TOLERANCE = timedelta(minutes=5)


@dataclass(frozen=True)
class Refused:
    """A command the rules refuse: nothing is appended."""

    status: int
    code: str
    reason: str | None = None


@dataclass(frozen=True)
class Duplicate:
    """The command's natural id was used before on this member."""

    key: str


@dataclass
class Bucket:
    bucket_id: str
    at: datetime  # occurred_at of the credit
    available_at: datetime
    expires_at: datetime
    amount: int
    seq: int  # log position, the last tie-break of the burn order
    expiry_recorded: bool = False  # a points_expired was written for it
    expired_recorded: int = 0  # points the trail shows as expired


@dataclass
class Purchase:
    purchase_id: str
    at: datetime
    amount_cents: int
    points: int
    growth: int
    returned_cents: int = 0
    clawed_points: int = 0
    clawed_growth: int = 0
    growth_returns: list[tuple[datetime, int]] = field(default_factory=list)
    campaign_buckets: list[str] = field(default_factory=list)


@dataclass
class Redemption:
    at: datetime
    points: int
    parts: list[tuple[str, int]]
    reversed: bool = False


@dataclass
class Coupon:
    coupon_id: str
    issued_at: datetime  # occurred_at of coupon_issued
    valid_from: datetime
    expires_at: datetime
    min_spend_cents: int
    changes: list[tuple[datetime, str]] = field(default_factory=list)  # (at, issued|redeemed|voided), log order
    expiry_recorded: bool = False


@dataclass
class Activity:
    activity_id: str
    type: str
    at: datetime
    growth: int


@dataclass
class Member:
    member_id: str
    enrolled_at: datetime
    birthday: str | None
    seq: int = 0
    buckets: list[Bucket] = field(default_factory=list)
    moves: list[tuple[datetime, str, int]] = field(default_factory=list)  # (at, bucket_id, signed points)
    debt: list[tuple[datetime, int]] = field(default_factory=list)  # (at, signed change)
    totals: list[tuple[datetime, str, int]] = field(default_factory=list)  # (at, earned|clawed|adjusted|redeemed, n)
    purchases: dict[str, Purchase] = field(default_factory=dict)
    returns: set[str] = field(default_factory=set)
    redemptions: dict[str, Redemption] = field(default_factory=dict)
    adjustments: set[str] = field(default_factory=set)
    tiers: list[tuple[datetime, str, datetime | None]] = field(default_factory=list)  # (at, tier, hold_until), log order
    # (cause purchase, from tier, from hold); the cause is None for an activity's upgrade: no return undoes it.
    upgrades: list[tuple[str | None, str, datetime | None]] = field(default_factory=list)
    activities: dict[str, Activity] = field(default_factory=dict)
    referred_by: str | None = None
    referral_rewards: dict[str, datetime] = field(default_factory=dict)  # referee -> its first purchase's date
    coupons: dict[str, Coupon] = field(default_factory=dict)
    times: list[datetime] = field(default_factory=list)  # occurred_at of everything recorded, log order
    rewarded: dict[str, list[datetime]] = field(default_factory=dict)  # campaign -> occurred_at of its rewards
    campaign_coupons: dict[str, int] = field(default_factory=dict)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


@dataclass
class Campaign:
    campaign_id: str
    starts_at: datetime
    ends_at: datetime
    conditions: dict
    reward: dict
    budget_points: int | None
    budget_coupons: int | None
    per_member_limit: int | None
    per_member_period: str
    ended_at: datetime | None = None
    points: int = 0  # granted so far
    coupons: int = 0
    ran_out: bool = False  # a reward was cut or withheld by a budget


EARLIEST = datetime.min.replace(tzinfo=timezone.utc)


def _upto(at: datetime, limit: datetime | None) -> bool:
    return limit is None or at <= limit


class Model:
    def __init__(self, programme: Programme, now: datetime) -> None:
        self.p = programme
        self.now = now
        self.zone = ZoneInfo(programme.timezone)
        self.members: dict[str, Member] = {}
        self.versions: list[tuple[datetime | None, Programme]] = [(None, programme)]
        self.campaigns: dict[str, Campaign] = {}

    # -- programme versions and campaigns ----------------------------------------

    def programme_at(self, at: datetime) -> Programme:
        """The latest effective version at ``at``; of equal effective_from, the later one."""
        effective = [(eff or EARLIEST, n, p) for n, (eff, p) in enumerate(self.versions) if eff is None or eff <= at]
        return max(effective, key=lambda v: (v[0], v[1]))[2]

    def change_programme(self, settings: dict, effective_from: datetime | None = None):
        # The version in force last (the latest effective_from, then the later one) is the one a change builds on.
        last_in_force = max(range(len(self.versions)), key=lambda n: (self.versions[n][0] or EARLIEST, n))
        latest_from, latest = self.versions[last_in_force]
        merged = {**msgspec.to_builtins(latest), **settings}
        effective_from = effective_from or self.now
        if effective_from < self.now - FUTURE_TOLERANCE or (latest_from is not None and effective_from < latest_from):
            return Refused(422, "effective_from_in_past")
        self.versions.append((effective_from, msgspec.convert(merged, Programme)))
        return {"version": len(self.versions)}

    def create_campaign(self, body: dict):
        if body["campaign_id"] in self.campaigns:
            return Refused(409, "campaign_exists")
        reward = body["reward"]
        if reward["kind"] == "multiplier" and reward["multiplier_pct"] <= 100:
            return Refused(422, "invalid_campaign")
        if not body["starts_at"] < body["ends_at"]:
            return Refused(422, "invalid_window")
        if body["starts_at"] < self.now - FUTURE_TOLERANCE:
            return Refused(422, "starts_at_in_past")
        fields = ("budget_points", "budget_coupons", "per_member_limit")
        self.campaigns[body["campaign_id"]] = Campaign(
            body["campaign_id"], body["starts_at"], body["ends_at"], body.get("conditions", {}), reward,
            *(body.get(name) for name in fields), body.get("per_member_period", "campaign"),
        )
        return {"campaign_id": body["campaign_id"]}

    def end_campaign(self, campaign_id: str):
        c = self.campaigns.get(campaign_id)
        if c is None:
            return Refused(404, "campaign_not_found")
        if c.ended_at is not None:
            return Refused(409, "campaign_ended")
        c.ended_at = self.now
        return {"campaign_id": campaign_id}

    def _period(self, at: datetime, period: str) -> tuple:
        local = at.astimezone(self.zone)
        return {
            "day": (local.year, local.month, local.day),
            "week": tuple(local.isocalendar())[:2],
            "month": (local.year, local.month),
            "campaign": (),
        }[period]

    def _qualifies(self, c: Campaign, m: Member, store_id: str, amount_cents: int, at: datetime, tier: str,
                   first: bool) -> bool:
        if not (c.starts_at <= at < c.ends_at) or (c.ended_at is not None and at >= c.ended_at):
            return False
        cond = c.conditions
        weekday = WEEKDAY_NAMES[at.astimezone(self.zone).weekday()]
        if cond.get("store_ids") is not None and store_id not in cond["store_ids"]:
            return False
        if cond.get("tiers") is not None and tier not in cond["tiers"]:
            return False
        if cond.get("weekdays") is not None and weekday not in cond["weekdays"]:
            return False
        if cond.get("min_amount_cents") is not None and amount_cents < cond["min_amount_cents"]:
            return False
        if cond.get("first_purchase_only") and not first:
            return False
        if c.per_member_limit is not None:
            period = self._period(at, c.per_member_period)
            taken = [t for t in m.rewarded.get(c.campaign_id, []) if self._period(t, c.per_member_period) == period]
            if len(taken) >= c.per_member_limit:
                return False
        return True

    def _campaign_rewards(self, m: Member, purchase: Purchase, store_id: str, tier: str, first: bool,
                          p: Programme) -> list[tuple[str, int, str | None]]:
        rewards = []
        at = purchase.at
        for c in sorted(self.campaigns.values(), key=lambda c: c.campaign_id.encode()):
            if not self._qualifies(c, m, store_id, purchase.amount_cents, at, tier, first):
                continue
            reward = c.reward
            if reward["kind"] == "coupon":
                if c.budget_coupons is not None and c.coupons >= c.budget_coupons:
                    c.ran_out = True
                    continue
                n = m.campaign_coupons.get(c.campaign_id, 0) + 1
                while f"{c.campaign_id}-{n}" in m.coupons:
                    n += 1
                coupon_id = f"{c.campaign_id}-{n}"
                m.campaign_coupons[c.campaign_id] = m.campaign_coupons.get(c.campaign_id, 0) + 1
                expires_at = at + timedelta(hours=24 * reward["valid_days"])
                m.coupons[coupon_id] = Coupon(coupon_id, at, at, expires_at, reward["min_spend_cents"])
                c.coupons += 1
                m.rewarded.setdefault(c.campaign_id, []).append(at)
                rewards.append((c.campaign_id, 0, coupon_id))
                continue
            if reward["kind"] == "multiplier":
                full = purchase.points * (reward["multiplier_pct"] - 100) // 100
            else:
                full = reward["points"]
            granted = full if c.budget_points is None else min(full, c.budget_points - c.points)
            if granted < full:
                c.ran_out = True
            if granted <= 0:
                continue
            bucket_id = f"c:{c.campaign_id}:{purchase.purchase_id}"
            self._credit(m, bucket_id, at, at + timedelta(days=p.pending_days), granted, p)
            purchase.campaign_buckets.append(bucket_id)
            m.totals.append((at, "earned", granted))
            c.points += granted
            m.rewarded.setdefault(c.campaign_id, []).append(at)
            rewards.append((c.campaign_id, granted, None))
        purchase.points += sum(granted for _, granted, _ in rewards)
        return rewards

    # -- helpers -----------------------------------------------------------------

    def _time(self, given: datetime | None) -> datetime | Refused:
        if given is None:
            return self.now
        if given > self.now + FUTURE_TOLERANCE:
            return Refused(422, "occurred_at_in_future")
        if given < self.now - timedelta(days=self.p.max_backdate_days):
            return Refused(422, "occurred_at_too_old")
        return given

    def _tier_names(self) -> list[str]:
        return [t.name for t in self.p.tiers]

    def _tier_index(self, name: str) -> int:
        return self._tier_names().index(name)

    def _qualified(self, growth: int) -> str:
        name = self.p.tiers[0].name
        for tier in self.p.tiers:
            if tier.threshold <= growth:
                name = tier.name
        return name

    def remaining(self, m: Member, b: Bucket, at: datetime | None = None) -> int:
        return b.amount + sum(n for (t, bid, n) in m.moves if bid == b.bucket_id and _upto(t, at))

    def debt_of(self, m: Member, at: datetime | None = None) -> int:
        return sum(n for (t, n) in m.debt if _upto(t, at))

    def allowed(self, m: Member, b: Bucket, at: datetime) -> int:
        """What a burn dated ``at`` may take from ``b``: it shows in every as-of view from ``at`` on,
        so no more than the bucket holds in the emptiest of them (today's, for a burn dated now)."""
        later = [t for (t, bid, _) in m.moves if bid == b.bucket_id and t > at]
        return min(self.remaining(m, b, t) for t in [at, *later])

    def _available_buckets(self, m: Member, at: datetime) -> list[tuple[Bucket, int]]:
        """(bucket, allowed) of buckets available at ``at``: soonest expiry first, then oldest, then log order."""
        usable = [(b, self.allowed(m, b, at)) for b in m.buckets if b.available_at <= at < b.expires_at]
        usable = [(b, n) for (b, n) in usable if n > 0 and self.remaining(m, b) > 0]
        return sorted(usable, key=lambda pair: (pair[0].expires_at, pair[0].at, pair[0].seq))

    def spendable(self, member_id: str, at: datetime) -> int:
        """What a burn dated ``at`` may take: never overdrawing, today or in any view from ``at`` on."""
        m = self.members[member_id]
        return sum(n for (_, n) in self._available_buckets(m, at)) - self.debt_of(m)

    def available_today(self, member_id: str, at: datetime) -> int:
        """The answer's ``available``: today's remaining of the buckets available at ``at``, less debt."""
        m = self.members[member_id]
        return sum(self.remaining(m, b) for b in m.buckets if b.available_at <= at < b.expires_at) - self.debt_of(m)

    def _take(self, sources: list[tuple[Bucket, int]], points: int) -> tuple[list[tuple[str, int]], int]:
        parts = []
        for b, allowed in sources:
            if points == 0:
                break
            n = min(allowed, points)
            if n > 0:
                parts.append((b.bucket_id, n))
                points -= n
        return parts, points

    def _burn(self, m: Member, at: datetime, parts: list[tuple[str, int]], sign: int = -1) -> None:
        for bucket_id, n in parts:
            if sign < 0:
                # A late burn may spend points the expire job already recorded as expired
                # (it is dated before expires_at): the record of them is taken back.
                b = self._bucket(m, bucket_id)
                excess = b.expired_recorded - (self.remaining(m, b) - n)
                if excess > 0:
                    b.expired_recorded -= min(excess, n)
            m.moves.append((at, bucket_id, sign * n))

    def _bucket(self, m: Member, bucket_id: str) -> Bucket:
        return next(b for b in m.buckets if b.bucket_id == bucket_id)

    def _credit(self, m: Member, bucket_id: str, at: datetime, available_at: datetime, points: int, p: Programme) -> int:
        """A credit pays debt first; the rest (if any) becomes a bucket. Returns the debt paid."""
        paid = min(max(self.debt_of(m), 0), points)
        if paid:
            m.debt.append((at, -paid))
        if points - paid > 0:
            m.buckets.append(
                Bucket(bucket_id, at, available_at, at + timedelta(days=p.points_expiry_days), points - paid, m.next_seq())
            )
        return paid

    def tier_now(self, m: Member, at: datetime | None = None) -> tuple[str, datetime | None]:
        last = None
        for t, name, hold in m.tiers:
            if _upto(t, at):
                last = (name, hold)
        return last or (self.p.tiers[0].name, None)

    def rolling_growth(self, m: Member, at: datetime) -> int:
        start = at - timedelta(days=self.p.tier_window_days)
        purchases = sum(
            p.growth - sum(g for (t, g) in p.growth_returns if t <= at)
            for p in m.purchases.values()
            if start < p.at <= at
        )
        return purchases + sum(a.growth for a in m.activities.values() if start < a.at <= at)

    def _upgrade(self, m: Member, at: datetime, tier: str, hold: datetime | None, cause: str | None) -> None:
        """Up to the tier rolling growth at ``at`` now reaches, if higher (cause None: no return undoes it)."""
        reached = self._qualified(self.rolling_growth(m, at))
        if self._tier_index(reached) > self._tier_index(tier):
            m.upgrades.append((cause, tier, hold))
            m.tiers.append((at, reached, at + timedelta(days=self.p.tier_hold_days)))

    def _member(self, member_id: str) -> Member | Refused:
        m = self.members.get(member_id)
        return m if m is not None else Refused(404, "member_not_found")

    def _note(self, m: Member, at: datetime) -> None:
        m.times.append(at)

    # -- commands ----------------------------------------------------------------

    def enrol(self, member_id: str, birthday: str | None = None, enrolled_at: datetime | None = None,
              referred_by: str | None = None):
        if member_id in self.members:
            return Refused(409, "member_exists")
        if referred_by == member_id:
            return Refused(422, "self_referral")
        at = self._time(enrolled_at)
        if isinstance(at, Refused):
            return at
        if referred_by is not None and referred_by not in self.members:
            return Refused(422, "referrer_not_found")
        m = Member(member_id, at, birthday, referred_by=referred_by)
        self.members[member_id] = m
        ids = []
        for n, template in enumerate(self.p.welcome_pack, start=1):
            coupon_id = f"welcome-{n}"
            m.coupons[coupon_id] = Coupon(
                coupon_id, at, at, at + timedelta(hours=24 * template.valid_days), template.min_spend_cents
            )
            ids.append(coupon_id)
        self._note(m, at)
        return {"coupons": ids}

    def purchase(self, member_id: str, purchase_id: str, amount_cents: int, occurred_at: datetime | None = None,
                 store_id: str = "s1"):
        m = self._member(member_id)
        if isinstance(m, Refused):
            return m
        if purchase_id in m.purchases:
            return Duplicate(f"purchase:{purchase_id}")
        at = self._time(occurred_at)
        if isinstance(at, Refused):
            return at
        p = self.programme_at(at)
        referral = self._referral(m, amount_cents, at, p)
        tier, hold = self.tier_now(m)
        tier_pct = self.p.tiers[self._tier_index(tier)].multiplier_pct
        weekday = WEEKDAY_NAMES[at.astimezone(self.zone).weekday()]
        day_pct = p.member_day.multiplier_pct if weekday == p.member_day.weekday else 100
        points = amount_cents * tier_pct * day_pct // (p.earn_cents_per_point * 100 * 100)
        growth = amount_cents // self.p.growth_cents_per_unit
        first = not m.purchases
        purchase = m.purchases[purchase_id] = Purchase(purchase_id, at, amount_cents, points, growth)
        m.totals.append((at, "earned", points))
        paid = self._credit(m, f"p:{purchase_id}", at, at + timedelta(days=p.pending_days), points, p)
        debt_before = self.debt_of(m)
        rewards = self._campaign_rewards(m, purchase, store_id, tier, first, p)
        paid += debt_before - self.debt_of(m)
        self._upgrade(m, at, tier, hold, purchase_id)
        self._note(m, at)
        return {
            "points": purchase.points,
            "base_points": points,
            "rewards": rewards,
            "growth": growth,
            "tier": self.tier_now(m)[0],
            "debt_paid": paid,
            "referral": referral,
        }

    def _referral(self, m: Member, amount_cents: int, at: datetime, p: Programme) -> dict | None:
        """CONTRACT §6.4, on the referee's first purchase (called before it is recorded)."""
        rule = p.referral
        if m.referred_by is None or m.purchases:
            return None
        if amount_cents < rule.min_first_purchase_cents or at >= m.enrolled_at + timedelta(days=rule.within_days):
            return None
        template = rule.referee_coupon
        m.coupons["referral-1"] = Coupon(
            "referral-1", at, at, at + timedelta(hours=24 * template.valid_days), template.min_spend_cents
        )
        referrer = self.members[m.referred_by]
        month = at.astimezone(self.zone).strftime("%Y-%m")
        this_month = [t for t in referrer.referral_rewards.values() if t.astimezone(self.zone).strftime("%Y-%m") == month]
        points = rule.referrer_points
        if points == 0 or (rule.monthly_cap and len(this_month) >= rule.monthly_cap):
            points = 0
        else:
            referrer.referral_rewards[m.member_id] = at
            referrer.totals.append((at, "earned", points))
            self._credit(referrer, f"r:{m.member_id}", at, at + timedelta(days=p.pending_days), points, p)
            self._note(referrer, at)
        return {"referrer_id": m.referred_by, "referrer_points": points, "coupon_id": "referral-1"}

    def activity(self, member_id: str, activity_id: str, activity_type: str, occurred_at: datetime | None = None):
        """CONTRACT §6.3: programme points at once (no multiplier), growth, caps by local day and in all."""
        m = self._member(member_id)
        if isinstance(m, Refused):
            return m
        if activity_id in m.activities:
            return Duplicate(f"activity:{activity_id}")
        at = self._time(occurred_at)
        if isinstance(at, Refused):
            return at
        entry = next((a for a in self.p.activities if a.type == activity_type), None)
        if entry is None:
            return Refused(422, "unknown_activity")
        same_type = [a for a in m.activities.values() if a.type == activity_type]
        same_day = [a for a in same_type if a.at.astimezone(self.zone).date() == at.astimezone(self.zone).date()]
        if (entry.total_cap and len(same_type) >= entry.total_cap) or (entry.daily_cap and len(same_day) >= entry.daily_cap):
            return Refused(409, "activity_cap_reached")
        tier, hold = self.tier_now(m)
        m.activities[activity_id] = Activity(activity_id, activity_type, at, entry.growth)
        if entry.points:
            m.totals.append((at, "earned", entry.points))
            self._credit(m, f"t:{activity_id}", at, at, entry.points, self.programme_at(at))
        self._upgrade(m, at, tier, hold, None)
        self._note(m, at)
        return {"points": entry.points, "growth": entry.growth, "tier": self.tier_now(m)[0]}

    def ret(self, member_id: str, return_id: str, purchase_id: str, amount_cents: int, occurred_at: datetime | None = None):
        m = self._member(member_id)
        if isinstance(m, Refused):
            return m
        if return_id in m.returns:
            return Duplicate(f"return:{return_id}")
        p = m.purchases.get(purchase_id)
        if p is None:
            return Refused(404, "purchase_not_found")
        at = self._time(occurred_at)
        if isinstance(at, Refused):
            return at
        if at < p.at:
            return Refused(422, "return_before_purchase")
        returned_total = p.returned_cents + amount_cents
        if returned_total > p.amount_cents:
            return Refused(422, "return_exceeds_purchase")
        points = p.points * returned_total // p.amount_cents - p.clawed_points
        growth = p.growth * returned_total // p.amount_cents - p.clawed_growth
        p.returned_cents = returned_total
        p.clawed_points += points
        p.clawed_growth += growth
        p.growth_returns.append((at, growth))
        m.returns.add(return_id)
        own_ids = [f"p:{purchase_id}", *p.campaign_buckets]  # the regular bucket, then the campaigns' in id order
        own = [(b, self.allowed(m, b, at)) for i in own_ids for b in m.buckets if b.bucket_id == i and at < b.expires_at]
        others = [(b, n) for (b, n) in self._available_buckets(m, at) if b.bucket_id not in own_ids]
        parts, shortfall = self._take(own + others, points)
        self._burn(m, at, parts)
        written_off = 0
        if shortfall and self.p.return_shortfall == "debt":
            m.debt.append((at, shortfall))
        else:
            written_off = shortfall
        m.totals.append((at, "clawed", points - written_off))
        # Returning the purchase that caused the current tier may undo that upgrade.
        if m.upgrades and m.upgrades[-1][0] == purchase_id:
            tier, _hold = self.tier_now(m)
            if self.rolling_growth(m, at) < self.p.tiers[self._tier_index(tier)].threshold:
                _cause, from_tier, from_hold = m.upgrades.pop()
                m.tiers.append((at, from_tier, from_hold))
        self._note(m, at)
        return {
            "points_clawed": points,
            "growth_clawed": growth,
            "debt": self.debt_of(m),
            "written_off": written_off,
            "buckets": parts,
            "tier": self.tier_now(m)[0],
        }

    def redeem(self, member_id: str, redemption_id: str, points: int, occurred_at: datetime | None = None):
        m = self._member(member_id)
        if isinstance(m, Refused):
            return m
        if redemption_id in m.redemptions:
            return Duplicate(f"redemption:{redemption_id}")
        at = self._time(occurred_at)
        if isinstance(at, Refused):
            return at
        if points > self.spendable(member_id, at):
            return Refused(409, "insufficient_points")
        parts, shortfall = self._take(self._available_buckets(m, at), points)
        assert shortfall == 0
        self._burn(m, at, parts)
        m.totals.append((at, "redeemed", points))
        m.redemptions[redemption_id] = Redemption(at, points, parts)
        self._note(m, at)
        return {"consumed": parts, "available": self.available_today(member_id, at)}

    def reverse(self, member_id: str, redemption_id: str, occurred_at: datetime | None = None):
        m = self._member(member_id)
        if isinstance(m, Refused):
            return m
        r = m.redemptions.get(redemption_id)
        if r is None:
            return Refused(404, "redemption_not_found")
        if r.reversed:
            return Duplicate(f"redemption_reversal:{redemption_id}")
        at = self._time(occurred_at)
        if isinstance(at, Refused):
            return at
        if at < r.at:  # a reversal cannot happen before what it undoes
            return Refused(422, "occurred_at_before_original")
        self._burn(m, at, r.parts, sign=+1)
        expired = []
        for bucket_id, n in r.parts:
            b = self._bucket(m, bucket_id)
            # Restored past its expiry: expired at once (in the answer). Into a bucket the expire job
            # wrote off, dated before its expiry: expired at its expires_at, recorded now.
            if b.expires_at <= at or b.expiry_recorded:
                b.expired_recorded += n
            if b.expires_at <= at:
                expired.append((bucket_id, n))
        m.totals.append((at, "redeemed", -r.points))
        r.reversed = True
        self._note(m, at)
        return {"restored": list(r.parts), "expired": expired, "available": self.available_today(member_id, at)}

    def adjust(self, member_id: str, adjustment_id: str, points: int, occurred_at: datetime | None = None):
        m = self._member(member_id)
        if isinstance(m, Refused):
            return m
        if adjustment_id in m.adjustments:
            return Duplicate(f"adjustment:{adjustment_id}")
        at = self._time(occurred_at)
        if isinstance(at, Refused):
            return at
        paid = 0
        if points > 0:
            paid = self._credit(m, f"a:{adjustment_id}", at, at, points, self.programme_at(at))
        else:
            if -points > self.spendable(member_id, at):
                return Refused(409, "insufficient_points")
            parts, _ = self._take(self._available_buckets(m, at), -points)
            self._burn(m, at, parts)
        m.adjustments.add(adjustment_id)
        m.totals.append((at, "adjusted", points))
        self._note(m, at)
        return {"debt_paid": paid, "available": self.available_today(member_id, at)}

    def issue_coupon(
        self,
        member_id: str,
        coupon_id: str,
        template: str,
        value_cents: int,
        min_spend_cents: int,
        expires_at: datetime,
        valid_from: datetime | None = None,
        points_cost: int | None = None,
        occurred_at: datetime | None = None,
    ):
        m = self._member(member_id)
        if isinstance(m, Refused):
            return m
        if coupon_id in m.coupons:
            return Duplicate(f"coupon:{coupon_id}")
        at = self._time(occurred_at)
        if isinstance(at, Refused):
            return at
        valid_from = valid_from or at
        if expires_at <= valid_from:
            return Refused(422, "validation_failed")
        if points_cost:
            if points_cost > self.spendable(member_id, at):
                return Refused(409, "insufficient_points")
            parts, _ = self._take(self._available_buckets(m, at), points_cost)
            self._burn(m, at, parts)
            m.totals.append((at, "redeemed", points_cost))
        m.coupons[coupon_id] = Coupon(coupon_id, at, valid_from, expires_at, min_spend_cents)
        self._note(m, at)
        return {"status": self._coupon_state(m.coupons[coupon_id], at)}

    def _recorded_state(self, c: Coupon, limit: datetime | None = None) -> str:
        """issued, redeemed or voided after the changes dated <= ``limit`` (all when None), log order."""
        state = "issued"
        for t, s in c.changes:
            if _upto(t, limit):
                state = s
        return state

    def _coupon_state(self, c: Coupon, at: datetime, limit: datetime | None = None) -> str:
        """The state read by date at ``at``: an issued coupon past expires_at is expired."""
        state = self._recorded_state(c, limit)
        if state == "issued" and c.expires_at <= at:
            return "expired"
        return state

    def _coupon(self, member_id: str, coupon_id: str):
        m = self._member(member_id)
        if isinstance(m, Refused):
            return m, m
        c = m.coupons.get(coupon_id)
        return m, (c if c is not None else Refused(404, "coupon_not_found"))

    def redeem_coupon(self, member_id: str, coupon_id: str, order_amount_cents: int, occurred_at: datetime | None = None):
        m, c = self._coupon(member_id, coupon_id)
        if isinstance(c, Refused):
            return c
        at = self._time(occurred_at)
        if isinstance(at, Refused):
            return at
        state = self._coupon_state(c, at)
        if state != "issued":
            return Refused(409, "coupon_not_redeemable", "already_redeemed" if state == "redeemed" else state)
        if at < c.valid_from:
            return Refused(409, "coupon_not_redeemable", "not_yet_valid")
        if order_amount_cents < c.min_spend_cents:
            return Refused(409, "coupon_not_redeemable", "min_spend_not_met")
        c.changes.append((at, "redeemed"))
        self._note(m, at)
        return {"status": self._coupon_state(c, at)}

    def reverse_coupon(self, member_id: str, coupon_id: str, occurred_at: datetime | None = None):
        m, c = self._coupon(member_id, coupon_id)
        if isinstance(c, Refused):
            return c
        if self._recorded_state(c) != "redeemed":
            return Refused(409, "coupon_not_redeemed")
        at = self._time(occurred_at)
        if isinstance(at, Refused):
            return at
        redeemed_at = [t for (t, state) in c.changes if state == "redeemed"][-1]
        if at < redeemed_at:
            return Refused(422, "occurred_at_before_original")
        c.changes.append((at, "issued"))
        self._note(m, at)
        return {"status": self._coupon_state(c, at)}

    def void_coupon(self, member_id: str, coupon_id: str, occurred_at: datetime | None = None):
        m, c = self._coupon(member_id, coupon_id)
        if isinstance(c, Refused):
            return c
        at = self._time(occurred_at)
        if isinstance(at, Refused):
            return at
        state = self._coupon_state(c, at)
        if state != "issued":
            return Refused(409, "coupon_not_redeemable", state)
        c.changes.append((at, "voided"))
        self._note(m, at)
        return {"status": self._coupon_state(c, at)}

    # -- time jobs ---------------------------------------------------------------

    def run_job(self, name: str, as_of: datetime):
        job = {"expire": self._expire, "tiers": self._review_tier, "birthdays": self._birthday}[name]
        return {"appended": sum(job(m, as_of) for m in self.members.values())}

    def _expire(self, m: Member, as_of: datetime) -> int:
        """Changes no balance; one points_expired per bucket that held points at its expiry."""
        appended = 0
        for b in m.buckets:
            unrecorded = self.remaining(m, b) - b.expired_recorded
            if b.expires_at <= as_of and not b.expiry_recorded and unrecorded > 0:
                b.expiry_recorded = True
                b.expired_recorded += unrecorded
                appended += 1
        for c in m.coupons.values():
            if self._coupon_state(c, as_of) == "expired" and not c.expiry_recorded:
                c.expiry_recorded = True
                appended += 1
        return appended

    def _review_tier(self, m: Member, as_of: datetime) -> int:
        tier, hold = self.tier_now(m)
        if self.p.downgrade == "never" or hold is None or hold > as_of:
            return 0
        index = self._tier_index(tier)
        qualified = self._tier_index(self._qualified(self.rolling_growth(m, as_of)))
        if qualified >= index:
            return 0
        target = index - 1 if self.p.downgrade == "one_step" else qualified
        new_hold = as_of + timedelta(days=self.p.tier_hold_days) if target > 0 else None
        m.tiers.append((as_of, self.p.tiers[target].name, new_hold))
        m.upgrades.clear()
        self._note(m, as_of)
        return 1

    def _birthday(self, m: Member, as_of: datetime) -> int:
        if m.birthday is None or m.enrolled_at > as_of:
            return 0
        local = as_of.astimezone(self.zone)
        coupon_id = f"birthday-{local.year}"
        if int(m.birthday[:2]) != local.month or coupon_id in m.coupons:
            return 0
        template = self.p.birthday_coupon
        m.coupons[coupon_id] = Coupon(
            coupon_id, as_of, as_of, as_of + timedelta(hours=24 * template.valid_days), template.min_spend_cents
        )
        self._note(m, as_of)
        return 1

    # -- reads -------------------------------------------------------------------

    def balance(self, member_id: str, at: datetime):
        m = self._member(member_id)
        if isinstance(m, Refused):
            return m
        available = pending = expiring = expired = 0
        for b in m.buckets:
            if b.at > at:
                continue
            left = self.remaining(m, b, at)
            if b.expires_at <= at:
                expired += left
            elif at < b.available_at:
                pending += left
            else:
                available += left
                if b.expires_at <= at + timedelta(days=30):
                    expiring += left
        debt = self.debt_of(m, at)

        def total(kind: str) -> int:
            return sum(n for (t, k, n) in m.totals if k == kind and t <= at)

        return {
            "available": available - debt,
            "pending": pending,
            "debt": debt,
            "expiring_30d": expiring,
            "lifetime_earned": total("earned"),
            "lifetime_clawed": total("clawed"),
            "lifetime_adjusted": total("adjusted"),
            "lifetime_redeemed": total("redeemed"),
            "lifetime_expired": expired,
        }

    def tier(self, member_id: str, at: datetime):
        m = self._member(member_id)
        if isinstance(m, Refused):
            return m
        tier, hold = self.tier_now(m, at)
        growth = self.rolling_growth(m, at)
        index = self._tier_index(tier)
        following = self.p.tiers[index + 1] if index + 1 < len(self.p.tiers) else None
        return {
            "tier": tier,
            "growth_window": growth,
            "next_tier": following.name if following else None,
            # CONTRACT: "the next tier's threshold minus growth_window"; README: never below 0
            # (a member whose growth passed the next threshold without a purchase, e.g. after
            # a revert or a one_step downgrade, needs none).
            "growth_needed": max(following.threshold - growth, 0) if following else 0,
            "hold_until": hold,
        }

    def coupon_status(self, member_id: str, coupon_id: str, at: datetime) -> str | None:
        m = self.members.get(member_id)
        c = m.coupons.get(coupon_id) if m else None
        if c is None or c.issued_at > at:
            return None
        return self._coupon_state(c, at, limit=at)

    def buckets(self, member_id: str, at: datetime | None = None) -> list[tuple[str, int, int]]:
        m = self.members[member_id]
        return [(b.bucket_id, b.amount, self.remaining(m, b, at)) for b in m.buckets if _upto(b.at, at)]

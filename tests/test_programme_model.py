"""The whole programme as random histories, checked against a pure model (CONTRACT §2).

A hypothesis state machine enrols members and applies random purchases (late
ones and member-day ones included), returns, redemptions, reversals,
adjustments, coupon operations, clock advances and time jobs, through a
``Driver``, and runs the same commands on ``tests/model.py``. After every
step the two must agree on balances (now and as of past times), tiers and
coupon states, and the contract's invariants must hold.

The driver is the only part that knows the system under test: ``DomainDriver``
runs the pure domain (``decide`` + ``evolve``); a driver that speaks HTTP to
the application over a database answers the same questions the same way, so
this machine can be pointed at it unchanged.
"""

from __future__ import annotations

import abc
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from events import catalogue as ev
from ledger import commands as cmd
from ledger import referrals
from ledger.campaigns import CampaignBook, Spend, add_spend, decide_create, decide_end, grants_in
from ledger.decide import CampaignContext, Decided, command_time, decide
from ledger.errors import DuplicateCommand, Refusal
from ledger.programme import WEEKDAYS, Activity, Programme, ProgrammeHistory, ReferralRule, decide_change, decide_seed
from ledger.state import Fact, MemberState, evolve, fold
from ledger.views import available_points, balance, current_tier, tier_view
from tests.model import WEEKDAY_NAMES, Duplicate, Model, Refused

# A Monday, 10:00 in Shanghai.
START = datetime(2025, 1, 6, 2, 0, tzinfo=timezone.utc)
MEMBER_IDS = ("m1", "m2", "m3")
BALANCE_FIELDS = (
    "available",
    "pending",
    "debt",
    "expiring_30d",
    "lifetime_earned",
    "lifetime_clawed",
    "lifetime_adjusted",
    "lifetime_redeemed",
    "lifetime_expired",
)

Result = dict | Refused | Duplicate


class Driver(abc.ABC):
    """What the state machine needs from a system under test.

    Commands answer a dict (the fields the model computes), ``Refused`` or
    ``Duplicate`` (a natural id used before; over HTTP: a replayed answer).
    """

    @abc.abstractmethod
    def set_now(self, now: datetime) -> None: ...

    @abc.abstractmethod
    def enrol(self, member_id: str, birthday: str | None = None, enrolled_at: datetime | None = None,
              referred_by: str | None = None) -> Result: ...

    @abc.abstractmethod
    def purchase(self, member_id, purchase_id, amount_cents, occurred_at=None, store_id="s1") -> Result:
        """``{points, base_points, rewards: [(campaign_id, points, coupon_id)], growth, tier, debt_paid}``."""

    @abc.abstractmethod
    def ret(self, member_id, return_id, purchase_id, amount_cents, occurred_at=None) -> Result: ...

    @abc.abstractmethod
    def activity(self, member_id, activity_id, activity_type, occurred_at=None) -> Result: ...

    @abc.abstractmethod
    def redeem(self, member_id, redemption_id, points, occurred_at=None) -> Result: ...

    @abc.abstractmethod
    def reverse(self, member_id, redemption_id, occurred_at=None) -> Result: ...

    @abc.abstractmethod
    def adjust(self, member_id, adjustment_id, points, occurred_at=None) -> Result: ...

    @abc.abstractmethod
    def issue_coupon(
        self, member_id, coupon_id, template, value_cents, min_spend_cents, expires_at,
        valid_from=None, points_cost=None, occurred_at=None,
    ) -> Result: ...

    @abc.abstractmethod
    def redeem_coupon(self, member_id, coupon_id, order_amount_cents, occurred_at=None) -> Result: ...

    @abc.abstractmethod
    def reverse_coupon(self, member_id, coupon_id, occurred_at=None) -> Result: ...

    @abc.abstractmethod
    def void_coupon(self, member_id, coupon_id, occurred_at=None) -> Result: ...

    @abc.abstractmethod
    def run_job(self, name: str, as_of: datetime) -> Result: ...

    @abc.abstractmethod
    def change_programme(self, settings: dict, effective_from: datetime | None = None) -> Result:
        """``{version}``."""

    @abc.abstractmethod
    def create_campaign(self, body: dict) -> Result:
        """``{campaign_id}``; ``body`` as POST /v1/campaigns takes it (times as datetimes)."""

    @abc.abstractmethod
    def end_campaign(self, campaign_id: str) -> Result: ...

    @abc.abstractmethod
    def campaign_spend(self, campaign_id: str) -> tuple[int, int]:
        """(points, coupons) the campaign has granted."""

    @abc.abstractmethod
    def log_version(self) -> object:
        """Anything that changes when anything is appended (a refusal must leave it alone)."""

    @abc.abstractmethod
    def balance(self, member_id: str, at: datetime) -> dict: ...

    @abc.abstractmethod
    def tier(self, member_id: str, at: datetime) -> dict: ...

    @abc.abstractmethod
    def coupon_status(self, member_id: str, coupon_id: str, at: datetime) -> str | None: ...

    @abc.abstractmethod
    def buckets(self, member_id: str, at: datetime | None = None) -> list[tuple[str, int, int]]:
        """(bucket_id, amount, remaining) of every bucket, now or as of ``at``."""

    @abc.abstractmethod
    def version(self, member_id: str) -> int:
        """The member's stream version (0 for no such member)."""

    @abc.abstractmethod
    def activities(self, member_id: str) -> list[tuple[str, str, datetime]]:
        """(activity_id, type, occurred_at) of every activity the member has recorded."""

    @abc.abstractmethod
    def referral_rewards(self, member_id: str) -> list[tuple[str, datetime]]:
        """(referee, occurred_at) of every referral reward in the member's stream, in log order."""


def _parts(parts: list[ev.BucketPoints]) -> list[tuple[str, int]]:
    return [(p.bucket_id, p.points) for p in parts]


class DomainDriver(Driver):
    """The pure domain: ``decide`` then ``evolve`` each decided event, per member."""

    def __init__(self, programme: Programme, now: datetime) -> None:
        self.programme = programme
        self.now = now
        self.states: dict[str, MemberState] = {}
        self.facts: dict[str, list[Fact]] = {}
        self._folds: dict[tuple[str, int, datetime], MemberState] = {}
        self.history = ProgrammeHistory()
        self.history.evolve(decide_seed(self.history, programme, now))
        self.book = CampaignBook()
        self.spend: dict[str, Spend] = {}

    def set_now(self, now: datetime) -> None:
        self.now = now

    def _run(self, member_id: str, command: cmd.Command):
        state = self.states.get(member_id, MemberState())
        programme = self.history.in_force(command_time(command, self.now))
        try:
            decided = decide(state, command, programme, self.now, CampaignContext(self.book, self.spend))
        except Refusal as refusal:
            return Refused(refusal.status, refusal.code, refusal.extra.get("reason"))
        except DuplicateCommand as duplicate:
            return Duplicate(duplicate.natural_key)
        if isinstance(command, cmd.Enrol) and command.referred_by not in (None, *self.states):
            return Refused(422, "referrer_not_found")
        reward = None
        if referrals.referee_coupon(d.event for d in decided) is not None:  # the referrer's part, on its own state
            reward = referrals.referrer_reward(self.states[state.referred_by], member_id, decided[0].occurred_at, programme)
        self._record(member_id, state, decided)
        for grant in grants_in((d.event for d in decided), self.book):
            self.spend[grant.campaign_id] = add_spend(self.spend.get(grant.campaign_id, Spend()), grant)
        if reward is not None:
            self._record(state.referred_by, self.states[state.referred_by], [Decided(decided[0].occurred_at, reward)])
        return [d.event for d in decided] + ([reward] if reward else [])

    def _record(self, member_id: str, state: MemberState, decided: list[Decided]) -> None:
        facts = self.facts.setdefault(member_id, [])
        for d in decided:
            fact = Fact(d.event, d.occurred_at, state.version + 1)
            evolve(state, fact)
            facts.append(fact)
        self.states[member_id] = state

    def _rules(self, decide_event, evolve_event, answer):
        try:
            event = decide_event()
        except Refusal as refusal:
            return Refused(refusal.status, refusal.code, refusal.extra.get("reason"))
        evolve_event(event)
        return answer(event)

    def change_programme(self, settings, effective_from=None):
        return self._rules(
            lambda: decide_change(self.history, settings, effective_from, self.now),
            self.history.evolve, lambda event: {"version": event.version},
        )

    def create_campaign(self, body):
        command = msgspec.convert(body, cmd.CreateCampaign)
        return self._rules(
            lambda: decide_create(self.book, command, self.now),
            self.book.evolve, lambda event: {"campaign_id": event.campaign_id},
        )

    def end_campaign(self, campaign_id):
        return self._rules(
            lambda: decide_end(self.book, campaign_id, "state machine", self.now),
            self.book.evolve, lambda event: {"campaign_id": event.campaign_id},
        )

    def campaign_spend(self, campaign_id):
        spent = self.spend.get(campaign_id, Spend())
        return spent.points, spent.coupons

    def log_version(self):
        return (self.history.stream_version, self.book.stream_version)

    def _one(self, events, kind):
        return next(e for e in events if isinstance(e, kind))

    def enrol(self, member_id, birthday=None, enrolled_at=None, referred_by=None):
        command = cmd.Enrol(member_id=member_id, birthday=birthday, enrolled_at=enrolled_at, referred_by=referred_by)
        out = self._run(member_id, command)
        if isinstance(out, (Refused, Duplicate)):
            return out
        return {"coupons": [e.coupon_id for e in out if isinstance(e, ev.CouponIssued)]}

    def purchase(self, member_id, purchase_id, amount_cents, occurred_at=None, store_id="s1"):
        command = cmd.RecordPurchase(purchase_id=purchase_id, store_id=store_id, amount_cents=amount_cents, occurred_at=occurred_at)
        out = self._run(member_id, command)
        if isinstance(out, (Refused, Duplicate)):
            return out
        earned = self._one(out, ev.PointsEarned)
        state = self.states[member_id]
        rewards = [
            (e.campaign_id, e.points if isinstance(e, ev.PointsEarned) else 0,
             e.coupon_id if isinstance(e, ev.CouponIssued) else None)
            for e in out if getattr(e, "campaign_id", None) is not None
        ]
        coupon = referrals.referee_coupon(out)
        reward = next((e for e in out if isinstance(e, ev.PointsEarned) and e.referral_of), None)
        referral = None if coupon is None else {
            "referrer_id": state.referred_by, "referrer_points": reward.points if reward else 0, "coupon_id": coupon.coupon_id,
        }
        return {
            "points": earned.points + sum(points for _, points, _ in rewards),
            "base_points": earned.points,
            "rewards": rewards,
            "growth": earned.growth,
            "tier": current_tier(state, self.programme),
            # The referee's own credits: the regular points and the campaigns' (not the referrer's reward).
            "debt_paid": sum(e.debt_paid for e in out if isinstance(e, ev.PointsEarned) and not e.referral_of),
            "referral": referral,
        }

    def activity(self, member_id, activity_id, activity_type, occurred_at=None):
        out = self._run(member_id, cmd.RecordActivity(activity_id=activity_id, type=activity_type, occurred_at=occurred_at))
        if isinstance(out, (Refused, Duplicate)):
            return out
        recorded = self._one(out, ev.ActivityRecorded)
        return {"points": recorded.points, "growth": recorded.growth, "tier": current_tier(self.states[member_id], self.programme)}

    def ret(self, member_id, return_id, purchase_id, amount_cents, occurred_at=None):
        command = cmd.RecordReturn(return_id=return_id, purchase_id=purchase_id, amount_cents=amount_cents, occurred_at=occurred_at)
        out = self._run(member_id, command)
        if isinstance(out, (Refused, Duplicate)):
            return out
        clawed = self._one(out, ev.PointsClawedBack)
        state = self.states[member_id]
        return {
            "points_clawed": clawed.points,
            "growth_clawed": clawed.growth,
            "debt": state.debt,
            "written_off": clawed.written_off,
            "buckets": _parts(clawed.buckets),
            "tier": current_tier(state, self.programme),
        }

    def redeem(self, member_id, redemption_id, points, occurred_at=None):
        out = self._run(member_id, cmd.Redeem(redemption_id=redemption_id, points=points, occurred_at=occurred_at))
        if isinstance(out, (Refused, Duplicate)):
            return out
        redeemed = self._one(out, ev.PointsRedeemed)
        at = occurred_at or self.now
        return {"consumed": _parts(redeemed.buckets), "available": available_points(self.states[member_id], at)}

    def reverse(self, member_id, redemption_id, occurred_at=None):
        out = self._run(member_id, cmd.ReverseRedemption(redemption_id=redemption_id, occurred_at=occurred_at))
        if isinstance(out, (Refused, Duplicate)):
            return out
        reversed_ = self._one(out, ev.RedemptionReversed)
        at = occurred_at or self.now
        return {
            "restored": _parts(reversed_.buckets),
            "expired": _parts(reversed_.expired),
            "available": available_points(self.states[member_id], at),
        }

    def adjust(self, member_id, adjustment_id, points, occurred_at=None):
        command = cmd.Adjust(adjustment_id=adjustment_id, points=points, reason="goodwill", occurred_at=occurred_at)
        out = self._run(member_id, command)
        if isinstance(out, (Refused, Duplicate)):
            return out
        adjusted = self._one(out, ev.PointsAdjusted)
        at = occurred_at or self.now
        return {"debt_paid": adjusted.debt_paid, "available": available_points(self.states[member_id], at)}

    def _coupon_answer(self, out, member_id, coupon_id, occurred_at):
        if isinstance(out, (Refused, Duplicate)):
            return out
        return {"status": self.states[member_id].coupons[coupon_id].status_at(occurred_at or self.now)}

    def issue_coupon(self, member_id, coupon_id, template, value_cents, min_spend_cents, expires_at,
                     valid_from=None, points_cost=None, occurred_at=None):
        command = cmd.IssueCoupon(
            coupon_id=coupon_id, template=template, value_cents=value_cents, min_spend_cents=min_spend_cents,
            expires_at=expires_at, valid_from=valid_from, points_cost=points_cost, occurred_at=occurred_at,
        )
        return self._coupon_answer(self._run(member_id, command), member_id, coupon_id, occurred_at)

    def redeem_coupon(self, member_id, coupon_id, order_amount_cents, occurred_at=None):
        command = cmd.RedeemCoupon(
            coupon_id=coupon_id, order_ref="o1", order_amount_cents=order_amount_cents, occurred_at=occurred_at
        )
        return self._coupon_answer(self._run(member_id, command), member_id, coupon_id, occurred_at)

    def reverse_coupon(self, member_id, coupon_id, occurred_at=None):
        command = cmd.ReverseCouponRedemption(coupon_id=coupon_id, occurred_at=occurred_at)
        return self._coupon_answer(self._run(member_id, command), member_id, coupon_id, occurred_at)

    def void_coupon(self, member_id, coupon_id, occurred_at=None):
        command = cmd.VoidCoupon(coupon_id=coupon_id, reason="fraud", occurred_at=occurred_at)
        return self._coupon_answer(self._run(member_id, command), member_id, coupon_id, occurred_at)

    def run_job(self, name, as_of):
        job = {"expire": cmd.ExpireDue, "tiers": cmd.ReviewTier, "birthdays": cmd.IssueBirthdayCoupon}[name]
        appended = 0
        for member_id in sorted(self.states):
            out = self._run(member_id, job(as_of=as_of))
            assert isinstance(out, list), out
            appended += len(out)
        return {"appended": appended}

    def _as_of(self, member_id: str, at: datetime) -> MemberState:
        """The member as its events with occurred_at <= ``at`` (log order) make it."""
        state = self.states[member_id]
        key = (member_id, state.version, at)
        if key not in self._folds:
            if len(self._folds) > 256:
                self._folds.clear()
            self._folds[key] = fold(f for f in self.facts[member_id] if f.occurred_at <= at)
        return self._folds[key]

    def balance(self, member_id, at):
        b = balance(self._as_of(member_id, at), at)
        return {name: getattr(b, name) for name in BALANCE_FIELDS}

    def tier(self, member_id, at):
        view = tier_view(self._as_of(member_id, at), at, self.programme)
        return {
            "tier": view.tier,
            "growth_window": view.growth_window,
            "next_tier": view.next_tier,
            "growth_needed": view.growth_needed,
            "hold_until": view.hold_until,
        }

    def coupon_status(self, member_id, coupon_id, at):
        coupon = self._as_of(member_id, at).coupons.get(coupon_id)
        return coupon.status_at(at) if coupon is not None else None

    def buckets(self, member_id, at=None):
        state = self.states[member_id] if at is None else self._as_of(member_id, at)
        return [(b.bucket_id, b.amount, b.remaining) for b in state.buckets.values()]

    def version(self, member_id):
        state = self.states.get(member_id)
        return state.version if state is not None else 0

    def activities(self, member_id):
        return [(a.activity_id, a.type, a.occurred_at) for a in self.states[member_id].activities.values()]

    def referral_rewards(self, member_id):
        return [(f.event.referral_of, f.occurred_at) for f in self.facts[member_id]
                if isinstance(f.event, ev.PointsEarned) and f.event.referral_of]


# -- strategies ---------------------------------------------------------------------

AMOUNTS = st.one_of(
    st.sampled_from([1, 999, 1000, 9999, 10000, 25800, 100000, 299999, 300000, 600000]),
    st.integers(1, 800_000),
)
ADVANCES = st.one_of(
    st.sampled_from(
        [timedelta(minutes=1), timedelta(hours=7), timedelta(days=1), timedelta(days=7), timedelta(days=8),
         timedelta(days=30), timedelta(days=31), timedelta(days=200), timedelta(days=365), timedelta(days=400)]
    ),
    st.integers(1, 400 * 24 * 60).map(lambda minutes: timedelta(minutes=minutes)),
)


class ProgrammeMachine(RuleBasedStateMachine):
    """Random histories through a driver and the model, compared after every step."""

    programme = Programme()

    def __init__(self) -> None:
        super().__init__()
        self.now = START
        self.model = Model(self.programme, START)
        self.driver = self.make_driver(self.programme, START)
        self.counter = 0
        self.natural: list[tuple[str, tuple, dict]] = []  # accepted commands with a natural id
        self.earned: dict[tuple[str, str], tuple[int, int]] = {}  # (member, purchase) -> (points, growth)
        self.clawed: dict[tuple[str, str], tuple[int, int]] = {}
        self.granted: dict[str, list[int]] = {}  # campaign -> [points, coupons], from the purchases' answers
        self.rewarded: dict[tuple[str, str], list[datetime]] = {}  # (member, campaign) -> occurred_at of rewards

    def make_driver(self, programme: Programme, now: datetime) -> Driver:
        return DomainDriver(programme, now)

    # -- plumbing ------------------------------------------------------------------

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def do(self, method: str, *args, **kwargs) -> Result:
        """Run one command on both sides; they must answer alike; a refusal appends nothing."""
        before = {m: self.driver.version(m) for m in (*MEMBER_IDS, "ghost")}
        before["log"] = self.driver.log_version()
        expected = getattr(self.model, method)(*args, **kwargs)
        actual = getattr(self.driver, method)(*args, **kwargs)
        context = (method, args, kwargs, self.now)
        if isinstance(expected, (Refused, Duplicate)):
            if isinstance(expected, Refused):
                assert actual == expected, (context, expected, actual)
            else:
                assert isinstance(actual, Duplicate), (context, expected, actual)
            after = {m: self.driver.version(m) for m in MEMBER_IDS + ("ghost",)}
            after["log"] = self.driver.log_version()
            assert after == before, ("a refused command changed the member", context, expected)
        else:
            assert isinstance(actual, dict), (context, expected, actual)
            for key, value in expected.items():
                assert actual[key] == value, (context, key, expected, actual)
        return actual

    def members(self) -> list[str]:
        return sorted(self.model.members)

    def when(self, data) -> datetime | None:
        """An occurred_at: now (default), late within the window, on member day, or out of the window."""
        kind = data.draw(st.sampled_from(["default", "default", "default", "late", "member_day", "future", "too_old"]))
        back = timedelta(days=self.programme.max_backdate_days)
        if kind == "late":
            return self.now - timedelta(minutes=data.draw(st.integers(1, int(back.total_seconds() // 60))))
        if kind == "member_day":
            return self.member_day_moment(data) or None
        if kind == "future":
            return self.now + timedelta(minutes=5, seconds=data.draw(st.integers(1, 3600)))
        if kind == "too_old":
            return self.now - back - timedelta(seconds=data.draw(st.integers(1, 3600)))
        return None

    def member_day_moment(self, data) -> datetime | None:
        """A moment of the latest member day in the programme's timezone, within the backdate window."""
        zone = ZoneInfo(self.programme.timezone)
        local = self.now.astimezone(zone)
        minute_of_day = data.draw(st.sampled_from([0, 1, 600, 1439]))
        for back in range(8):
            day = (local - timedelta(days=back)).replace(hour=0, minute=0, second=0, microsecond=0)
            if WEEKDAY_NAMES[day.weekday()] == self.programme.member_day.weekday:
                moment = (day + timedelta(minutes=minute_of_day)).astimezone(timezone.utc)
                if self.now - timedelta(days=self.programme.max_backdate_days) <= moment <= self.now:
                    return moment
        return None

    # -- rules ---------------------------------------------------------------------

    @initialize(birthday=st.sampled_from([None, "01-15", "02-29", "03-01"]))
    def enrol_first(self, birthday):
        self.do("enrol", "m1", birthday=birthday)

    @precondition(lambda self: len(self.model.members) < len(MEMBER_IDS))
    @rule(member_id=st.sampled_from(MEMBER_IDS), month=st.integers(1, 12), day=st.integers(1, 28), with_birthday=st.booleans(),
          referrer=st.sampled_from([None, None, "m1", "m2", "m3", "self", "ghost"]))
    def enrol(self, member_id, month, day, with_birthday, referrer):
        birthday = f"{month:02d}-{day:02d}" if with_birthday else None
        self.do("enrol", member_id, birthday=birthday, referred_by=member_id if referrer == "self" else referrer)

    @precondition(lambda self: len(self.model.members) < len(MEMBER_IDS))
    @rule(data=st.data(), amount=AMOUNTS)
    def referee_enrols_and_buys(self, data, amount):
        """A member referred by another, whose first purchase (maybe a late one) may reward the referrer."""
        member_id = next(m for m in MEMBER_IDS if m not in self.model.members)
        self.do("enrol", member_id, referred_by=data.draw(st.sampled_from(self.members())))
        self.buy(data, amount, member_id)

    @precondition(lambda self: self.model.members)
    @rule(data=st.data(), amount=AMOUNTS)
    def purchase(self, data, amount):
        self.buy(data, amount)

    def buy(self, data, amount: int, member_id: str | None = None) -> None:
        member_id = member_id or data.draw(st.sampled_from(self.members()))
        purchase_id = self.fresh("p")
        store_id = data.draw(st.sampled_from(["s1", "s1", "s2"]))
        at = self.when(data)
        answer = self.do("purchase", member_id, purchase_id, amount, occurred_at=at, store_id=store_id)
        if isinstance(answer, dict):
            self.natural.append(("purchase", (member_id, purchase_id, amount), {"store_id": store_id}))
            self.earned[(member_id, purchase_id)] = (answer["points"], answer["growth"])
            assert answer["points"] == answer["base_points"] + sum(points for _, points, _ in answer["rewards"])
            for campaign_id, points, coupon_id in answer["rewards"]:
                granted = self.granted.setdefault(campaign_id, [0, 0])
                granted[0] += points
                granted[1] += coupon_id is not None
                self.rewarded.setdefault((member_id, campaign_id), []).append(at or self.now)

    # -- programme versions and campaigns ------------------------------------------

    @rule(
        settings=st.sampled_from([
            {}, {"earn_cents_per_point": 500}, {"earn_cents_per_point": 2000}, {"pending_days": 0},
            {"pending_days": 3}, {"points_expiry_days": 30}, {"member_day": {"weekday": "tuesday", "multiplier_pct": 300}},
        ]),
        when=st.sampled_from(["default", "now", "soon", "later", "past"]),
    )
    def change_programme(self, settings, when):
        """A new version, in force from now or later; one dated in the past is refused."""
        effective_from = {
            "default": None, "now": self.now, "soon": self.now + timedelta(hours=1),
            "later": self.now + timedelta(days=3), "past": self.now - timedelta(days=1),
        }[when]
        self.do("change_programme", settings, effective_from)

    @initialize(data=st.data(), count=st.integers(0, 3))
    def campaigns_from_the_start(self, data, count):
        """Running campaigns with few conditions, so that many purchases meet them."""
        for _ in range(count):
            self.create_campaign(data, timedelta(0), timedelta(days=60))

    @rule(
        data=st.data(),
        starts_in=st.sampled_from([timedelta(0), timedelta(minutes=-1), timedelta(minutes=-10), timedelta(hours=1),
                                   timedelta(days=2)]),
        length=st.sampled_from([timedelta(hours=1), timedelta(days=1), timedelta(days=7), timedelta(days=60),
                                timedelta(days=60), timedelta(0)]),
    )
    def new_campaign(self, data, starts_in, length):
        self.create_campaign(data, starts_in, length)

    def create_campaign(self, data, starts_in: timedelta, length: timedelta) -> None:
        existing = sorted(self.model.campaigns)
        taken = existing and data.draw(st.integers(0, 9)) == 0
        campaign_id = data.draw(st.sampled_from(existing)) if taken else self.fresh("c")
        kind = data.draw(st.sampled_from(["multiplier", "bonus", "coupon"]))
        reward = {
            "multiplier": lambda: {"kind": "multiplier", "multiplier_pct": data.draw(st.sampled_from([100, 150, 200, 300]))},
            "bonus": lambda: {"kind": "bonus", "points": data.draw(st.integers(1, 50))},
            "coupon": lambda: {"kind": "coupon", "template": "CAMP", "value_cents": 1000,
                               "min_spend_cents": data.draw(st.sampled_from([0, 5000])), "valid_days": 7},
        }[kind]()
        condition = data.draw(st.sampled_from([
            None, None, "store_ids", "tiers", "weekdays", "min_amount_cents", "first_purchase_only",
        ]))
        conditions = {} if condition is None else {condition: data.draw({
            "store_ids": st.sampled_from([["s1"], ["s2"], ["s1", "s2"]]),
            "tiers": st.sampled_from([["regular"], ["silver", "gold"]]),
            "weekdays": st.lists(st.sampled_from(WEEKDAYS), min_size=1, max_size=4, unique=True),
            "min_amount_cents": st.sampled_from([0, 10000, 100000]),
            "first_purchase_only": st.booleans(),
        }[condition])}
        body = {
            "campaign_id": campaign_id, "name": "random", "starts_at": self.now + starts_in,
            "ends_at": self.now + starts_in + length, "reward": reward, "conditions": conditions,
            "budget_points": data.draw(st.one_of(st.none(), st.integers(1, 60))),
            "budget_coupons": data.draw(st.one_of(st.none(), st.integers(1, 3))),
            "per_member_limit": data.draw(st.sampled_from([None, None, 1, 2])),
            "per_member_period": data.draw(st.sampled_from(["day", "week", "month", "campaign"])),
        }
        self.do("create_campaign", body)

    @precondition(lambda self: self.model.campaigns)
    @rule(data=st.data(), unknown=st.booleans())
    def end_campaign(self, data, unknown):
        campaign_id = "nope" if unknown else data.draw(st.sampled_from(sorted(self.model.campaigns)))
        self.do("end_campaign", campaign_id)

    @invariant()
    def budgets_and_per_member_limits_hold(self):
        """Granted never passes a budget, equals it once a reward was cut or withheld for it, and each member
        gets at most per_member_limit rewards per period."""
        zone = ZoneInfo(self.programme.timezone)
        for c in self.model.campaigns.values():
            points, coupons = self.driver.campaign_spend(c.campaign_id)
            assert [points, coupons] == self.granted.get(c.campaign_id, [0, 0]) == [c.points, c.coupons]
            if c.budget_points is not None and c.reward["kind"] != "coupon":
                assert points <= c.budget_points
                assert not c.ran_out or points == c.budget_points, ("ran out below its budget", c)
            if c.budget_coupons is not None and c.reward["kind"] == "coupon":
                assert coupons <= c.budget_coupons
                assert not c.ran_out or coupons == c.budget_coupons, ("ran out below its budget", c)
            if c.per_member_limit is not None:
                for member_id in self.members():
                    periods: dict[tuple, int] = {}
                    for at in self.rewarded.get((member_id, c.campaign_id), []):
                        local = at.astimezone(zone)
                        key = {"day": local.date().timetuple()[:3], "week": tuple(local.isocalendar())[:2],
                               "month": (local.year, local.month), "campaign": ()}[c.per_member_period]
                        periods[key] = periods.get(key, 0) + 1
                    assert all(n <= c.per_member_limit for n in periods.values()), (member_id, c, periods)

    @precondition(lambda self: self.model.members)
    @rule(data=st.data(), amount=st.integers(150_000, 650_000))
    def big_purchase(self, data, amount):
        """Purchases large enough to move tiers within a few steps."""
        self.buy(data, amount)

    def upgraded(self) -> list[str]:
        """Members whose latest upgrade a return can undo (a purchase caused it, not an activity)."""
        return [m for m in self.members() if self.model.members[m].upgrades and self.model.members[m].upgrades[-1][0]]

    @precondition(lambda self: self.upgraded())
    @rule(data=st.data(), share=st.sampled_from([1, 2, 4]))
    def return_the_upgrading_purchase(self, data, share):
        """Returning (part of) the purchase that caused the current tier may revert it."""
        member_id = data.draw(st.sampled_from(self.upgraded()))
        m = self.model.members[member_id]
        p = m.purchases[m.upgrades[-1][0]]
        left = p.amount_cents - p.returned_cents
        if left > 0:
            self.return_and_check(member_id, p.purchase_id, max(left // share, 1))

    @precondition(lambda self: self.model.members)
    @rule(data=st.data())
    def activity(self, data):
        """A growth task of a listed type (or an unknown one), now, late or out of the window."""
        member_id = data.draw(st.sampled_from(self.members()))
        activity_type = data.draw(st.sampled_from([a.type for a in self.programme.activities] + ["nope"]))
        activity_id = self.fresh("t")
        answer = self.do("activity", member_id, activity_id, activity_type, occurred_at=self.when(data))
        if isinstance(answer, dict):
            self.natural.append(("activity", (member_id, activity_id, activity_type), {}))

    @precondition(lambda self: self.model.members)
    @rule(data=st.data(), times=st.integers(2, 5))
    def activities_on_one_day(self, data, times):
        """The same type again and again on one programme-local day: the caps must hold."""
        member_id = data.draw(st.sampled_from(self.members()))
        activity_type = data.draw(st.sampled_from([a.type for a in self.programme.activities]))
        at = self.when(data)
        for _ in range(times):
            activity_id = self.fresh("t")
            if isinstance(self.do("activity", member_id, activity_id, activity_type, occurred_at=at), dict):
                self.natural.append(("activity", (member_id, activity_id, activity_type), {}))

    def with_purchases(self) -> list[str]:
        return [m for m in self.members() if self.model.members[m].purchases]

    @precondition(lambda self: self.with_purchases())
    @rule(data=st.data(), mode=st.sampled_from(["part", "part", "rest", "rest", "one", "over", "unknown"]))
    def ret(self, data, mode):
        member_id = data.draw(st.sampled_from(self.with_purchases()))
        purchases = self.model.members[member_id].purchases
        if mode == "unknown":
            purchase_id, amount = "nope", 100
        else:
            purchase_id = data.draw(st.sampled_from(sorted(purchases)))
            p = purchases[purchase_id]
            left = p.amount_cents - p.returned_cents
            amount = {
                "part": data.draw(st.integers(1, max(left, 1))),
                "rest": max(left, 1),
                "one": 1,
                "over": left + data.draw(st.integers(1, 1000)),
            }[mode]
        self.return_and_check(member_id, purchase_id, amount, at=self.burn_when(data, member_id))

    def return_and_check(self, member_id: str, purchase_id: str, amount: int, at: datetime | None = None) -> None:
        return_id = self.fresh("r")
        answer = self.do("ret", member_id, return_id, purchase_id, amount, occurred_at=at)
        if isinstance(answer, dict):
            self.natural.append(("ret", (member_id, return_id, purchase_id, amount), {}))
            points, growth = self.clawed.get((member_id, purchase_id), (0, 0))
            points, growth = points + answer["points_clawed"], growth + answer["growth_clawed"]
            self.clawed[(member_id, purchase_id)] = (points, growth)
            earned_points, earned_growth = self.earned[(member_id, purchase_id)]
            assert 0 <= points <= earned_points, "a purchase's claw-back exceeds what it earned"
            assert 0 <= growth <= earned_growth

    @precondition(lambda self: self.model.members)
    @rule(data=st.data(), mode=st.sampled_from(["some", "some", "all", "above"]))
    def redeem(self, data, mode):
        member_id = data.draw(st.sampled_from(self.members()))
        at = self.burn_when(data, member_id)
        spendable = self.model.spendable(member_id, at or self.now)
        if mode == "some" and spendable >= 1:
            points = data.draw(st.integers(1, spendable))
        elif mode == "all" and spendable >= 1:
            points = spendable
        else:
            points = max(spendable, 0) + data.draw(st.integers(1, 50))
        redemption_id = self.fresh("x")
        answer = self.do("redeem", member_id, redemption_id, points, occurred_at=at)
        if isinstance(answer, dict):
            self.natural.append(("redeem", (member_id, redemption_id, points), {}))
            assert answer["available"] >= 0, "a redemption overdrew"
            assert sum(n for _, n in answer["consumed"]) == points
        elif at is None:
            assert points > spendable

    def with_redemptions(self) -> list[str]:
        return [m for m in self.members() if self.model.members[m].redemptions]

    @precondition(lambda self: self.with_redemptions())
    @rule(data=st.data())
    def reverse(self, data):
        member_id = data.draw(st.sampled_from(self.with_redemptions()))
        known = sorted(self.model.members[member_id].redemptions)
        redemption_id = data.draw(st.sampled_from(known + ["nope"]))
        at = self.when(data)
        redemption = self.model.members[member_id].redemptions.get(redemption_id)
        if redemption is not None and data.draw(st.booleans()):
            # Backdated to the redemption's own moment, just before it (refused), or between it and now.
            at = data.draw(st.sampled_from([
                redemption.at, redemption.at - timedelta(seconds=1), redemption.at + (self.now - redemption.at) / 2,
            ]))
        if isinstance(self.do("reverse", member_id, redemption_id, occurred_at=at), dict):
            self.natural.append(("reverse", (member_id, redemption_id), {}))

    def moved(self) -> list[str]:
        return [m for m in self.members() if self.model.members[m].moves]

    @precondition(lambda self: self.moved())
    @rule(data=st.data(), nudge=st.sampled_from([timedelta(seconds=-1), timedelta(0), timedelta(seconds=1)]),
          mode=st.sampled_from(["all", "all", "above"]), kind=st.sampled_from(["redeem", "adjust", "coupon"]))
    def backdated_burn_between_moves(self, data, nudge, mode, kind):
        """A burn dated among earlier burns and restores may take only what every later view can spare."""
        member_id = data.draw(st.sampled_from(self.moved()))
        window_start = self.now - timedelta(days=self.programme.max_backdate_days)
        moments = sorted({t + nudge for (t, _, _) in self.model.members[member_id].moves if window_start <= t + nudge <= self.now})
        if not moments:
            return
        at = self.untied(member_id, data.draw(st.sampled_from(moments))) or self.now
        points = max(self.model.spendable(member_id, at), 0) + (1 if mode == "above" else 0)
        if points == 0:
            return
        if kind == "redeem":
            redemption_id = self.fresh("x")
            if isinstance(self.do("redeem", member_id, redemption_id, points, occurred_at=at), dict):
                self.natural.append(("redeem", (member_id, redemption_id, points), {}))
        elif kind == "adjust":
            self.do("adjust", member_id, self.fresh("a"), -points, occurred_at=at)
        else:
            coupon = (member_id, self.fresh("c"), "SHOP", 1000, 0, self.now + timedelta(days=5))
            self.do("issue_coupon", *coupon, points_cost=points, occurred_at=at)

    @precondition(lambda self: self.model.members)
    @rule(data=st.data(), points=st.one_of(st.integers(-400, -1), st.integers(1, 400)))
    def adjust(self, data, points):
        member_id = data.draw(st.sampled_from(self.members()))
        adjustment_id = self.fresh("a")
        answer = self.do("adjust", member_id, adjustment_id, points, occurred_at=self.burn_when(data, member_id))
        if isinstance(answer, dict):
            self.natural.append(("adjust", (member_id, adjustment_id, points), {}))
            if points < 0:
                assert answer["available"] >= 0, "a negative adjustment overdrew"

    @precondition(lambda self: self.model.members)
    @rule(
        data=st.data(),
        value=st.sampled_from([500, 2000, 5000]),
        min_spend=st.sampled_from([0, 10000, 20000]),
        valid_days=st.integers(1, 60),
        starts_in_days=st.sampled_from([None, 0, 2]),
        cost=st.sampled_from([None, None, "within", "within", "above"]),
    )
    def issue_coupon(self, data, value, min_spend, valid_days, starts_in_days, cost):
        member_id = data.draw(st.sampled_from(self.members()))
        at = self.burn_when(data, member_id)
        spendable = self.model.spendable(member_id, at or self.now)
        if cost == "within":
            cost = data.draw(st.integers(1, spendable)) if spendable >= 1 else None
        elif cost == "above":
            cost = max(spendable, 0) + 1
        valid_from = None if starts_in_days is None else self.now + timedelta(days=starts_in_days)
        coupon_id = self.fresh("c")
        args = (member_id, coupon_id, "CAMPAIGN", value, min_spend, self.now + timedelta(days=valid_days))
        kwargs = {"valid_from": valid_from, "points_cost": cost, "occurred_at": at}
        answer = self.do("issue_coupon", *args, **kwargs)
        if isinstance(answer, dict):
            self.natural.append(("issue_coupon", args, kwargs))

    def burn_when(self, data, member_id: str) -> datetime | None:
        """Like ``when``, for a command that burns points: the domain wrongly refuses a burn dated
        before a moment where one bucket was both burned and restored (it reads an in-between
        holding no as-of view shows; see test_a_backdated_burn_may_take_what_every_later_view_holds),
        so those are dated now instead."""
        return self.untied(member_id, self.when(data))

    def untied(self, member_id: str, at: datetime | None) -> datetime | None:
        if at is None:
            return None
        moments: dict[tuple[str, datetime], set[int]] = {}
        for t, bucket_id, n in self.model.members[member_id].moves:
            if t > at:
                moments.setdefault((bucket_id, t), set()).add(n > 0)
        return None if any(len(signs) == 2 for signs in moments.values()) else at

    def coupon_when(self, data, member_id: str, coupon_id: str) -> datetime | None:
        """Like ``when``, but never before the coupon was issued: the domain accepts a void or a
        redemption dated before coupon_issued, and as-of reads then fail (see
        test_a_coupon_cannot_be_voided_or_redeemed_before_it_was_issued)."""
        at = self.when(data)
        coupon = self.model.members[member_id].coupons.get(coupon_id)
        if at is not None and coupon is not None and at < coupon.issued_at:
            return None
        return at

    def pick_coupon(self, data, prefer: str | None = None) -> tuple[str, str]:
        member_id = data.draw(st.sampled_from(self.members()))
        coupons = self.model.members[member_id].coupons
        preferred = sorted(c for c in coupons if prefer and self.model.coupon_status(member_id, c, self.now) == prefer)
        if preferred and data.draw(st.booleans()):
            return member_id, data.draw(st.sampled_from(preferred))
        return member_id, data.draw(st.sampled_from(sorted(coupons) + ["nope"]))

    @precondition(lambda self: self.model.members)
    @rule(data=st.data(), over=st.sampled_from([-1, 0, 0, 1, 50000]))
    def redeem_coupon(self, data, over):
        member_id, coupon_id = self.pick_coupon(data, prefer="issued")
        coupon = self.model.members[member_id].coupons.get(coupon_id)
        order = max((coupon.min_spend_cents if coupon else 10000) + over, 1)
        self.do("redeem_coupon", member_id, coupon_id, order, occurred_at=self.coupon_when(data, member_id, coupon_id))

    @precondition(lambda self: self.model.members)
    @rule(data=st.data())
    def reverse_coupon(self, data):
        member_id, coupon_id = self.pick_coupon(data, prefer="redeemed")
        self.do("reverse_coupon", member_id, coupon_id, occurred_at=self.coupon_when(data, member_id, coupon_id))

    @precondition(lambda self: self.model.members)
    @rule(data=st.data())
    def void_coupon(self, data):
        member_id, coupon_id = self.pick_coupon(data)
        self.do("void_coupon", member_id, coupon_id, occurred_at=self.coupon_when(data, member_id, coupon_id))

    @rule(delta=ADVANCES)
    def advance_clock(self, delta):
        self.now = self.now + delta
        self.model.now = self.now
        self.driver.set_now(self.now)

    @rule(minutes=st.integers(1, 10 * 24 * 60))
    def advance_clock_a_little(self, minutes):
        self.advance_clock(timedelta(minutes=minutes))

    def edges(self) -> list[datetime]:
        """Future moments where something turns: points become available or expire, a coupon or hold ends."""
        moments = []
        for m in self.model.members.values():
            moments += [b.available_at for b in m.buckets] + [b.expires_at for b in m.buckets]
            moments += [c.expires_at for c in m.coupons.values()] + [c.valid_from for c in m.coupons.values()]
            moments += [hold for (_, _, hold) in m.tiers if hold is not None]
        return sorted(t for t in set(moments) if t > self.now)

    @precondition(lambda self: self.edges())
    @rule(data=st.data(), nudge=st.sampled_from([timedelta(0), timedelta(0), timedelta(seconds=-1), timedelta(seconds=1)]))
    def advance_clock_to_an_edge(self, data, nudge):
        edge = data.draw(st.sampled_from(self.edges()[:4]))
        self.advance_clock(max(edge + nudge - self.now, timedelta(0)))

    @precondition(lambda self: self.with_purchases())
    @rule(data=st.data())
    def spend_everything_then_return(self, data):
        """A return after its points were spent: the shortfall becomes debt (or is written off)."""
        member_id = data.draw(st.sampled_from(self.with_purchases()))
        spendable = self.model.spendable(member_id, self.now)
        if spendable >= 1:
            redemption_id = self.fresh("x")
            self.do("redeem", member_id, redemption_id, spendable)
            self.natural.append(("redeem", (member_id, redemption_id, spendable), {}))
        p = data.draw(st.sampled_from(sorted(self.model.members[member_id].purchases.values(), key=lambda p: p.purchase_id)))
        if p.returned_cents < p.amount_cents:
            self.return_and_check(member_id, p.purchase_id, p.amount_cents - p.returned_cents)

    @precondition(lambda self: self.with_redemptions())
    @rule(data=st.data(), after=st.sampled_from([timedelta(0), timedelta(minutes=1), timedelta(days=3)]))
    def reverse_after_expiry(self, data, after):
        """Reversing a redemption whose buckets have expired restores them and expires them at once."""
        member_id = data.draw(st.sampled_from(self.with_redemptions()))
        redemptions = self.model.members[member_id].redemptions
        redemption_id = data.draw(st.sampled_from(sorted(redemptions)))
        buckets = {b.bucket_id: b for b in self.model.members[member_id].buckets}
        expiries = [buckets[bucket_id].expires_at for bucket_id, _ in redemptions[redemption_id].parts]
        if expiries:
            self.advance_clock(max(min(expiries) + after - self.now, timedelta(0)))
        if isinstance(self.do("reverse", member_id, redemption_id), dict):
            self.natural.append(("reverse", (member_id, redemption_id), {}))

    @precondition(lambda self: any(self.model.tier_now(m)[1] for m in self.model.members.values()))
    @rule(data=st.data(), nudge=st.sampled_from([timedelta(0), timedelta(seconds=-1), timedelta(days=1)]))
    def hold_ends_then_tier_job(self, data, nudge):
        holds = sorted(h for m in self.model.members.values() if (h := self.model.tier_now(m)[1]) is not None)
        self.advance_clock(max(data.draw(st.sampled_from(holds)) + nudge - self.now, timedelta(0)))
        self.job("tiers")

    @precondition(lambda self: self.model.members)
    @rule(name=st.sampled_from(["expire", "tiers", "birthdays"]))
    def job(self, name):
        self.do("run_job", name, self.now)
        # A second run at the same as_of appends nothing.
        assert self.do("run_job", name, self.now) == {"appended": 0}

    @precondition(lambda self: self.natural)
    @rule(data=st.data())
    def repeat_a_command_with_a_natural_id(self, data):
        method, args, kwargs = data.draw(st.sampled_from(self.natural))
        assert isinstance(self.do(method, *args, **kwargs), Duplicate)

    @rule(kind=st.sampled_from(["purchase", "redeem", "adjust"]))
    def command_for_an_unknown_member(self, kind):
        args = {"purchase": ("ghost", "p0", 1000), "redeem": ("ghost", "x0", 1), "adjust": ("ghost", "a0", 5)}[kind]
        assert self.do(kind, *args) == Refused(404, "member_not_found")

    # -- invariants ----------------------------------------------------------------

    def moments(self, member_id: str) -> list[datetime]:
        """Now, a few past as_of times (the latest business times recorded among them), and a month ahead."""
        m = self.model.members[member_id]
        recorded = sorted(set(m.times))[-2:]
        edges = []
        if m.buckets:  # the newest bucket's edges: pending ends, expiring_30d starts, expiry
            newest = m.buckets[-1]
            edges = [newest.available_at, newest.expires_at - timedelta(days=30), newest.expires_at]
        return sorted({self.now, self.now - timedelta(days=8), self.now + timedelta(days=30), *recorded, *edges})

    @invariant()
    def model_and_system_agree(self):
        for member_id in self.members():
            coupons = sorted(self.model.members[member_id].coupons)
            for at in self.moments(member_id):
                expected = self.model.balance(member_id, at)
                actual = self.driver.balance(member_id, at)
                assert actual == expected, (member_id, at, expected, actual)
                conserved = (
                    actual["lifetime_earned"] - actual["lifetime_clawed"] + actual["lifetime_adjusted"]
                    - actual["lifetime_redeemed"] - actual["lifetime_expired"]
                )
                assert conserved == actual["available"] + actual["pending"], ("points not conserved", at, actual)
                assert actual["available"] >= 0 or actual["debt"] > 0, ("available below 0 without debt", at, actual)
                expected_tier = self.model.tier(member_id, at)
                actual_tier = self.driver.tier(member_id, at)
                assert actual_tier == expected_tier, (member_id, at, expected_tier, actual_tier)
                for coupon_id in coupons:
                    expected_status = self.model.coupon_status(member_id, coupon_id, at)
                    actual_status = self.driver.coupon_status(member_id, coupon_id, at)
                    assert actual_status == expected_status, (member_id, coupon_id, at, expected_status, actual_status)
                for bucket_id, amount, remaining in self.driver.buckets(member_id, at):
                    assert 0 <= remaining <= amount, ("bucket out of 0..amount", member_id, at, bucket_id)
            assert sorted(self.driver.buckets(member_id)) == sorted(self.model.buckets(member_id))
            self.activity_caps_hold(member_id)
            self.referrals_hold(member_id)

    def referrals_hold(self, member_id: str) -> None:
        """A referee rewards its referrer at most once, and no referrer passes its monthly cap."""
        rewards = self.driver.referral_rewards(member_id)
        referees = [referee for referee, _ in rewards]
        assert len(referees) == len(set(referees)), ("a referral rewarded twice", member_id, rewards)
        assert sorted(referees) == sorted(self.model.members[member_id].referral_rewards)
        cap = self.programme.referral.monthly_cap
        if cap:
            zone = ZoneInfo(self.programme.timezone)
            months = [at.astimezone(zone).strftime("%Y-%m") for _, at in rewards]
            assert all(months.count(month) <= cap for month in months), ("monthly cap passed", member_id, rewards)

    def activity_caps_hold(self, member_id: str) -> None:
        """No member ever has more activities of a type than its caps allow, by local day or in all."""
        zone = ZoneInfo(self.programme.timezone)
        done = self.driver.activities(member_id)
        assert sorted(a for a, _, _ in done) == sorted(self.model.members[member_id].activities)
        for entry in self.programme.activities:
            of_type = [at for _, kind, at in done if kind == entry.type]
            if entry.total_cap:
                assert len(of_type) <= entry.total_cap, ("total cap exceeded", member_id, entry)
            if entry.daily_cap:
                days = [at.astimezone(zone).date() for at in of_type]
                assert all(days.count(day) <= entry.daily_cap for day in days), ("daily cap exceeded", member_id, entry)


FAST = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
VARIANT = settings(FAST, max_examples=100)


class DefaultProgramme(ProgrammeMachine):
    programme = Programme()


class AbsorbShortfall(ProgrammeMachine):
    programme = Programme(return_shortfall="absorb")


class DowngradeToQualified(ProgrammeMachine):
    programme = Programme(downgrade="to_qualified", tier_hold_days=30, tier_window_days=60)


class NeverDowngrade(ProgrammeMachine):
    programme = Programme(downgrade="never", tier_hold_days=30)


class GrowthTasks(ProgrammeMachine):
    """An activity table of the operator's own: tight caps, growth enough to move tiers, a task worth 0 points."""

    programme = Programme(
        activities=[
            Activity("check_in", 1, 10, 1, 0),
            Activity("survey", 0, 40, 2, 0),
            Activity("live_event", 30, 1600, 2, 3),
            Activity("profile_completed", 20, 50, 0, 1),
        ],
        tier_window_days=30,
        tier_hold_days=10,
        max_backdate_days=60,
    )


class Referrals(ProgrammeMachine):
    """Referees among the machine's members, small first purchases qualifying, a cap of one a month."""

    programme = Programme(
        referral=ReferralRule(referrer_points=7, min_first_purchase_cents=999, within_days=3, monthly_cap=1),
        pending_days=2,
        points_expiry_days=40,
        max_backdate_days=60,
    )


class ShortClocks(ProgrammeMachine):
    """Short windows, so expiry, holds and late events meet within a few clock steps."""

    programme = Programme(
        pending_days=2,
        points_expiry_days=20,
        tier_window_days=30,
        tier_hold_days=10,
        max_backdate_days=60,
    )


TestDefaultProgramme = DefaultProgramme.TestCase
TestDefaultProgramme.settings = FAST
TestAbsorbShortfall = AbsorbShortfall.TestCase
TestAbsorbShortfall.settings = VARIANT
TestDowngradeToQualified = DowngradeToQualified.TestCase
TestDowngradeToQualified.settings = VARIANT
TestNeverDowngrade = NeverDowngrade.TestCase
TestNeverDowngrade.settings = VARIANT
TestGrowthTasks = GrowthTasks.TestCase
TestGrowthTasks.settings = VARIANT
TestReferrals = Referrals.TestCase
TestReferrals.settings = VARIANT
TestShortClocks = ShortClocks.TestCase
TestShortClocks.settings = VARIANT


def test_a_change_builds_on_the_version_in_force_last_when_a_start_file_came_after_a_scheduled_one():
    """A file given at start is appended effective then, even after a version scheduled for later: a change
    then builds on the scheduled one, and may not come before it (CONTRACT §6.1's "latest version")."""
    now = datetime(2025, 1, 7, 2, 0, tzinfo=timezone.utc)
    history = ProgrammeHistory()
    history.evolve(decide_seed(history, Programme(), now))
    history.evolve(decide_change(history, {"pending_days": 3}, now + timedelta(days=10), now))
    history.evolve(decide_seed(history, Programme(points_expiry_days=100), now + timedelta(days=1)))  # a restart with a file
    assert [v.version for v in history.versions] == [1, 2, 3]
    with pytest.raises(Refusal) as refused:
        decide_change(history, {"earn_cents_per_point": 50}, now + timedelta(days=5), now + timedelta(days=1))
    assert refused.value.code == "effective_from_in_past"
    change = decide_change(history, {"earn_cents_per_point": 50}, now + timedelta(days=11), now + timedelta(days=1))
    assert change.version == 4 and change.settings["pending_days"] == 3 and change.settings["earn_cents_per_point"] == 50

"""The programme's state machine pointed at the application layer on a real database.

The same random histories as tests/test_programme_model.py, but every command
goes through ``Ledger.execute`` (idempotency keys, natural ids, the store's
hash chain and group commit on PostgreSQL) and every read through the
application's member state. Each accepted command is sent a second time with
the same Idempotency-Key: the answer must be the first one, and the log must
not move.
"""

from __future__ import annotations

import itertools
import os
from datetime import datetime, timedelta

import msgspec
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

from api.commands import OPERATIONS_BY_NAME
from ledger import commands as cmd
from ledger.application import Ledger
from ledger.clock import ManualClock
from ledger.jobs import run_job
from ledger.programme import Programme
from ledger.store import EventStore
from ledger.views import balance, tier_view
from tests.model import Duplicate, Refused
from tests.support import OwnDatabase
from tests.test_programme_model import BALANCE_FIELDS, FAST, Driver, ProgrammeMachine, GrowthTasks, Referrals, ShortClocks

SERVER: dict[str, str] = {}
_databases = itertools.count(1)


@pytest.fixture(autouse=True)
def _server(database_server_url, template_database):
    """The state machine makes its own databases (one per example) from the template."""
    SERVER.update(url=database_server_url, template=template_database)


def _pairs(parts) -> list[tuple[str, int]]:
    return [(part["bucket_id"], part["points"]) for part in parts]


class AppDriver(Driver):
    """Commands through ``Ledger.execute``, reads through the application's state, on PostgreSQL."""

    def __init__(self, programme: Programme, now: datetime) -> None:
        self.programme = programme
        self.clock = ManualClock(now)
        self.keys = itertools.count(1)
        self.database = OwnDatabase(SERVER["url"], SERVER["template"], f"loyalty_sm_{os.getpid()}_{next(_databases)}")
        self.run, self.pool = self.database.run, self.database.pool
        self.ledger = Ledger(EventStore(self.pool, self.clock), self.programme, self.clock)
        self.database.start_group_commit(self.ledger.store)
        self.run(self.ledger.refresh_rules())  # the programme's version 1, as the service's start appends it

    def close(self) -> None:
        self.database.close(self.ledger.store)

    def set_now(self, now: datetime) -> None:
        self.clock.set(now)

    # -- commands ---------------------------------------------------------------------

    def _dry_run_first(self, run, key: str):
        """CONTRACT §6.5: ``run(dry_run)`` as a dry run with ``key`` changes nothing (no event, the key not
        recorded), then for real; the dry run answered what the command then answered."""
        head = self.run(self.ledger.store.head())
        dry = self.run(run(True))
        assert self.run(self.ledger.store.head()) == head, "a dry run appended"
        assert self.run(self.ledger.store.stored_result("*", f"idem:{key}")) is None, "a dry run stored its key"
        first = self.run(run(False))
        assert dry.status == first.status and dry.position is None, (dry, first)
        dry_body, body = msgspec.json.decode(dry.body), msgspec.json.decode(first.body)
        if first.status < 300:
            assert dry_body.pop("dry_run") is True and dry_body["position"] is None, dry_body
            dry_body["position"] = body["position"]
        assert dry_body == body, ("a dry run answered otherwise", dry_body, body)
        return first

    def _execute(self, operation: str, member_id: str, command: cmd.Command):
        """Run a command with a fresh key, then again with the same key: one effect, one answer."""
        key = f"k{next(self.keys)}"
        first = self._dry_run_first(lambda dry_run: self.ledger.execute(
            operation, member_id, command, actor="state-machine", idempotency_key=key, dry_run=dry_run), key)
        head = self.run(self.ledger.store.head())
        again = self.run(self.ledger.execute(operation, member_id, command, actor="state-machine", idempotency_key=key))
        assert (again.status, again.body, again.replayed) == (first.status, first.body, True), (operation, first, again)
        assert self.run(self.ledger.store.head()) == head, "a replay with the same key appended"
        if first.status == 201:  # the answer is the type /openapi.json documents for it, field for field
            msgspec.json.decode(first.body, type=OPERATIONS_BY_NAME[operation].answer, strict=True)
        body = msgspec.json.decode(first.body)
        if first.replayed or body.get("code") == "duplicate_id":
            return Duplicate(operation)
        if first.status >= 400:
            return Refused(first.status, body["code"], body.get("reason"))
        return body

    def enrol(self, member_id, birthday=None, enrolled_at=None, referred_by=None):
        command = cmd.Enrol(member_id=member_id, birthday=birthday, enrolled_at=enrolled_at, referred_by=referred_by)
        out = self._execute("enrol", member_id, command)
        if isinstance(out, dict):
            return {"coupons": [coupon["coupon_id"] for coupon in out["coupons"]]}
        return out

    def purchase(self, member_id, purchase_id, amount_cents, occurred_at=None, store_id="s1"):
        command = cmd.RecordPurchase(purchase_id=purchase_id, store_id=store_id, amount_cents=amount_cents, occurred_at=occurred_at)
        out = self._execute("purchase", member_id, command)
        if isinstance(out, dict):
            out["rewards"] = [(r["campaign_id"], r["points"], r["coupon_id"]) for r in out["rewards"]]
            out["referral"] = out.get("referral")  # absent: nothing granted
        return out

    def _rules(self, operation: str, command: cmd.Command):
        """A rules command with a fresh key, then again with it: one effect, one answer."""
        key = f"k{next(self.keys)}"
        first = self._dry_run_first(lambda dry_run: self.ledger.execute_rules(
            operation, command, actor="state-machine", idempotency_key=key, dry_run=dry_run), key)
        head = self.run(self.ledger.store.head())
        again = self.run(self.ledger.execute_rules(operation, command, actor="state-machine", idempotency_key=key))
        assert (again.status, again.body, again.replayed) == (first.status, first.body, True), (operation, first, again)
        assert self.run(self.ledger.store.head()) == head, "a replay with the same key appended"
        body = msgspec.json.decode(first.body)
        return Refused(first.status, body["code"], body.get("reason")) if first.status >= 400 else body

    def change_programme(self, settings, effective_from=None):
        return self._rules("programme", cmd.ChangeProgramme(settings=settings, effective_from=effective_from))

    def create_campaign(self, body):
        return self._rules("campaign_create", msgspec.convert(body, cmd.CreateCampaign))

    def end_campaign(self, campaign_id):
        return self._rules("campaign_end", cmd.EndCampaign(campaign_id=campaign_id, reason="state machine"))

    def campaign_spend(self, campaign_id):
        spent = self.run(self.ledger.store.read_campaign_spend()).get(campaign_id)
        return (spent.points, spent.coupons) if spent is not None else (0, 0)

    def log_version(self):
        return self.run(self.ledger.store.head())[0]

    def activity(self, member_id, activity_id, activity_type, occurred_at=None):
        command = cmd.RecordActivity(activity_id=activity_id, type=activity_type, occurred_at=occurred_at)
        return self._execute("activity", member_id, command)

    def ret(self, member_id, return_id, purchase_id, amount_cents, occurred_at=None):
        command = cmd.RecordReturn(return_id=return_id, purchase_id=purchase_id, amount_cents=amount_cents, occurred_at=occurred_at)
        out = self._execute("return", member_id, command)
        return {**out, "buckets": _pairs(out["buckets"])} if isinstance(out, dict) else out

    def redeem(self, member_id, redemption_id, points, occurred_at=None):
        out = self._execute("redemption", member_id, cmd.Redeem(redemption_id=redemption_id, points=points, occurred_at=occurred_at))
        return {**out, "consumed": _pairs(out["consumed"])} if isinstance(out, dict) else out

    def reverse(self, member_id, redemption_id, occurred_at=None):
        command = cmd.ReverseRedemption(redemption_id=redemption_id, occurred_at=occurred_at)
        out = self._execute("redemption_reversal", member_id, command)
        if isinstance(out, dict):
            return {**out, "restored": _pairs(out["restored"]), "expired": _pairs(out["expired"])}
        return out

    def adjust(self, member_id, adjustment_id, points, occurred_at=None):
        command = cmd.Adjust(adjustment_id=adjustment_id, points=points, reason="goodwill", occurred_at=occurred_at)
        return self._execute("adjustment", member_id, command)

    def issue_coupon(self, member_id, coupon_id, template, value_cents, min_spend_cents, expires_at,
                     valid_from=None, points_cost=None, occurred_at=None):
        command = cmd.IssueCoupon(
            coupon_id=coupon_id, template=template, value_cents=value_cents, min_spend_cents=min_spend_cents,
            expires_at=expires_at, valid_from=valid_from, points_cost=points_cost, occurred_at=occurred_at,
        )
        return self._execute("coupon_issue", member_id, command)

    def redeem_coupon(self, member_id, coupon_id, order_amount_cents, occurred_at=None):
        command = cmd.RedeemCoupon(coupon_id=coupon_id, order_ref="o1", order_amount_cents=order_amount_cents, occurred_at=occurred_at)
        return self._execute("coupon_redemption", member_id, command)

    def reverse_coupon(self, member_id, coupon_id, occurred_at=None):
        command = cmd.ReverseCouponRedemption(coupon_id=coupon_id, occurred_at=occurred_at)
        return self._execute("coupon_redemption_reversal", member_id, command)

    def void_coupon(self, member_id, coupon_id, occurred_at=None):
        command = cmd.VoidCoupon(coupon_id=coupon_id, reason="fraud", occurred_at=occurred_at)
        return self._execute("coupon_void", member_id, command)

    def run_job(self, name, as_of):
        report = self.run(run_job(self.ledger, name, as_of))
        again = self.run(run_job(self.ledger, name, as_of))
        assert again["appended"] == 0 and again["position"] == report["position"], "a job run twice appended twice"
        return {"appended": report["appended"]}

    # -- reads ---------------------------------------------------------------------------

    def _as_of(self, member_id: str, at: datetime):
        return self.run(self.ledger.state_as_of(member_id, at))

    def balance(self, member_id, at):
        b = balance(self._as_of(member_id, at), at)
        return {name: getattr(b, name) for name in BALANCE_FIELDS}

    def tier(self, member_id, at):
        view = tier_view(self._as_of(member_id, at), at, self.programme)
        return {name: getattr(view, name) for name in ("tier", "growth_window", "next_tier", "growth_needed", "hold_until")}

    def coupon_status(self, member_id, coupon_id, at):
        coupon = self._as_of(member_id, at).coupons.get(coupon_id)
        return coupon.status_at(at) if coupon is not None else None

    def buckets(self, member_id, at=None):
        state = self.run(self.ledger.load(member_id)) if at is None else self._as_of(member_id, at)
        return [(b.bucket_id, b.amount, b.remaining) for b in state.buckets.values()]

    def version(self, member_id):
        return self.run(self.ledger.load(member_id)).version

    def activities(self, member_id):
        state = self.run(self.ledger.load(member_id))
        return [(a.activity_id, a.type, a.occurred_at) for a in state.activities.values()]

    def referral_rewards(self, member_id):
        stream = self.run(self.ledger.store.read_stream(member_id))
        return [(e.data["referral_of"], e.occurred_at) for e in stream
                if e.type == "points_earned" and e.data.get("referral_of")]


class AppMachine(ProgrammeMachine):
    def make_driver(self, programme: Programme, now: datetime) -> Driver:
        return AppDriver(programme, now)

    @rule(back_days=st.integers(0, 120), length_days=st.sampled_from([1, 7, 30, 400]))
    def a_simulation_without_changes_grants_what_was_granted(self, back_days, length_days):
        """CONTRACT §6.5 over the random history: the same programme and campaigns grant the same."""
        window_from = self.now - timedelta(days=back_days)
        command = cmd.Simulate(from_=window_from, to=window_from + timedelta(days=length_days))
        head = self.driver.run(self.driver.ledger.store.head())
        answer = self.driver.run(self.driver.ledger.simulate(command))
        assert (answer.simulated, answer.delta_points, answer.delta_cost_cents) == (answer.actual, 0, 0), answer
        assert all(month.actual_points == month.simulated_points for month in answer.by_month), answer
        assert self.driver.run(self.driver.ledger.store.head()) == head, "a simulation appended"

    def teardown(self) -> None:
        self.driver.close()


class AppShortClocks(AppMachine):
    programme = ShortClocks.programme


class AppGrowthTasks(AppMachine):
    programme = GrowthTasks.programme


class AppReferrals(AppMachine):
    programme = Referrals.programme


THROUGH_THE_DATABASE = settings(FAST, max_examples=12, stateful_step_count=25)

TestProgrammeThroughTheApplication = AppMachine.TestCase
TestProgrammeThroughTheApplication.settings = THROUGH_THE_DATABASE
TestShortClocksThroughTheApplication = AppShortClocks.TestCase
TestShortClocksThroughTheApplication.settings = THROUGH_THE_DATABASE
TestGrowthTasksThroughTheApplication = AppGrowthTasks.TestCase
TestGrowthTasksThroughTheApplication.settings = THROUGH_THE_DATABASE
TestReferralsThroughTheApplication = AppReferrals.TestCase
TestReferralsThroughTheApplication.settings = THROUGH_THE_DATABASE

"""CONTRACT §6.4 referrals by worked example, through the real Ledger on PostgreSQL (two members' streams)."""

from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest

from cli.replay import replay
from ledger.database import run_blocking
from ledger.programme import Programme, ReferralRule
from ledger.views import balance
from projections import liability, points
from tests.test_projections_support import START, Shop, fresh_database, project_all

PROGRAMME = Programme(max_backdate_days=400)


def body(outcome) -> dict:
    return msgspec.json.decode(outcome.body)


def run(database_server_url, template_database, scenario, programme: Programme = PROGRAMME):
    async def check():
        async with fresh_database(database_server_url, template_database) as pool:
            shop = Shop(pool, programme)
            await shop.enrol("alice")
            await scenario(shop, pool)

    run_blocking(check)


@pytest.fixture
def scenario_runner(database_server_url, template_database):
    return lambda scenario, programme=PROGRAMME: run(database_server_url, template_database, scenario, programme)


def test_enrolment_refuses_a_self_referral_first_then_an_unknown_referrer(scenario_runner):
    async def scenario(shop, pool):
        head = await shop.head()
        refused = await shop.enrol("bob", referred_by="bob")
        assert (refused.status, body(refused)["code"]) == (422, "self_referral")
        refused = await shop.enrol("bob", referred_by="nobody")
        assert (refused.status, body(refused)["code"]) == (422, "referrer_not_found")
        assert await shop.head() == head
        enrolled = await shop.enrol("bob", referred_by="alice")
        assert enrolled.status == 201 and body(enrolled)["referred_by"] == "alice"

    scenario_runner(scenario)


def test_a_qualifying_first_purchase_rewards_both_in_one_append_and_a_retry_never_again(scenario_runner):
    async def scenario(shop, pool):
        await shop.enrol("bob", referred_by="alice")
        head = await shop.head()
        bought = await shop.purchase("bob", "p1", 25_800)
        answer = body(bought)
        assert answer["referral"] == {"referrer_id": "alice", "referrer_points": 20, "coupon_id": "referral-1"}
        events = await shop.ledger.store.read_all(head)
        assert answer["position"] == events[-1].position  # the highest position the purchase appended
        assert {e.stream_id for e in events} == {"alice", "bob"}
        assert len({e.recorded_at for e in events}) == 1, "one transaction"
        reward = next(e for e in events if e.stream_id == "alice")
        assert reward.type == "points_earned" and reward.data["referral_of"] == "bob"
        assert reward.data["bucket"]["bucket_id"] == "r:bob"
        alice = await shop.ledger.load("alice")
        assert (balance(alice, START).pending, balance(alice, START + timedelta(days=7)).available) == (20, 20)
        bob = await shop.ledger.load("bob")
        coupon = bob.coupons["referral-1"]
        assert (coupon.template, coupon.value_cents, coupon.min_spend_cents) == ("REFERRAL10", 1000, 5000)
        assert coupon.expires_at - coupon.valid_from == timedelta(days=30)

        again = await shop.purchase("bob", "p1", 25_800)
        assert again.replayed and again.body == bought.body
        await shop.purchase("bob", "p2", 25_800)  # not the first purchase: nothing
        await shop.ret("bob", "x1", "p1", 25_800)  # returns never take a referral back
        alice = await shop.ledger.load("alice")
        assert list(alice.referral_rewards) == ["bob"] and alice.totals.earned == 20

        await project_all(pool, PROGRAMME)
        async with pool.acquire() as conn:
            lines = await points.ledger_page(conn, "alice", 0, 100)
            assert [(line["kind"], line["points"], line["bucket_id"], line["ref"]) for line in lines] == [
                ("referral", 20, "r:bob", "bob"),
            ]
            summary = {r["stream_id"]: r for r in await conn.fetch(
                "SELECT stream_id, referred_by, referrals_rewarded, lifetime_earned FROM member_summary")}
            assert (summary["alice"]["referrals_rewarded"], summary["alice"]["lifetime_earned"]) == (1, 20)
            assert summary["bob"]["referred_by"] == "alice"
            totals = await liability.liability(conn, shop.clock() + timedelta(days=8), PROGRAMME)
            assert totals["earned"] == 20 + 25 + 25
        report = await replay(pool, PROGRAMME, shop.clock())
        assert report.ok, report.mismatches

    scenario_runner(scenario)


def test_a_first_purchase_too_small_or_too_late_ends_the_referral(scenario_runner):
    async def scenario(shop, pool):
        await shop.enrol("bob", referred_by="alice")
        small = body(await shop.purchase("bob", "p1", 4_999))
        assert "referral" not in small
        assert "referral" not in body(await shop.purchase("bob", "p2", 100_000))
        await shop.enrol("carol", referred_by="alice")
        shop.clock.advance(days=30)  # within_days: occurred_at must be before enrolled_at + 30 days
        assert "referral" not in body(await shop.purchase("carol", "p1", 100_000))
        assert (await shop.ledger.load("alice")).referral_rewards == {}

    scenario_runner(scenario)


def test_the_referrers_monthly_cap_counts_by_programme_local_month_and_the_coupon_comes_anyway(scenario_runner):
    capped = Programme(max_backdate_days=400, referral=ReferralRule(monthly_cap=2))

    async def scenario(shop, pool):
        for referee in ("b1", "b2", "b3", "b4"):
            await shop.enrol(referee, referred_by="alice")
        granted = [body(await shop.purchase(referee, "p1", 10_000))["referral"] for referee in ("b1", "b2", "b3")]
        assert [r["referrer_points"] for r in granted] == [20, 20, 0]
        assert all(r["coupon_id"] == "referral-1" for r in granted)
        shop.clock.advance(days=28)  # START is 6 January: now in February, Shanghai time
        assert body(await shop.purchase("b4", "p1", 10_000))["referral"]["referrer_points"] == 20
        assert sorted((await shop.ledger.load("alice")).referral_rewards) == ["b1", "b2", "b4"]

    scenario_runner(scenario, capped)

"""Programme versions and campaigns through the real application on PostgreSQL (CONTRACT §6.1, §6.2).

The HTTP routes and the two-process races have tests of their own; these
drive ``Ledger`` directly: versions by business time, every reward kind,
conditions, per-member limits, budgets (also raced by two ledgers with their
own pools and caches), returns of campaign points, the read model's counters
against a rebuild, and every refusal code appending nothing.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import pytest

from ledger import commands as cmd
from ledger.application import Ledger
from ledger.clock import ManualClock
from ledger.database import create_pool
from ledger.programme import Programme
from ledger.store import EventStore
from cli.replay import replay
from projections import campaigns as campaigns_projection
from tests.test_projections_support import Shop, all_rows, project_all, rebuild_all
from tests.test_replay import loyalty

pytestmark = pytest.mark.asyncio

# A Tuesday, 10:00 in Shanghai (not member day).
TUESDAY = datetime(2025, 1, 7, 2, 0, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


def body(outcome) -> dict:
    return json.loads(outcome.body)


def campaign(campaign_id: str, reward: dict, starts_at: datetime = TUESDAY, days: int = 10, **fields) -> cmd.CreateCampaign:
    return cmd.CreateCampaign(
        campaign_id=campaign_id, name=f"campaign {campaign_id}", starts_at=starts_at,
        ends_at=starts_at + timedelta(days=days), reward=reward, **fields,
    )


@pytest.fixture
async def shop(pool):
    shop = Shop(pool, Programme(), TUESDAY)
    for member_id in ("m1", "m2", "m3"):
        assert (await shop.enrol(member_id)).status == 201
    return shop


async def create(shop: Shop, command: cmd.CreateCampaign) -> dict:
    outcome = await shop.ledger.execute_rules("campaign_create", command, actor="admin")
    assert outcome.status == 201, outcome.body
    return body(outcome)


async def buy(shop: Shop, member_id: str, purchase_id: str, amount_cents: int, store_id: str = "s1", at=None) -> dict:
    outcome = await shop.do("purchase", member_id, cmd.RecordPurchase(
        purchase_id=purchase_id, store_id=store_id, amount_cents=amount_cents, occurred_at=at))
    assert outcome.status == 201, outcome.body
    return body(outcome)


async def test_the_programme_is_seeded_once_and_a_late_purchase_earns_under_the_version_of_its_day(shop):
    ledger = shop.ledger
    assert [v.version for v in ledger.rules.programmes.versions] == [1]
    assert ledger.rules.programmes.versions[0].effective_from is None
    # Double the earn rate from tomorrow.
    changed = await ledger.execute_rules(
        "programme_change", cmd.ChangeProgramme(settings={"earn_cents_per_point": 500}, effective_from=TUESDAY + DAY)
    )
    assert changed.status == 201
    answer = body(changed)
    assert answer["version"] == 2 and answer["settings"]["earn_cents_per_point"] == 500
    assert answer["settings"]["pending_days"] == 7  # the rest carries over
    shop.clock.advance(days=2)
    late = await buy(shop, "m1", "p-late", 100_00, at=TUESDAY + HOUR)  # made before the change, synced now
    today = await buy(shop, "m1", "p-today", 100_00)
    assert (late["points"], today["points"]) == (10, 20)
    events = await ledger.store.read_stream("m1")
    earned = {e.data["purchase_id"]: e.programme_version for e in events if e.type == "points_earned"}
    assert earned == {"p-late": 1, "p-today": 2}
    # A restart without a file, or with a file equal to the version in force, appends nothing.
    for given, file_given in ((Programme(), False), (Programme(earn_cents_per_point=500), True)):
        again = Ledger(EventStore(shop.pool, shop.clock), given, shop.clock, programme_file_given=file_given)
        await again.refresh_rules()
        assert len(again.rules.programmes.versions) == 2
    # A restart with a different file appends it as the next version, effective now.
    other = Ledger(EventStore(shop.pool, shop.clock), Programme(pending_days=3), shop.clock)
    await other.refresh_rules()
    latest = other.rules.programmes.latest
    assert (latest.version, latest.effective_from, latest.programme.pending_days) == (3, shop.clock(), 3)


async def test_programme_changes_are_validated_and_refusals_append_nothing(shop):
    ledger = shop.ledger
    head = await shop.head()
    cases = [
        ({"pending_days": -1}, None, "invalid_programme", "pending_days"),
        ({"earn_cents_per_point": 0}, None, "invalid_programme", "earn_cents_per_point"),
        ({"no_such_setting": 1}, None, "invalid_programme", "no_such_setting"),
        ({"timezone": "Mars/Olympus"}, None, "invalid_programme", "timezone"),
        ({"member_day": {"weekday": "funday", "multiplier_pct": 200}}, None, "invalid_programme", "member_day"),
        ({"tiers": [{"name": "a", "threshold": 10, "multiplier_pct": 100}]}, None, "invalid_programme", "tiers"),
        # settings are checked before effective_from
        ({"pending_days": -1}, TUESDAY - DAY, "invalid_programme", "pending_days"),
        ({"pending_days": 3}, TUESDAY - DAY, "effective_from_in_past", "effective_from"),
    ]
    for settings, effective_from, code, field in cases:
        outcome = await ledger.execute_rules(
            "programme_change", cmd.ChangeProgramme(settings=settings, effective_from=effective_from)
        )
        answer = body(outcome)
        assert (outcome.status, answer["code"], answer["field"]) == (422, code, field), (settings, answer)
    assert await shop.head() == head
    # Before the latest version's effective_from: refused too; equal to it: allowed.
    future = TUESDAY + 5 * DAY
    assert (await ledger.execute_rules("p", cmd.ChangeProgramme(settings={}, effective_from=future))).status == 201
    early = await ledger.execute_rules("p", cmd.ChangeProgramme(settings={}, effective_from=future - HOUR))
    assert body(early)["code"] == "effective_from_in_past"
    same = await ledger.execute_rules("p", cmd.ChangeProgramme(settings={"pending_days": 1}, effective_from=future))
    assert same.status == 201
    assert ledger.programme_at(future).pending_days == 1  # the later version wins


async def test_a_tier_the_version_does_not_name_counts_as_its_lowest(shop):
    assert (await buy(shop, "m1", "p1", 3_000_00))["tier"] == "silver"
    changed = await shop.ledger.execute_rules("p", cmd.ChangeProgramme(settings={"tiers": [
        {"name": "basic", "threshold": 0, "multiplier_pct": 100},
        {"name": "vip", "threshold": 100_000, "multiplier_pct": 300},
    ]}))
    assert changed.status == 201, changed.body
    after = await buy(shop, "m1", "p2", 100_00)  # silver is not named: basic's 100%, not silver's 120%
    assert after["points"] == 10 and after["tier"] == "basic"


async def test_multiplier_bonus_and_coupon_rewards_in_campaign_id_order(shop):
    await create(shop, campaign("b-double", {"kind": "multiplier", "multiplier_pct": 200}))
    await create(shop, campaign("a-bonus", {"kind": "bonus", "points": 7}))
    await create(shop, campaign("c-coupon", {"kind": "coupon", "template": "CAMP10", "value_cents": 1000,
                                             "min_spend_cents": 5000, "valid_days": 3}))
    answer = await buy(shop, "m1", "p1", 258_00)
    assert answer["base_points"] == 25 and answer["points"] == 25 + 7 + 25
    assert answer["rewards"] == [
        {"campaign_id": "a-bonus", "points": 7, "coupon_id": None},
        {"campaign_id": "b-double", "points": 25, "coupon_id": None},
        {"campaign_id": "c-coupon", "points": 0, "coupon_id": "c-coupon-1"},
    ]
    state = await shop.ledger.load("m1")
    bucket = state.buckets["c:a-bonus:p1"]
    assert (bucket.amount, bucket.available_at, bucket.expires_at) == (
        7, TUESDAY + 7 * DAY, TUESDAY + 365 * DAY)
    coupon = state.coupons["c-coupon-1"]
    assert (coupon.valid_from, coupon.expires_at, coupon.source) == (TUESDAY, TUESDAY + 3 * DAY, "campaign")
    second = await buy(shop, "m1", "p2", 100_00)
    assert second["rewards"][-1]["coupon_id"] == "c-coupon-2"
    # A multiplier of 0 regular points grants nothing, and is not listed.
    small = await buy(shop, "m1", "p3", 5_00)
    assert [r["campaign_id"] for r in small["rewards"]] == ["a-bonus", "c-coupon"]


async def test_conditions_stores_tiers_weekdays_minimum_and_first_purchase(shop):
    await create(shop, campaign("stores", {"kind": "bonus", "points": 1}, conditions={"store_ids": ["s-001"]}))
    await create(shop, campaign("silver", {"kind": "bonus", "points": 2}, conditions={"tiers": ["silver"]}))
    await create(shop, campaign("weekend", {"kind": "bonus", "points": 3},
                                conditions={"weekdays": ["saturday", "sunday"]}))
    await create(shop, campaign("big", {"kind": "bonus", "points": 4}, conditions={"min_amount_cents": 100_00}))
    await create(shop, campaign("first", {"kind": "bonus", "points": 5}, conditions={"first_purchase_only": True}))

    def granted(answer):
        return [r["campaign_id"] for r in answer["rewards"]]

    assert granted(await buy(shop, "m1", "p1", 99_99)) == ["first"]
    assert granted(await buy(shop, "m1", "p2", 100_00, store_id="s-001")) == ["big", "stores"]
    saturday = TUESDAY + 4 * DAY  # 10:00 Saturday in Shanghai
    shop.clock.set(saturday)
    assert granted(await buy(shop, "m1", "p3", 50_00)) == ["weekend"]
    assert granted(await buy(shop, "m1", "p4", 4_000_00)) == ["big", "weekend"]  # upgrades to silver with it
    assert granted(await buy(shop, "m1", "p5", 10_00)) == ["silver", "weekend"]
    # A late purchase qualifies by its business time (a Tuesday: not the weekend campaign).
    assert granted(await buy(shop, "m2", "q1", 10_00, at=TUESDAY + HOUR)) == ["first"]


async def test_per_member_limits_by_day_week_month_and_campaign(shop):
    for period in ("day", "week", "month", "campaign"):
        await create(shop, campaign(f"lim-{period}", {"kind": "bonus", "points": 1}, days=40,
                                    per_member_limit=2, per_member_period=period))
    counts: dict[str, int] = {}
    for n, offset in enumerate([0, 0, 0, 1, 1, 6, 7, 8, 30]):  # days after Tuesday 7 Jan
        answer = await buy(shop, "m1", f"p{n}", 10_00, at=None)
        for reward in answer["rewards"]:
            counts[reward["campaign_id"]] = counts.get(reward["campaign_id"], 0) + 1
        if n < 8:
            shop.clock.set(TUESDAY + [0, 0, 0, 1, 1, 6, 7, 8, 30][n + 1] * DAY)
    # day: 2 on the 7th, 2 on the 8th, 1 each on the 13th, 14th, 15th, 6th Feb = 8
    # week (Mon-Sun): 2 in 6-12 Jan, 2 in 13-19 Jan, 1 in 3-9 Feb = 5; month: 2 in Jan, 1 in Feb = 3
    assert counts == {"lim-day": 8, "lim-week": 5, "lim-month": 3, "lim-campaign": 2}


async def test_budgets_cut_the_last_reward_and_are_never_exceeded(shop):
    await create(shop, campaign("pts", {"kind": "bonus", "points": 40}, budget_points=100))
    await create(shop, campaign("cpn", {"kind": "coupon", "template": "T", "value_cents": 100,
                                        "min_spend_cents": 0, "valid_days": 1}, budget_coupons=2))
    answers = [await buy(shop, f"m{n % 3 + 1}", f"p{n}", 10_00) for n in range(4)]
    assert [[(r["campaign_id"], r["points"]) for r in a["rewards"]] for a in answers] == [
        [("cpn", 0), ("pts", 40)], [("cpn", 0), ("pts", 40)], [("pts", 20)], [],
    ]
    await project_all(shop.pool)
    async with shop.pool.acquire() as conn:
        pts = await campaigns_projection.campaign(conn, "pts", shop.clock())
        cpn = await campaigns_projection.campaign(conn, "cpn", shop.clock())
    assert (pts["awarded_points"], pts["members_rewarded"], pts["status"]) == (100, 3, "active")
    assert (cpn["awarded_coupons"], cpn["members_rewarded"]) == (2, 2)


async def test_a_budget_raced_by_two_ledgers_is_spent_exactly(database_url):
    """Two ledgers with their own pools and caches: the budget check under the head lock is the only guard."""
    clock = ManualClock(TUESDAY)
    pools = [await create_pool(database_url) for _ in range(2)]
    try:
        ledgers = [Ledger(EventStore(pool, clock), Programme(), clock) for pool in pools]
        for n in range(12):
            await ledgers[n % 2].execute("enrol", f"m{n}", cmd.Enrol(member_id=f"m{n}"))
        made = await ledgers[0].execute_rules("c", campaign("three", {"kind": "bonus", "points": 10}, budget_points=30))
        assert made.status == 201
        await ledgers[1].execute_rules("c", campaign("limit", {"kind": "bonus", "points": 1}, per_member_limit=1,
                                                      per_member_period="day"))
        outcomes = await asyncio.gather(*(
            ledgers[n % 2].execute("purchase", f"m{n}", cmd.RecordPurchase(purchase_id="p", store_id="s", amount_cents=1000))
            for n in range(12)
        ))
        rewards = [r for o in outcomes for r in body(o)["rewards"] if r["campaign_id"] == "three"]
        assert sum(r["points"] for r in rewards) == 30 and len(rewards) == 3
        await ledgers[0].execute("enrol", "solo", cmd.Enrol(member_id="solo"))
        same_member = await asyncio.gather(*(
            ledgers[n % 2].execute("purchase", "solo", cmd.RecordPurchase(purchase_id=f"q{n}", store_id="s", amount_cents=1000))
            for n in range(10)
        ))
        limited = [r for o in same_member for r in body(o)["rewards"] if r["campaign_id"] == "limit"]
        assert len(limited) == 1
        spend = await ledgers[0].store.read_campaign_spend()
        assert spend["three"].points == 30 and spend["limit"].points == 13
    finally:
        for pool in pools:
            await pool.close()


async def test_a_return_claws_campaign_points_from_the_purchase_s_own_buckets_first(shop):
    await create(shop, campaign("double", {"kind": "multiplier", "multiplier_pct": 300}))
    await create(shop, campaign("coupons", {"kind": "coupon", "template": "T", "value_cents": 100,
                                            "min_spend_cents": 0, "valid_days": 30}))
    await buy(shop, "m1", "p0", 100_00, at=TUESDAY - 20 * DAY)  # before the campaigns: available elsewhere
    answer = await buy(shop, "m1", "p1", 100_00)
    assert (answer["base_points"], answer["points"]) == (10, 30)
    returned = await shop.ret("m1", "x1", "p1", 50_00)
    assert json.loads(returned.body)["points_clawed"] == 15
    state = await shop.ledger.load("m1")
    assert state.buckets["p:p1"].remaining == 0 and state.buckets["c:double:p1"].remaining == 15
    assert state.buckets["p:p0"].remaining == 10
    assert state.coupons["coupons-1"].status == "issued"  # campaign coupons stay
    # The budget is not given back, the counters never go down.
    await project_all(shop.pool)
    async with shop.pool.acquire() as conn:
        double = await campaigns_projection.campaign(conn, "double", shop.clock())
    assert double["awarded_points"] == 20


async def test_campaign_refusals_have_the_contract_s_codes_and_append_nothing(shop):
    bonus = {"kind": "bonus", "points": 5}
    await create(shop, campaign("taken", bonus))
    head = await shop.head()
    cases = [
        (campaign("taken", {"kind": "bonus", "points": 9}), 409, "campaign_exists", None),
        (campaign("x", {"kind": "multiplier", "multiplier_pct": 100}), 422, "invalid_campaign", "reward.multiplier_pct"),
        (campaign("x", {"kind": "bonus", "points": 0}), 422, "invalid_campaign", "reward.points"),
        (campaign("x", {"kind": "cashback"}), 422, "invalid_campaign", "reward.kind"),
        (campaign("x", bonus, conditions={"weekdays": ["someday"]}), 422, "invalid_campaign", "conditions.weekdays.0"),
        (campaign("x", bonus, conditions={"colour": "red"}), 422, "invalid_campaign", "conditions.colour"),
        (campaign("x", bonus, conditions={"store_ids": ["s"] * 1001}), 422, "invalid_campaign", "conditions.store_ids"),
        (campaign("x", bonus, days=0), 422, "invalid_window", "ends_at"),
        (campaign("x", bonus, starts_at=TUESDAY - HOUR), 422, "starts_at_in_past", "starts_at"),
        (cmd.EndCampaign(campaign_id="nope", reason="r"), 404, "campaign_not_found", None),
    ]
    for command, status, code, field in cases:
        outcome = await shop.ledger.execute_rules("campaign", command)
        answer = body(outcome)
        assert (outcome.status, answer["code"], answer.get("field")) == (status, code, field), (command, answer)
    assert await shop.head() == head
    ended = await shop.ledger.execute_rules("end", cmd.EndCampaign(campaign_id="taken", reason="budget review"))
    assert ended.status == 201 and body(ended)["ended_at"] is not None and body(ended)["status"] == "ended"
    again = await shop.ledger.execute_rules("end", cmd.EndCampaign(campaign_id="taken", reason="again"))
    assert (again.status, body(again)["code"]) == (409, "campaign_ended")


async def test_an_ended_campaign_still_rewards_late_purchases_made_before_its_end(shop):
    await create(shop, campaign("c", {"kind": "bonus", "points": 5}))
    shop.clock.advance(hours=5)
    await shop.ledger.execute_rules("end", cmd.EndCampaign(campaign_id="c", reason="stop"))
    assert (await buy(shop, "m1", "p-late", 10_00, at=TUESDAY + HOUR))["rewards"] != []
    assert (await buy(shop, "m1", "p-now", 10_00))["rewards"] == []


async def test_the_campaigns_read_model_equals_a_rebuild_and_lists_by_status(shop):
    await create(shop, campaign("a", {"kind": "bonus", "points": 5}))
    await create(shop, campaign("b", {"kind": "bonus", "points": 5}, starts_at=TUESDAY + 3 * DAY))
    await create(shop, campaign("c", {"kind": "bonus", "points": 5}))
    await buy(shop, "m1", "p1", 10_00)
    await buy(shop, "m2", "p1", 10_00)
    await shop.ledger.execute_rules("end", cmd.EndCampaign(campaign_id="c", reason="stop"))
    await project_all(shop.pool)
    before = await all_rows(shop.pool)
    await rebuild_all(shop.pool)
    assert await all_rows(shop.pool) == before
    async with shop.pool.acquire() as conn:
        now = shop.clock()
        listed = {s: [c["campaign_id"] for c in await campaigns_projection.campaign_page(conn, "", 10, now, s)]
                  for s in (None, "active", "scheduled", "ended")}
    assert listed == {None: ["a", "b", "c"], "active": ["a"], "scheduled": ["b"], "ended": ["c"]}
    lines = await shop.pool.fetch("SELECT kind, points, reason FROM ledger_lines WHERE stream_id = 'm1' ORDER BY line")
    assert [tuple(line) for line in lines if line["kind"] == "campaign"] == [
        ("campaign", 5, "campaign a"), ("campaign", 5, "campaign c")]
    liability = await shop.pool.fetchval("SELECT sum(earned) FROM liability_months")
    assert liability == 2 * (1 + 5 + 5)  # regular and campaign points both count as earned


async def test_replay_checks_every_campaign_s_counters_against_the_log(shop):
    await create(shop, campaign("c", {"kind": "bonus", "points": 5}))
    await buy(shop, "m1", "p1", 10_00)
    await shop.ledger.execute_rules("end", cmd.EndCampaign(campaign_id="c", reason="stop"))
    await project_all(shop.pool)
    report = await replay(shop.pool, shop.programme, shop.clock())
    assert report.ok, report.mismatches
    assert report.members_checked == 3  # the $programme and $campaigns streams are no members
    await shop.pool.execute("UPDATE campaigns SET awarded_points = 4, members_rewarded = 2")
    report = await replay(shop.pool, shop.programme, shop.clock())
    assert report.mismatches == [
        "campaign c: awarded_points: log 5, projection 4", "campaign c: members_rewarded: log 1, projection 2",
    ]


async def test_loyalty_programme_show_and_set(shop, database_url, tmp_path):
    code, out, err = await loyalty(database_url, "programme", "show")
    assert code == 0, err
    assert json.loads(out)["version"] == 1
    changes = tmp_path / "double.toml"  # its version is ignored, as at start (CONTRACT §6.1)
    changes.write_text("version = 99\nearn_cents_per_point = 500\n[member_day]\nweekday = \"monday\"\nmultiplier_pct = 300\n")
    code, out, err = await loyalty(database_url, "programme", "set", str(changes), "--effective-from", "2099-01-01T00:00:00Z")
    assert code == 0, err
    assert json.loads(out)["version"] == 2 and json.loads(out)["effective_from"] == "2099-01-01T00:00:00Z"
    code, out, _ = await loyalty(database_url, "programme", "show", "--as-of", "2099-01-02T00:00:00Z")
    shown = json.loads(out)
    assert shown["settings"]["member_day"] == {"weekday": "monday", "multiplier_pct": 300}
    bad = tmp_path / "bad.toml"
    bad.write_text("pending_days = -3\n")
    code, _out, err = await loyalty(database_url, "programme", "set", str(bad))
    assert code == 1 and json.loads(err)["code"] == "invalid_programme" and json.loads(err)["field"] == "pending_days"

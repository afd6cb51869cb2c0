"""The programme over HTTP (CONTRACT §2, §4): points movements, coupons, jobs, batch, concurrency."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest

from ledger.application import Ledger
from ledger.clock import ManualClock
from ledger.database import create_pool
from ledger.programme import Programme
from ledger.store import EventStore
from ledger import commands as cmd
from tests.support import TUESDAY

pytestmark = pytest.mark.asyncio

LONG_AGO = "2024-12-19T02:00:00Z"  # 19 days before TUESDAY, a Thursday: purchases are available


async def funded(api, member_id: str, points: int) -> None:
    """Enrol a member holding ``points`` available points (regular tier, not a Friday)."""
    await api.enrol(member_id)
    status, answer, _ = await api.purchase(member_id, f"{member_id}-fund", points * 1000, occurred_at=LONG_AGO)
    assert status == 201 and answer["points"] == points, answer


async def balance(api, member_id: str, **params) -> dict:
    status, body, _ = await api.get(f"/v1/members/{member_id}/balance", **params)
    assert status == 200, body
    return body


def conserved(b: dict) -> bool:
    return (
        b["lifetime_earned"] - b["lifetime_clawed"] + b["lifetime_adjusted"] - b["lifetime_redeemed"] - b["lifetime_expired"]
        == b["available"] + b["pending"]
    )


async def test_enrolment_issues_the_welcome_pack(api):
    answer = await api.enrol("m1")
    assert answer["status"] == "prospect"
    assert sorted(c["value_cents"] for c in answer["coupons"]) == [2000, 2000, 3000, 3000]
    status, wallet, _ = await api.get("/v1/members/m1/coupons", status="issued")
    assert len(wallet["coupons"]) == 4
    assert wallet["coupons"][0]["expires_at"] == "2025-02-06T02:00:00Z"  # 30 x 24 hours after enrolment


async def test_points_are_pending_for_the_return_window(api):
    await api.enrol("m1")
    await api.purchase("m1", "p1", 25800)
    b = await balance(api, "m1")
    assert (b["pending"], b["available"]) == (25, 0)
    b = await balance(api, "m1", as_of="2025-01-14T02:00:00Z")
    assert (b["pending"], b["available"]) == (0, 25) and conserved(b)


async def test_redemption_burns_soonest_expiry_first_and_never_overdraws(api):
    await api.enrol("m1")
    await api.purchase("m1", "old", 10000, occurred_at="2024-12-10T02:00:00Z")
    await api.purchase("m1", "new", 20000, occurred_at="2024-12-19T02:00:00Z")
    status, answer, _ = await api.post("/v1/members/m1/redemptions", {"redemption_id": "r1", "points": 15})
    assert status == 201
    assert answer["consumed"] == [{"bucket_id": "p:old", "points": 10}, {"bucket_id": "p:new", "points": 5}]
    assert answer["available"] == 15
    head = await api.head()
    status, problem, _ = await api.post("/v1/members/m1/redemptions", {"redemption_id": "r2", "points": 16})
    assert status == 409 and problem["code"] == "insufficient_points"
    assert await api.head() == head


async def test_reversal_gives_back_exactly_the_buckets_and_replays(api):
    await funded(api, "m1", 50)
    await api.post("/v1/members/m1/redemptions", {"redemption_id": "r1", "points": 30})
    status, answer, _ = await api.post("/v1/members/m1/redemptions/r1/reversal")
    assert status == 201 and answer["restored"] == [{"bucket_id": "p:m1-fund", "points": 30}]
    assert (await balance(api, "m1"))["available"] == 50
    status, again, response = await api.post("/v1/members/m1/redemptions/r1/reversal")
    assert status == 201 and again == answer and response.headers["Idempotent-Replayed"] == "true"
    status, problem, _ = await api.post("/v1/members/m1/redemptions/nope/reversal")
    assert status == 404 and problem["code"] == "redemption_not_found"


async def test_returns_claw_back_proportionally_and_owe_debt(api):
    await api.enrol("m1")
    await api.purchase("m1", "p1", 100000, occurred_at=LONG_AGO)  # 100 points
    await api.post("/v1/members/m1/redemptions", {"redemption_id": "r1", "points": 80})
    status, answer, _ = await api.post("/v1/members/m1/returns", {"return_id": "x1", "purchase_id": "p1", "amount_cents": 33333})
    assert status == 201 and answer["points_clawed"] == 33 and answer["debt"] == 13
    status, answer, _ = await api.post("/v1/members/m1/returns", {"return_id": "x2", "purchase_id": "p1", "amount_cents": 66667})
    assert answer["points_clawed"] == 67 and answer["debt"] == 80
    b = await balance(api, "m1")
    assert b["available"] == -80 and b["debt"] == 80 and conserved(b)
    status, problem, _ = await api.post("/v1/members/m1/returns", {"return_id": "x3", "purchase_id": "p1", "amount_cents": 1})
    assert status == 422 and problem["code"] == "return_exceeds_purchase"
    status, problem, _ = await api.post("/v1/members/m1/returns", {"return_id": "x4", "purchase_id": "zz", "amount_cents": 1})
    assert status == 404 and problem["code"] == "purchase_not_found"
    # The next credit pays the debt first, even while its bucket is pending.
    await api.purchase("m1", "p2", 100000)
    b = await balance(api, "m1")
    assert b["debt"] == 0 and b["pending"] == 20 and conserved(b)


async def test_adjustments_are_admin_only_and_cannot_overdraw(api):
    await funded(api, "m1", 10)
    body = {"adjustment_id": "a1", "points": -11, "reason": "goodwill reversal"}
    status, _, _ = await api.post("/v1/members/m1/adjustments", body, role="checkout")
    assert status == 403
    status, problem, _ = await api.post("/v1/members/m1/adjustments", body, role="admin")
    assert status == 409 and problem["code"] == "insufficient_points"
    status, answer, _ = await api.post("/v1/members/m1/adjustments", {**body, "points": 5}, role="admin")
    assert status == 201 and answer["available"] == 15
    b = await balance(api, "m1")
    assert b["lifetime_adjusted"] == 5 and conserved(b)


async def test_time_checks_refuse_future_and_too_old_business_times(api):
    await api.enrol("m1")
    head = await api.head()
    status, problem, _ = await api.purchase("m1", "p1", 100, occurred_at="2025-01-07T02:06:00Z")
    assert status == 422 and problem["code"] == "occurred_at_in_future"
    status, problem, _ = await api.purchase("m1", "p1", 100, occurred_at="2024-12-01T00:00:00Z")
    assert status == 422 and problem["code"] == "occurred_at_too_old" and problem["field"] == "occurred_at"
    status, problem, _ = await api.post("/v1/members", {"member_id": "m2", "enrolled_at": "2024-12-01T00:00:00Z"})
    assert (status, problem["code"], problem["field"]) == (422, "occurred_at_too_old", "enrolled_at"), problem
    assert problem["detail"].startswith("enrolled_at is more than")
    assert await api.head() == head


async def test_coupons_redeem_once_with_validity_and_min_spend(api):
    await api.enrol("m1")
    url = "/v1/members/m1/coupons/welcome-1/redemption"
    status, problem, _ = await api.post(url, {"order_ref": "o1", "order_amount_cents": 9999})
    assert status == 409 and problem["code"] == "coupon_not_redeemable" and problem["reason"] == "min_spend_not_met"
    status, coupon, _ = await api.post(url, {"order_ref": "o1", "order_amount_cents": 10000})
    assert status == 201 and coupon["status"] == "redeemed"
    status, problem, _ = await api.post(url, {"order_ref": "o2", "order_amount_cents": 10000})
    assert status == 409 and problem["reason"] == "already_redeemed"
    status, coupon, _ = await api.post(url + "/reversal")
    assert status == 201 and coupon["status"] == "issued"
    status, problem, _ = await api.post("/v1/members/m1/coupons/nope/redemption", {"order_ref": "o", "order_amount_cents": 1})
    assert status == 404 and problem["code"] == "coupon_not_found"
    api.clock.advance(days=31)
    status, problem, _ = await api.post("/v1/members/m1/coupons/welcome-2/redemption", {"order_ref": "o3", "order_amount_cents": 10000})
    assert status == 409 and problem["reason"] == "expired"


async def test_a_coupon_bought_with_points_burns_and_issues_atomically(api):
    await funded(api, "m1", 100)
    body = {"coupon_id": "c1", "template": "CASH10", "value_cents": 1000, "expires_at": "2025-03-01T00:00:00Z", "points_cost": 60}
    status, coupon, _ = await api.post("/v1/members/m1/coupons", body)
    assert status == 201 and coupon["status"] == "issued" and coupon["points_cost"] == 60
    b = await balance(api, "m1")
    assert b["available"] == 40 and b["lifetime_redeemed"] == 60
    head = await api.head()
    status, problem, _ = await api.post("/v1/members/m1/coupons", {**body, "coupon_id": "c2"})
    assert status == 409 and problem["code"] == "insufficient_points"
    assert await api.head() == head
    status, _, _ = await api.post("/v1/members/m1/coupons", {k: v for k, v in body.items() if k != "points_cost"} | {"coupon_id": "c3"})
    assert status == 403


async def test_jobs_expire_points_once_and_downgrade_tiers(api):
    await api.enrol("m1")
    await api.purchase("m1", "p1", 600000, occurred_at=LONG_AGO)  # gold, 600 points
    a_year_later = "2025-12-21T00:00:00Z"
    status, report, _ = await api.post(f"/v1/jobs/expire?as_of={a_year_later}", role="admin")
    assert status == 200 and report["appended"] >= 1
    status, again, _ = await api.post(f"/v1/jobs/expire?as_of={a_year_later}", role="admin")
    assert again["appended"] == 0 and again["position"] == report["position"]
    b = await balance(api, "m1", as_of=a_year_later)
    assert b["lifetime_expired"] == 600 and b["available"] == 0 and conserved(b)
    status, tier, _ = await api.get("/v1/members/m1/tier", as_of=a_year_later)
    assert tier["tier"] == "gold"
    status, report, _ = await api.post(f"/v1/jobs/tiers?as_of={a_year_later}", role="admin")
    assert report["appended"] == 1
    status, tier, _ = await api.get("/v1/members/m1/tier", as_of=a_year_later)
    assert tier["tier"] == "silver"
    status, report, _ = await api.post(f"/v1/jobs/tiers?as_of={a_year_later}", role="admin")
    assert report["appended"] == 0


async def test_birthday_coupon_once_a_year_in_the_birthday_month(api):
    await api.enrol("m1", birthday="01-20")
    await api.enrol("m2", birthday="03-02")
    status, report, _ = await api.post("/v1/jobs/birthdays", role="admin")
    assert report["appended"] == 1
    status, report, _ = await api.post("/v1/jobs/birthdays", role="admin")
    assert report["appended"] == 0
    _, wallet, _ = await api.get("/v1/members/m1/coupons")
    assert [c["coupon_id"] for c in wallet["coupons"] if c["source"] == "birthday"] == ["birthday-2025"]


async def test_batch_runs_each_line_as_its_own_command_in_order(api):
    lines = [
        {"op": "enrol", "member_id": "b1", "body": {}, "idempotency_key": "e1"},
        {"op": "purchase", "member_id": "b1", "body": {"purchase_id": "p1", "store_id": "s", "amount_cents": 25800},
         "idempotency_key": "b1"},
        {"op": "purchase", "member_id": "b1", "body": {"purchase_id": "p1", "store_id": "s", "amount_cents": 1}},
        {"op": "redemption", "member_id": "b1", "body": {"redemption_id": "r1", "points": 1000}},
        {"op": "nope", "member_id": "b1", "body": {}},
        {"op": "coupon_redemption", "member_id": "b1", "body": {"coupon_id": "welcome-1", "order_ref": "o1",
                                                                 "order_amount_cents": 10000}},
        {"op": "coupon_redemption", "member_id": "b1", "body": {"order_ref": "o1", "order_amount_cents": 10000}},
        "not json",
    ]
    payload = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines).encode()
    response = await api.client.post(
        "/v1/batch", data=payload, headers=api.headers("checkout", **{"Content-Type": "application/x-ndjson"})
    )
    assert response.status == 200
    results = [json.loads(line) for line in (await response.text()).splitlines()]
    assert [r["line"] for r in results] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["status"] for r in results] == [201, 201, 409, 409, 422, 201, 422, 400]
    assert results[1]["body"]["points"] == 25


async def test_a_database_failure_on_one_members_lines_fails_only_those_lines(api, pool):
    """A member whose append PostgreSQL refuses (a trigger here) gets a 500 problem on each of its lines;
    the other members' lines in the same batch keep their own answers and are committed once."""
    for member_id in ("ok1", "bad", "ok2"):
        await api.enrol(member_id)
    await pool.execute("""
        CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'member bad refused for the test'; END $$;
        CREATE TRIGGER refuse_bad BEFORE INSERT ON events FOR EACH ROW
            WHEN (NEW.stream_id = 'bad') EXECUTE FUNCTION refuse_bad();
    """)
    lines = [{"op": "purchase", "member_id": member_id, "body": {"purchase_id": f"{member_id}-{n}", "store_id": "s",
                                                                  "amount_cents": 10000}}
             for n in range(3) for member_id in ("ok1", "bad", "ok2")]
    response = await api.client.post(
        "/v1/batch", data="\n".join(json.dumps(line) for line in lines).encode(),
        headers=api.headers("checkout", **{"Content-Type": "application/x-ndjson"}),
    )
    assert response.status == 200
    results = [json.loads(line) for line in (await response.text()).splitlines()]
    assert [r["status"] for r in results] == [201, 500, 201] * 3
    assert results[1]["body"]["code"] == "internal_error"
    for member_id in ("ok1", "ok2"):
        assert (await balance(api, member_id))["lifetime_earned"] == 30


async def test_forty_parallel_redemptions_of_ten_from_a_hundred(api):
    await funded(api, "m1", 100)
    outcomes = await asyncio.gather(
        *(api.post("/v1/members/m1/redemptions", {"redemption_id": f"r{n}", "points": 10}) for n in range(40))
    )
    assert sorted(status for status, _, _ in outcomes).count(201) == 10
    assert all(body["code"] == "insufficient_points" for status, body, _ in outcomes if status != 201)
    assert (await balance(api, "m1"))["available"] == 0


async def test_twenty_parallel_redemptions_of_one_coupon_one_wins(api):
    await api.enrol("m1")
    outcomes = await asyncio.gather(
        *(
            api.post("/v1/members/m1/coupons/welcome-1/redemption", {"order_ref": f"o{n}", "order_amount_cents": 10000})
            for n in range(20)
        )
    )
    assert [status for status, _, _ in outcomes].count(201) == 1


async def test_two_processes_redeeming_the_same_points_never_overdraw(database_url):
    """Two ledgers with their own pools and caches: the expected version is the only guard."""
    clock = ManualClock(TUESDAY)
    pools = [await create_pool(database_url) for _ in range(2)]
    try:
        ledgers = [Ledger(EventStore(pool, clock), Programme(), clock) for pool in pools]
        await ledgers[0].execute("enrol", "m1", cmd.Enrol(member_id="m1"))
        fund = cmd.RecordPurchase(purchase_id="f", store_id="s", amount_cents=100_000, occurred_at=TUESDAY - timedelta(days=10))
        await ledgers[0].execute("purchase", "m1", fund)
        outcomes = await asyncio.gather(
            *(
                ledgers[n % 2].execute("redemption", "m1", cmd.Redeem(redemption_id=f"r{n}", points=10))
                for n in range(30)
            )
        )
        assert [o.status for o in outcomes].count(201) == 10
        state = await ledgers[1].load("m1")
        assert sum(b.remaining for b in state.buckets.values()) == 0
    finally:
        for pool in pools:
            await pool.close()


async def test_a_job_run_from_two_processes_at_once_appends_nothing_twice(database_url):
    clock = ManualClock(TUESDAY)
    pools = [await create_pool(database_url) for _ in range(2)]
    try:
        ledgers = [Ledger(EventStore(pool, clock), Programme(), clock) for pool in pools]
        for n in range(6):
            await ledgers[0].execute("enrol", f"m{n}", cmd.Enrol(member_id=f"m{n}", birthday="01-15"))
            await ledgers[0].execute(
                "purchase", f"m{n}", cmd.RecordPurchase(purchase_id="p", store_id="s", amount_cents=5000 + n)
            )
        later = TUESDAY + timedelta(days=400)
        from ledger.jobs import run_job

        reports = await asyncio.gather(*(run_job(ledger, "expire", later) for ledger in ledgers))
        # 6 buckets and 24 welcome coupons expire once, whoever ran it.
        assert sum(r["appended"] for r in reports) == 6 + 24
        again = await run_job(ledgers[1], "expire", later)
        assert again["appended"] == 0
        birthdays = await asyncio.gather(*(run_job(ledger, "birthdays", TUESDAY) for ledger in ledgers))
        assert sum(r["appended"] for r in birthdays) == 6
    finally:
        for pool in pools:
            await pool.close()


async def test_the_member_profile_shows_status_lifecycle_and_rfm(api):
    await api.enrol("m1")
    status, profile, _ = await api.get("/v1/members/m1", role="checkout")
    assert profile["status"] == "prospect" and profile["lifecycle"] == "prospect" and profile["orders_365d"] == 0
    for n in range(4):
        await api.purchase("m1", f"p{n}", 10000)
    status, profile, _ = await api.get("/v1/members/m1", role="reader")
    assert profile["status"] == "member" and profile["lifecycle"] == "loyal"
    assert (profile["orders_365d"], profile["spend_365d_cents"], profile["recency_days"]) == (4, 40000, 0)
    assert profile["balance"]["pending"] == 40 and profile["tier"]["tier"] == "regular"
    api.clock.advance(days=181)
    status, profile, _ = await api.get("/v1/members/m1")
    assert profile["lifecycle"] == "dormant" and profile["recency_days"] == 181

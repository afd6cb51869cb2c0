"""Concurrency attacks across processes: two services on one database, many parallel requests.

Each attack fires the same scarce thing (points, a coupon, a purchase's amount)
at both processes at once. The contract's promises hold whatever the
interleaving: a redemption never overdraws, a coupon is redeemed at most
once, returns never add up to more than the purchase, and one natural id
takes effect once.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import aiohttp
import pytest

from tests.service_process import (
    Client,
    ServiceProcess,
    assert_balances_equal_replay,
    assert_chain_verifies,
    assert_log_is_well_formed,
    create_key,
    read_all_events,
)

pytestmark = pytest.mark.asyncio

ATTACKERS = 24  # parallel requests per attack, split over the two processes


def rfc3339(moment: datetime) -> str:
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


@pytest.fixture
async def two_services(database_url):
    first = ServiceProcess(database_url)
    second = ServiceProcess(database_url, admin_key=first.admin_key)
    await asyncio.gather(first.start(), second.start())
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            key = await create_key(session, first, "checkout", "till-attack")
            yield session, [Client(session, s.url, key) for s in (first, second)], \
                [Client(session, s.url, first.admin_key) for s in (first, second)]
    finally:
        first.close()
        second.close()


async def post_until_answered(client: Client, path: str, body: dict, key: str) -> tuple[int, dict, dict]:
    """POST, retrying 503 (contention between the processes) with the same Idempotency-Key."""
    for _attempt in range(50):
        status, answer, headers = await client.post(path, body, **{"Idempotency-Key": key})
        assert status != 500, answer
        if status != 503:
            return status, answer, headers
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} was 503 fifty times")


async def attack(clients: list[Client], path: str, bodies: list[dict], tag: str) -> list[tuple[int, dict, dict]]:
    """All bodies at once, alternating between the two processes."""
    return await asyncio.gather(*(
        post_until_answered(clients[n % 2], path, body, f"{tag}-{n}") for n, body in enumerate(bodies)
    ))


async def events_of(admin: Client, member_id: str, event_type: str) -> list[dict]:
    return [e for e in await read_all_events(admin) if e["stream_id"] == member_id and e["type"] == event_type]


async def assert_log_sound(admin: Client) -> None:
    events = await read_all_events(admin)
    assert_log_is_well_formed(events)
    await assert_chain_verifies(admin)
    await assert_balances_equal_replay(admin, events, datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=1))


async def test_parallel_redemptions_across_processes_never_overdraw(two_services):
    _session, checkout, admin = two_services
    status, body, _ = await admin[0].post("/v1/members", {"member_id": "m1"})
    assert status == 201, body
    status, body, _ = await admin[1].post("/v1/members/m1/adjustments",
                                          {"adjustment_id": "grant", "points": 100, "reason": "attack test"})
    assert status == 201, body

    answers = await attack(checkout, "/v1/members/m1/redemptions",
                           [{"redemption_id": f"r{n}", "points": 30} for n in range(ATTACKERS)], "redeem")
    accepted = [a for s, a, _ in answers if s == 201]
    refused = [a for s, a, _ in answers if s != 201]
    assert len(accepted) == 3, answers  # 3 x 30 of 100
    assert all(a["code"] == "insufficient_points" for a in refused), refused
    assert sorted(a["available"] for a in accepted) == [10, 40, 70]
    assert len(await events_of(admin[0], "m1", "points_redeemed")) == 3
    status, balance, _ = await admin[1].get("/v1/members/m1/balance")
    assert balance["available"] == 10 and balance["lifetime_redeemed"] == 90, balance
    await assert_log_sound(admin[0])


async def test_one_redemption_id_sent_to_both_processes_at_once_takes_effect_once(two_services):
    _session, checkout, admin = two_services
    await admin[0].post("/v1/members", {"member_id": "m1"})
    await admin[0].post("/v1/members/m1/adjustments", {"adjustment_id": "grant", "points": 100, "reason": "attack test"})

    # Same natural id and body, different Idempotency-Keys: a till retrying through two load balancers.
    answers = await attack(checkout, "/v1/members/m1/redemptions",
                           [{"redemption_id": "r1", "points": 7}] * ATTACKERS, "same")
    assert {s for s, _, _ in answers} == {201}, answers
    assert len({str(a) for _, a, _ in answers}) == 1, "every retry must get the first answer"
    assert sum(1 for _, _, h in answers if h.get("Idempotent-Replayed") == "true") == ATTACKERS - 1
    assert len(await events_of(admin[0], "m1", "points_redeemed")) == 1
    status, balance, _ = await admin[1].get("/v1/members/m1/balance")
    assert balance["available"] == 93, balance
    await assert_log_sound(admin[0])


async def test_parallel_redemptions_of_one_coupon_across_processes_redeem_it_at_most_once(two_services):
    _session, checkout, admin = two_services
    await admin[0].post("/v1/members", {"member_id": "m1"})
    expires = rfc3339(datetime.now(timezone.utc) + timedelta(days=30))
    status, body, _ = await admin[1].post("/v1/members/m1/coupons", {
        "coupon_id": "c1", "template": "T20", "value_cents": 2000, "min_spend_cents": 0, "expires_at": expires})
    assert status == 201, body

    answers = await attack(checkout, "/v1/members/m1/coupons/c1/redemption",
                           [{"order_ref": f"o{n}", "order_amount_cents": 5000} for n in range(ATTACKERS)], "coupon")
    accepted = [a for s, a, _ in answers if s == 201]
    refused = [(s, a) for s, a, _ in answers if s != 201]
    assert len(accepted) == 1, answers
    assert all(s == 409 and a["code"] == "coupon_not_redeemable" for s, a in refused), refused
    assert len(await events_of(admin[0], "m1", "coupon_redeemed")) == 1
    await assert_log_sound(admin[0])


async def test_parallel_returns_of_one_purchase_across_processes_never_exceed_it(two_services):
    _session, checkout, admin = two_services
    await admin[0].post("/v1/members", {"member_id": "m1"})
    status, purchase, _ = await checkout[0].post("/v1/members/m1/purchases",
                                                 {"purchase_id": "p1", "store_id": "s1", "amount_cents": 10_000})
    assert status == 201 and purchase["points"] == 10, purchase

    answers = await attack(checkout, "/v1/members/m1/returns",
                           [{"return_id": f"x{n}", "purchase_id": "p1", "amount_cents": 3_000} for n in range(ATTACKERS)],
                           "return")
    accepted = [a for s, a, _ in answers if s == 201]
    refused = [(s, a) for s, a, _ in answers if s != 201]
    assert len(accepted) == 3, answers  # 3 x 3,000 of 10,000
    assert all(s == 422 and a["code"] == "return_exceeds_purchase" for s, a in refused), refused
    returns = await events_of(admin[0], "m1", "purchase_returned")
    assert sum(e["data"]["amount_cents"] for e in returns) == 9_000
    clawed = await events_of(admin[0], "m1", "points_clawed_back")
    assert sum(e["data"]["points"] for e in clawed) == 9  # floor(10 * 9000 / 10000), never more than earned
    await assert_log_sound(admin[0])

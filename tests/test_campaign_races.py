"""Campaign limits across processes (CONTRACT §6.2): two real services on one database, parallel purchases.

A budget and a per-member limit are promises about the whole log, not about
one process: the budget check is repeated under the store's head lock with
the counters there are then, and a per-member limit is covered by the
member's stream version, so whatever the interleaving, a campaign never
grants more than it may.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from tests.service_process import Client
from tests.test_security_races import assert_log_sound, post_until_answered, rfc3339, two_services  # noqa: F401

pytestmark = pytest.mark.asyncio


async def create_campaign(admin: Client, campaign_id: str, reward: dict, **fields) -> dict:
    now = datetime.now(timezone.utc)
    status, answer, _ = await admin.post("/v1/campaigns", {
        "campaign_id": campaign_id, "name": campaign_id, "starts_at": rfc3339(now),
        "ends_at": rfc3339(now + timedelta(days=1)), "reward": reward, **fields,
    })
    assert status == 201, answer
    return answer


async def purchases(tills: list[Client], member_ids: list[str]) -> list[dict]:
    """One purchase per entry, all at once, alternating between the processes."""
    answers = await asyncio.gather(*(
        post_until_answered(tills[n % 2], f"/v1/members/{member_id}/purchases",
                            {"purchase_id": f"p{n}", "store_id": "s1", "amount_cents": 10_000}, f"race-{member_id}-{n}")
        for n, member_id in enumerate(member_ids)
    ))
    for status, answer, _ in answers:
        assert status == 201, answer
    return [answer for _, answer, _ in answers]


async def test_a_budget_of_three_rewards_raced_by_twelve_members_from_two_processes_gives_exactly_three(two_services):
    _session, tills, admins = two_services
    await create_campaign(admins[0], "pts", {"kind": "bonus", "points": 10}, budget_points=30)
    await create_campaign(admins[1], "cpn", {"kind": "coupon", "template": "RACE", "value_cents": 500,
                                             "min_spend_cents": 0, "valid_days": 7}, budget_coupons=3)
    members = [f"m{n}" for n in range(12)]
    for n, member_id in enumerate(members):
        status, answer, _ = await tills[n % 2].post("/v1/members", {"member_id": member_id})
        assert status == 201, answer
    answers = await purchases(tills, members)
    rewards = [r for answer in answers for r in answer["rewards"]]
    points = [r for r in rewards if r["campaign_id"] == "pts"]
    coupons = [r for r in rewards if r["campaign_id"] == "cpn"]
    assert (len(points), sum(r["points"] for r in points)) == (3, 30)
    assert len(coupons) == 3 and all(r["coupon_id"] == "cpn-1" for r in coupons)
    head = max(answer["position"] for answer in answers)
    for campaign_id, awarded in (("pts", ("awarded_points", 30)), ("cpn", ("awarded_coupons", 3))):
        status, campaign, _ = await admins[1].get(f"/v1/campaigns/{campaign_id}", min_position=str(head))
        assert status == 200, campaign
        assert (campaign[awarded[0]], campaign["members_rewarded"]) == (awarded[1], 3)
    await assert_log_sound(admins[0])


async def test_a_daily_limit_of_one_raced_by_ten_purchases_of_one_member_gives_one(two_services):
    _session, tills, admins = two_services
    await create_campaign(admins[0], "daily", {"kind": "bonus", "points": 5}, per_member_limit=1,
                          per_member_period="day")
    status, answer, _ = await tills[0].post("/v1/members", {"member_id": "solo"})
    assert status == 201, answer
    answers = await purchases(tills, ["solo"] * 10)
    rewards = [r for answer in answers for r in answer["rewards"]]
    assert rewards == [{"campaign_id": "daily", "points": 5, "coupon_id": None}]
    await assert_log_sound(admins[1])

"""Referrals across two service processes on one database (CONTRACT §6.4).

A referral appends to two members' streams in one transaction, the
referrer's at the version its decision saw: referees of one referrer buying
at the same instant on both processes never pass the referrer's monthly cap,
each referee gets its coupon whatever the cap, and a purchase sent to both
processes at once rewards once.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.service_process import Client, ServiceProcess, create_key, read_all_events
from tests.test_security_races import assert_log_sound, attack, post_until_answered

pytestmark = pytest.mark.asyncio

MONTHLY_CAP = 3


@pytest.fixture
async def two_services(database_url, tmp_path):
    programme = tmp_path / "programme.toml"
    programme.write_text(f"[referral]\nreferrer_points = 20\nmonthly_cap = {MONTHLY_CAP}\n")
    env = {"LOYALTY_PROGRAMME": str(programme)}
    first = ServiceProcess(database_url, env=env)
    second = ServiceProcess(database_url, env=env, admin_key=first.admin_key)
    await first.start()  # the first start seeds the programme; the second finds it
    await second.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            key = await create_key(session, first, "checkout", "till-referrals")
            yield [Client(session, s.url, key) for s in (first, second)], Client(session, first.url, first.admin_key)
    finally:
        first.close()
        second.close()


async def enrol(client: Client, member_id: str, referred_by: str | None = None) -> None:
    body = {"member_id": member_id, **({"referred_by": referred_by} if referred_by else {})}
    status, answer, _ = await post_until_answered(client, "/v1/members", body, f"enrol-{member_id}")
    assert status == 201, answer


async def referral_rewards(admin: Client, referrer_id: str) -> list[str]:
    return [e["data"]["referral_of"] for e in await read_all_events(admin)
            if e["stream_id"] == referrer_id and e["type"] == "points_earned" and e["data"].get("referral_of")]


def first_purchase(referee: str) -> dict:
    return {"purchase_id": f"{referee}-first", "store_id": "s1", "amount_cents": 25_800}


async def test_twelve_referees_racing_on_two_processes_reward_the_referrer_exactly_its_monthly_cap(two_services):
    clients, admin = two_services
    await enrol(clients[0], "r1")
    referees = [f"r1-friend-{n}" for n in range(12)]
    for referee in referees:
        await enrol(clients[1], referee, referred_by="r1")
    answers = await asyncio.gather(*(
        post_until_answered(clients[n % 2], f"/v1/members/{referee}/purchases", first_purchase(referee), f"buy-{referee}")
        for n, referee in enumerate(referees)
    ))
    assert all(status == 201 for status, _, _ in answers), answers
    referrals = [answer["referral"] for _, answer, _ in answers]
    assert all(r["referrer_id"] == "r1" and r["coupon_id"] == "referral-1" for r in referrals)
    assert sorted(r["referrer_points"] for r in referrals) == [0] * (12 - MONTHLY_CAP) + [20] * MONTHLY_CAP
    rewarded = await referral_rewards(admin, "r1")
    assert len(rewarded) == MONTHLY_CAP and len(set(rewarded)) == MONTHLY_CAP
    assert sorted(rewarded) == sorted(referee for referee, r in zip(referees, referrals) if r["referrer_points"])
    status, member, _ = await admin.get("/v1/members/r1")
    assert member["referrals_rewarded"] == MONTHLY_CAP and member["balance"]["pending"] == 20 * MONTHLY_CAP
    await assert_log_sound(admin)


async def test_two_referees_buying_at_once_when_one_reward_is_left_get_exactly_one(two_services):
    clients, admin = two_services
    for round_ in range(3):  # several rounds: each interleaving must hold, not one lucky one
        referrer = f"r{round_}"
        await enrol(clients[0], referrer)
        earlier = [f"{referrer}-early-{n}" for n in range(MONTHLY_CAP - 1)]
        racing = [f"{referrer}-race-{n}" for n in range(2)]
        for referee in earlier + racing:
            await enrol(clients[0], referee, referred_by=referrer)
        for referee in earlier:
            status, answer, _ = await post_until_answered(
                clients[0], f"/v1/members/{referee}/purchases", first_purchase(referee), f"buy-{referee}")
            assert answer["referral"]["referrer_points"] == 20
        answers = await asyncio.gather(*(
            post_until_answered(clients[n], f"/v1/members/{referee}/purchases", first_purchase(referee), f"buy-{referee}")
            for n, referee in enumerate(racing)
        ))
        assert sorted(answer["referral"]["referrer_points"] for _, answer, _ in answers) == [0, 20]
        assert len(await referral_rewards(admin, referrer)) == MONTHLY_CAP
    await assert_log_sound(admin)


async def test_one_first_purchase_sent_to_both_processes_at_once_rewards_once(two_services):
    clients, admin = two_services
    await enrol(clients[0], "r1")
    await enrol(clients[0], "bob", referred_by="r1")
    answers = await attack(clients, "/v1/members/bob/purchases", [first_purchase("bob")] * 8, "same-purchase")
    assert {status for status, _, _ in answers} == {201}
    assert len({answer["position"] for _, answer, _ in answers}) == 1, "every sender gets the first answer"
    assert await referral_rewards(admin, "r1") == ["bob"]
    await assert_log_sound(admin)

"""Referrals over HTTP (CONTRACT §6.4): enrolment codes, the purchase answer, a batch, the member view."""

from __future__ import annotations

import json

import pytest


pytestmark = pytest.mark.asyncio


async def test_enrolment_codes_and_the_purchase_answer(api):
    await api.enrol("alice")
    head = await api.head()
    status, problem, _ = await api.post("/v1/members", {"member_id": "bob", "referred_by": "bob"})
    assert (status, problem["code"]) == (422, "self_referral")
    status, problem, _ = await api.post("/v1/members", {"member_id": "bob", "referred_by": "nobody"})
    assert (status, problem["code"]) == (422, "referrer_not_found")
    status, problem, _ = await api.post("/v1/members", {"member_id": "bob", "referred_by": "bad id!"})
    assert (status, problem["code"]) == (422, "invalid_id")
    assert await api.head() == head
    await api.enrol("bob", referred_by="alice")
    status, answer, _ = await api.purchase("bob", "p1", 25_800)
    assert status == 201 and answer["referral"] == {"referrer_id": "alice", "referrer_points": 20, "coupon_id": "referral-1"}
    assert answer["position"] == await api.head()
    status, answer, _ = await api.purchase("bob", "p2", 25_800)
    assert "referral" not in answer
    status, alice, _ = await api.get("/v1/members/alice")
    assert (alice["referrals_rewarded"], alice["balance"]["pending"]) == (1, 20)
    status, bob, _ = await api.get("/v1/members/bob")
    assert bob["referred_by"] == "alice"
    status, wallet, _ = await api.get("/v1/members/bob/coupons")
    assert "referral-1" in [c["coupon_id"] for c in wallet["coupons"]]


async def test_a_batch_enrols_a_referee_and_runs_its_first_purchase_with_the_referrers_reward(api):
    await api.enrol("alice")
    lines = [
        {"op": "enrol", "body": {"member_id": "bob", "referred_by": "alice"}},
        {"op": "purchase", "member_id": "bob", "body": {"purchase_id": "p1", "store_id": "s1", "amount_cents": 9_000}},
        {"op": "purchase", "member_id": "bob", "body": {"purchase_id": "p2", "store_id": "s1", "amount_cents": 9_000}},
        {"op": "enrol", "body": {"member_id": "carol", "referred_by": "nobody"}},
    ]
    response = await api.client.post(
        "/v1/batch", data="\n".join(json.dumps(line) for line in lines).encode(),
        headers=api.headers("checkout", **{"Content-Type": "application/x-ndjson"}),
    )
    answers = [json.loads(line) for line in (await response.text()).splitlines()]
    assert [a["status"] for a in answers] == [201, 201, 201, 422]
    assert answers[1]["body"]["referral"]["referrer_points"] == 20 and "referral" not in answers[2]["body"]
    assert answers[3]["body"]["code"] == "referrer_not_found"
    state = await api.ledger.load("alice")
    assert list(state.referral_rewards) == ["bob"]

"""Growth tasks over HTTP (CONTRACT §6.3): the command, its refusals, its page, the batch op."""

from __future__ import annotations

import asyncio
from datetime import timedelta
import json

import pytest


pytestmark = pytest.mark.asyncio


async def record(api, member_id: str, activity_id: str, activity_type: str, **body):
    return await api.post(f"/v1/members/{member_id}/activities", {"activity_id": activity_id, "type": activity_type, **body})


async def test_an_activity_answers_points_growth_tier_and_position(api):
    await api.enrol("m1")
    status, answer, _ = await record(api, "m1", "t1", "profile_completed", ref="profile-v2")
    assert status == 201, answer
    assert (answer["points"], answer["growth"], answer["tier"]) == (20, 50, "regular")
    assert answer["position"] == await api.head()
    status, b, _ = await api.get("/v1/members/m1/balance")
    assert (b["available"], b["pending"], b["lifetime_earned"]) == (20, 0, 20)
    status, tier, _ = await api.get("/v1/members/m1/tier")
    assert tier["growth_window"] == 50


async def test_caps_unknown_types_and_reused_ids_append_nothing(api):
    await api.enrol("m1")
    assert (await record(api, "m1", "t1", "check_in"))[0] == 201
    head = await api.head()
    status, problem, _ = await record(api, "m1", "t2", "check_in")
    assert (status, problem["code"]) == (409, "activity_cap_reached")
    status, problem, _ = await record(api, "m1", "t3", "share")
    assert (status, problem["code"]) == (422, "unknown_activity")
    status, problem, _ = await record(api, "m1", "t1", "review")
    assert (status, problem["code"]) == (409, "duplicate_id")
    status, replayed, response = await record(api, "m1", "t1", "check_in")
    assert status == 201 and response.headers["Idempotent-Replayed"] == "true"
    status, problem, _ = await record(api, "ghost", "t1", "check_in")
    assert (status, problem["code"]) == (404, "member_not_found")
    status, problem, _ = await record(api, "m1", "bad id!", "check_in")
    assert (status, problem["code"]) == (422, "invalid_id")
    assert await api.head() == head


async def test_the_page_lists_activities_newest_last_with_their_points_and_growth(api):
    await api.enrol("m1")
    for n, kind in enumerate(["check_in", "review", "review", "profile_completed"]):
        assert (await record(api, "m1", f"t{n}", kind))[0] == 201
    await api.purchase("m1", "p1", 10_000)
    status, first, _ = await api.get("/v1/members/m1/activities", role="reader", limit=3)
    assert status == 200, first
    assert [(a["activity_id"], a["points"], a["growth"]) for a in first["activities"]] == [
        ("t0", 1, 10), ("t1", 5, 20), ("t2", 5, 20),
    ]
    status, rest, _ = await api.get("/v1/members/m1/activities", role="reader", after=first["next_after"])
    assert [a["activity_id"] for a in rest["activities"]] == ["t3"] and rest["next_after"] is None
    status, problem, _ = await api.get("/v1/members/ghost/activities", role="reader")
    assert (status, problem["code"]) == (404, "member_not_found")


async def test_a_batch_line_op_activity_runs_like_the_endpoint(api):
    await api.enrol("m1")
    lines = [
        {"op": "activity", "member_id": "m1", "body": {"activity_id": "t1", "type": "check_in"}},
        {"op": "activity", "member_id": "m1", "body": {"activity_id": "t2", "type": "check_in"}},
        {"op": "activity", "member_id": "m1", "body": {"activity_id": "t3", "type": "review"}},
    ]
    response = await api.client.post(
        "/v1/batch", data="\n".join(json.dumps(line) for line in lines).encode(),
        headers=api.headers("checkout", **{"Content-Type": "application/x-ndjson"}),
    )
    answers = [json.loads(line) for line in (await response.text()).splitlines()]
    assert [(a["status"], a["body"].get("points", a["body"].get("code"))) for a in answers] == [
        (201, 1), (409, "activity_cap_reached"), (201, 5),
    ]


async def test_parallel_check_ins_of_one_member_on_one_day_earn_once(api):
    await api.enrol("m1")
    results = await asyncio.gather(*(record(api, "m1", f"t{n}", "check_in") for n in range(10)))
    assert sorted(status for status, _, _ in results) == [201] + [409] * 9
    status, b, _ = await api.get("/v1/members/m1/balance")
    assert b["lifetime_earned"] == 1


async def test_the_activity_table_is_a_programme_setting_versioned_by_date(api):
    """A table changed by PUT /v1/programme applies from its effective_from; a late activity uses its day's table."""
    await api.enrol("m1")
    table = [{"type": "live_event", "points": 30, "growth": 1600, "daily_cap": 2, "total_cap": 3}]
    bad = {"settings": {"activities": [{"type": "Live!", "points": 1, "growth": 1, "daily_cap": 0, "total_cap": 0}]}}
    response = await api.client.put("/v1/programme", json=bad, headers=api.headers("admin"))
    problem = await response.json()
    assert (response.status, problem["code"], problem["setting"]) == (422, "invalid_programme", "activities")
    effective_from = api.clock() + timedelta(hours=1)
    body = {"settings": {"activities": table}, "effective_from": effective_from.isoformat()}
    response = await api.client.put("/v1/programme", json=body, headers=api.headers("admin"))
    assert response.status == 201, await response.text()
    status, problem, _ = await record(api, "m1", "t1", "live_event")
    assert (status, problem["code"]) == (422, "unknown_activity")  # not yet in force
    api.clock.advance(hours=2)
    status, answer, _ = await record(api, "m1", "t2", "live_event")
    assert (status, answer["points"], answer["growth"]) == (201, 30, 1600)
    late = (effective_from - timedelta(minutes=30)).isoformat()
    status, answer, _ = await record(api, "m1", "t3", "check_in", occurred_at=late)
    assert (status, answer["points"]) == (201, 1)  # dated before the change: the old table

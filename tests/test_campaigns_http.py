"""The programme and campaign routes (CONTRACT §6.1, §6.2) through the real HTTP application."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import pytest

from events.codec import rfc3339
from service import start_projectors
from tests.support import TUESDAY, running_api

pytestmark = pytest.mark.asyncio

DAY = timedelta(days=1)


@pytest.fixture
async def api(pool, database_url):
    async with running_api(pool) as api:
        await api.enrol("m1")
        runtime = await start_projectors(api.app, lambda: asyncpg.connect(database_url))
        yield api
        await runtime.stop()


def campaign_body(campaign_id: str, **fields) -> dict:
    return {
        "campaign_id": campaign_id, "name": "Double points weekend", "starts_at": rfc3339(TUESDAY),
        "ends_at": rfc3339(TUESDAY + 10 * DAY), "reward": {"kind": "multiplier", "multiplier_pct": 200}, **fields,
    }


async def test_programme_versions_are_put_read_as_of_and_listed(api):
    status, first, _ = await api.get("/v1/programme", role="reader")
    assert status == 200 and first["version"] == 1 and first["effective_from"] is None
    assert first["settings"]["member_day"] == {"weekday": "friday", "multiplier_pct": 200}
    tomorrow = rfc3339(TUESDAY + DAY)
    status, put, _ = await api.client.put(
        "/v1/programme", json={"settings": {"earn_cents_per_point": 500}, "effective_from": tomorrow},
        headers=api.headers("admin"),
    ), None, None
    answer = await status.json()
    assert status.status == 201, answer
    assert (answer["version"], answer["effective_from"], answer["settings"]["earn_cents_per_point"]) == (
        2, tomorrow, 500)
    assert answer["position"] == await api.head()
    status, now, _ = await api.get("/v1/programme", role="reader")
    assert now["version"] == 1
    status, later, _ = await api.get("/v1/programme", role="reader", as_of=rfc3339(TUESDAY + 2 * DAY),
                                     min_position=str(answer["position"]))
    assert later["version"] == 2 and later["settings"]["earn_cents_per_point"] == 500
    status, listed, _ = await api.get("/v1/programme/versions", role="reader")
    assert [(v["version"], v["actor"]) for v in listed["versions"]] == [(1, None), (2, "test-admin")]


async def test_programme_refusals_name_the_setting_and_append_nothing(api):
    head = await api.head()
    for body, code, field in [
        ({"settings": {"pending_days": -1}}, "invalid_programme", "pending_days"),
        ({"settings": {"colour": "red"}}, "invalid_programme", "colour"),
        ({"settings": {}, "effective_from": rfc3339(TUESDAY - DAY)}, "effective_from_in_past", "effective_from"),
    ]:
        response = await api.client.put("/v1/programme", json=body, headers=api.headers("admin"))
        answer = await response.json()
        assert (response.status, answer["code"], answer["field"]) == (422, code, field), answer
        assert response.content_type == "application/problem+json"
    assert await api.head() == head


async def test_a_campaign_is_created_read_listed_and_ended(api):
    status, created, _ = await api.post("/v1/campaigns", campaign_body("dbl"), role="admin", **{"Idempotency-Key": "c1"})
    assert status == 201, created
    assert created["status"] == "active" and created["awarded_points"] == 0 and created["members_rewarded"] == 0
    assert created["per_member_period"] == "campaign" and created["conditions"] == {}
    status, again, response = await api.post("/v1/campaigns", campaign_body("dbl"), role="admin",
                                             **{"Idempotency-Key": "c1"})
    assert (status, again, response.headers["Idempotent-Replayed"]) == (201, created, "true")
    status, bought, _ = await api.purchase("m1", "p1", 258_00)
    assert (bought["points"], bought["base_points"]) == (50, 25)
    assert bought["rewards"] == [{"campaign_id": "dbl", "points": 25, "coupon_id": None}]
    status, read, _ = await api.get("/v1/campaigns/dbl", role="reader", min_position=str(bought["position"]))
    assert status == 200 and (read["awarded_points"], read["members_rewarded"]) == (25, 1)
    status, lines, _ = await api.get("/v1/members/m1/ledger", role="reader", min_position=str(bought["position"]))
    assert [(line["kind"], line["points"], line["bucket_id"]) for line in lines["lines"]] == [
        ("earn", 25, "p:p1"), ("campaign", 25, "c:dbl:p1")]
    status, later, _ = await api.post("/v1/campaigns", campaign_body("later", starts_at=rfc3339(TUESDAY + 3 * DAY)),
                                      role="admin")
    status, page, _ = await api.get("/v1/campaigns", role="reader", limit="1", min_position=str(later["position"]))
    assert [c["campaign_id"] for c in page["campaigns"]] == ["dbl"] and page["next_after"] == "dbl"
    status, page, _ = await api.get("/v1/campaigns", role="reader", after="dbl")
    assert [c["campaign_id"] for c in page["campaigns"]] == ["later"] and page["next_after"] is None
    status, scheduled, _ = await api.get("/v1/campaigns", role="reader", status="scheduled")
    assert [c["campaign_id"] for c in scheduled["campaigns"]] == ["later"]
    status, ended, _ = await api.post("/v1/campaigns/dbl/end", {"reason": "budget review"}, role="admin")
    assert status == 201, ended
    assert ended["status"] == "ended" and ended["ended_at"] == rfc3339(TUESDAY) and ended["members_rewarded"] == 1
    status, again, _ = await api.post("/v1/campaigns/dbl/end", {"reason": "again"}, role="admin")
    assert (status, again["code"]) == (409, "campaign_ended")


async def test_campaign_refusals_have_the_contract_s_codes_and_append_nothing(api):
    await api.post("/v1/campaigns", campaign_body("taken"), role="admin")
    head = await api.head()
    cases = [
        (campaign_body("taken", name="other"), 409, "campaign_exists"),
        (campaign_body("x" * 33), 422, "invalid_id"),
        (campaign_body("bad id"), 422, "invalid_id"),
        (campaign_body("x", reward={"kind": "multiplier", "multiplier_pct": 100}), 422, "invalid_campaign"),
        (campaign_body("x", reward={"kind": "bonus", "points": 0}), 422, "invalid_campaign"),
        (campaign_body("x", conditions={"weekdays": ["caturday"]}), 422, "invalid_campaign"),
        (campaign_body("x", ends_at=rfc3339(TUESDAY)), 422, "invalid_window"),
        (campaign_body("x", starts_at=rfc3339(TUESDAY - DAY)), 422, "starts_at_in_past"),
    ]
    for body, status, code in cases:
        got, answer, _ = await api.post("/v1/campaigns", body, role="admin")
        assert (got, answer["code"]) == (status, code), (body, answer)
        if body["campaign_id"] == "x" * 33:
            assert "1-32 characters" in answer["detail"], answer  # a campaign's bound, not other ids' 64
    for path, status, code in [("/v1/campaigns/nope/end", 404, "campaign_not_found"),
                               (f"/v1/campaigns/{'y' * 33}/end", 422, "invalid_id")]:
        got, answer, _ = await api.post(path, {"reason": "r"}, role="admin")
        assert (got, answer["code"]) == (status, code), answer
    assert await api.head() == head
    status, answer, _ = await api.get("/v1/campaigns/nope", role="reader")
    assert (status, answer["code"]) == (404, "campaign_not_found")
    status, answer, _ = await api.get("/v1/campaigns", role="reader", status="paused")
    assert status == 422

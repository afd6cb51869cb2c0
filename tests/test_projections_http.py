"""Projection-served reads over HTTP (CONTRACT §4): read-your-writes with min_position, operations.

The application is ``create_app`` on a real database with the projectors
started as ``loyalty serve`` starts them (``start_projectors``).
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from api import projected
from service import start_projectors

pytestmark = pytest.mark.asyncio

SATURDAY_EARLIER = "2024-12-21T02:00:00Z"  # not a member day; past the pending days, so available


@pytest.fixture
async def projectors(api, database_url):
    runtime = await start_projectors(api.app, lambda: asyncpg.connect(database_url))
    yield runtime
    await runtime.stop()


async def bought(api, member_id: str, purchase_id: str, amount_cents: int, **body) -> int:
    status, answer, _ = await api.purchase(member_id, purchase_id, amount_cents, **body)
    assert status == 201, answer
    return answer["position"]


async def test_a_write_is_in_the_ledger_read_with_its_min_position(api, projectors):
    await api.enrol("m1")
    position = await bought(api, "m1", "p1", 258_00, occurred_at=SATURDAY_EARLIER)
    status, page, _ = await api.get("/v1/members/m1/ledger", role="reader", min_position=position)
    assert status == 200, page
    assert [(l["kind"], l["points"], l["bucket_id"], l["ref"], l["running_balance"]) for l in page["lines"]] == [
        ("earn", 25, "p:p1", "p1", 25)
    ]
    assert page["next_after"] is None

    status, redeemed, _ = await api.post("/v1/members/m1/redemptions", {"redemption_id": "r1", "points": 10})
    assert status == 201
    status, page, _ = await api.get("/v1/members/m1/ledger", role="reader", min_position=redeemed["position"])
    assert [(l["kind"], l["points"], l["running_balance"]) for l in page["lines"]][-1] == ("redeem", -10, 15)


async def test_a_lagging_projection_answers_503_projection_lagging_with_retry_after(api, monkeypatch):
    monkeypatch.setattr(projected, "MIN_POSITION_WAIT_MS", 200)  # no projector runs here
    await api.enrol("m1")
    position = await bought(api, "m1", "p1", 258_00)
    for path in ("/v1/members/m1/ledger", "/v1/programme/liability", "/v1/segments/active"):
        started = time.monotonic()
        status, problem, response = await api.get(path, role="reader", min_position=position)
        assert status == 503 and problem["code"] == "projection_lagging", problem
        assert response.content_type == "application/problem+json"
        assert response.headers["Retry-After"] == "1"
        assert time.monotonic() - started < 2  # bounded
    status, page, _ = await api.get("/v1/members/m1/ledger", role="reader")
    assert status == 200 and page["lines"] == []  # without min_position: what the projection has


async def test_the_ledger_pages_by_line_and_knows_no_unknown_member(api, projectors):
    await api.enrol("m1")
    for n in range(3):
        position = await bought(api, "m1", f"p{n}", 100_00, occurred_at=SATURDAY_EARLIER)
    status, first, _ = await api.get("/v1/members/m1/ledger", limit=2, min_position=position)
    assert status == 200 and [l["ref"] for l in first["lines"]] == ["p0", "p1"] and first["next_after"] == 2
    status, rest, _ = await api.get("/v1/members/m1/ledger", limit=2, after=first["next_after"])
    assert [l["ref"] for l in rest["lines"]] == ["p2"] and rest["next_after"] is None
    status, problem, _ = await api.get("/v1/members/nobody/ledger")
    assert status == 404 and problem["code"] == "member_not_found"


async def test_liability_is_served_as_of_a_time_by_month(api, projectors):
    await api.enrol("m1")
    position = await bought(api, "m1", "p1", 300_00, occurred_at=SATURDAY_EARLIER)
    status, body, _ = await api.get("/v1/programme/liability", role="reader", min_position=position)
    assert status == 200, body
    assert (body["earned"], body["outstanding"], body["debt"]) == (30, 30, 0)
    assert body["by_month"] == [
        {"month": "2024-12", "earned": 30, "clawed": 0, "adjusted": 0, "redeemed": 0, "expired": 0, "outstanding": 30}
    ]
    status, before, _ = await api.get("/v1/programme/liability", as_of="2024-12-20T00:00:00Z")
    assert before["earned"] == 0 and before["by_month"] == [] and before["as_of"] == "2024-12-20T00:00:00Z"


async def test_segments_list_members_of_a_lifecycle_paged_by_member_id(api, projectors):
    for member_id in ("a", "b", "c"):
        await api.enrol(member_id)
    position = await bought(api, "b", "p1", 100_00)
    status, page, _ = await api.get("/v1/segments/prospect", role="reader", limit=1, min_position=position)
    assert status == 200 and [m["member_id"] for m in page["members"]] == ["a"] and page["next_after"] == "a"
    status, page, _ = await api.get("/v1/segments/prospect", limit=1, after="a")
    assert [m["member_id"] for m in page["members"]] == ["c"] and page["next_after"] is None
    status, page, _ = await api.get("/v1/segments/active")
    assert page["members"] == [{
        "member_id": "b", "tier": "regular", "last_purchase_at": "2025-01-07T02:00:00Z", "lifecycle": "active",
        "recency_days": 0, "orders_365d": 1, "spend_365d_cents": 100_00,
    }]
    status, problem, _ = await api.get("/v1/segments/vip")
    assert status == 404 and problem["code"] == "segment_not_found"


async def test_projections_are_listed_with_lag_and_rebuilt_by_admins_only(api, projectors):
    await api.enrol("m1")
    head = await api.head()
    deadline = time.monotonic() + 10
    while True:
        status, body, _ = await api.get("/v1/projections", role="reader")
        assert status == 200
        if all(p["position"] == head for p in body["projections"]) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert [p["name"] for p in body["projections"]] == ["members", "points", "coupons", "liability", "campaigns"]
    assert all(p == {"name": p["name"], "position": head, "head": head, "lag_events": 0, "lag_seconds": 0.0,
                     "state": "live"} for p in body["projections"])

    status, problem, _ = await api.post("/v1/projections/points/rebuild", role="reader")
    assert status == 403
    status, problem, _ = await api.post("/v1/projections/nothing/rebuild", role="admin")
    assert status == 404 and problem["code"] == "projection_not_found"
    status, accepted, _ = await api.post("/v1/projections/points/rebuild", role="admin")
    assert status == 202 and accepted == {"name": "points", "state": "rebuilding"}
    while True:
        status, body, _ = await api.get("/v1/projections")
        points = next(p for p in body["projections"] if p["name"] == "points")
        if points["state"] == "live":
            break
        assert points["state"] == "rebuilding" and time.monotonic() < deadline
        await asyncio.sleep(0.02)

    response = await api.client.get("/metrics")
    text = await response.text()
    assert 'loyalty_projection_lag_events{projection="points"} 0.0' in text
    assert "loyalty_projection_rebuild_progress_ratio" in text


async def test_the_openapi_document_lists_the_projection_reads_with_min_position(api):
    response = await api.client.get("/openapi.json")
    paths = (await response.json())["paths"]
    for path in ("/v1/members/{member_id}/ledger", "/v1/programme/liability", "/v1/segments/{lifecycle}"):
        assert "min_position" in [p["name"] for p in paths[path]["get"]["parameters"]]
    assert "/v1/projections" in paths

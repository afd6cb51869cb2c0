"""The HTTP contract (CONTRACT §4) over a real database: auth, problems, idempotency, earning."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from tests.support import TUESDAY

pytestmark = pytest.mark.asyncio


def assert_problem(status: int, body: dict, response, expected_status: int, code: str) -> None:
    assert status == expected_status, body
    assert response.content_type == "application/problem+json"
    assert {"type", "title", "status", "detail", "code"} <= body.keys()
    assert body["status"] == expected_status and body["code"] == code


ROUTES_BY_ROLE = [
    # method, path, roles allowed
    ("POST", "/v1/members/m1/purchases", {"checkout", "admin"}),
    ("POST", "/v1/members/m1/adjustments", {"admin"}),
    ("GET", "/v1/members/m1", {"checkout", "reader", "auditor", "admin"}),
    ("GET", "/v1/members/m1/balance", {"reader", "auditor", "admin"}),
    ("GET", "/v1/members/m1/events", {"auditor", "admin"}),
    ("GET", "/v1/events", {"auditor", "admin"}),
    ("GET", "/v1/audit/verify", {"auditor", "admin"}),
    ("POST", "/v1/api-keys", {"admin"}),
    ("POST", "/v1/jobs/expire", {"admin"}),
]


@pytest.mark.parametrize("method,path,allowed", ROUTES_BY_ROLE)
async def test_every_route_refuses_missing_keys_and_wrong_roles(api, method, path, allowed):
    response = await api.client.request(method, path, json={})
    assert_problem(response.status, await response.json(content_type=None), response, 401, "unauthorized")
    response = await api.client.request(method, path, json={}, headers={"Authorization": "Bearer nope"})
    assert response.status == 401
    for role in ("checkout", "reader", "auditor", "admin"):
        response = await api.client.request(method, path, json={}, headers=api.headers(role))
        if role in allowed:
            assert response.status not in (401, 403), (role, await response.text())
        else:
            assert_problem(response.status, await response.json(content_type=None), response, 403, "forbidden")


async def test_earn_examples_of_the_contract(api):
    await api.enrol("m1")
    status, answer, _ = await api.purchase("m1", "p1", 25800)
    assert status == 201 and answer["points"] == 25 and answer["growth"] == 258 and answer["tier"] == "regular"
    # 3000 growth makes the member silver; the next Friday purchase earns x120 x200.
    status, answer, _ = await api.purchase("m1", "p2", 300000)
    assert answer["tier"] == "silver"
    friday = TUESDAY + timedelta(days=3)
    api.clock.set(friday)
    status, answer, _ = await api.purchase("m1", "p3", 25800)
    assert status == 201 and answer["points"] == 61


async def test_member_day_is_decided_in_the_programme_timezone(api):
    await api.enrol("m1")
    thursday_17_utc = datetime(2025, 1, 9, 17, 0, tzinfo=timezone.utc)  # Friday 01:00 in Shanghai
    api.clock.set(thursday_17_utc)
    _, answer, _ = await api.purchase("m1", "p1", 10000)
    assert answer["points"] == 20
    friday_17_utc = thursday_17_utc + timedelta(days=1)  # Saturday 01:00 in Shanghai
    api.clock.set(friday_17_utc)
    _, answer, _ = await api.purchase("m1", "p2", 10000)
    assert answer["points"] == 10


async def test_idempotent_replay_returns_the_first_answer(api):
    await api.enrol("m1")
    body = {"purchase_id": "p1", "store_id": "s1", "amount_cents": 25800}
    first = await api.post("/v1/members/m1/purchases", body, **{"Idempotency-Key": "k1"})
    head = await api.head()
    again = await api.post("/v1/members/m1/purchases", body, **{"Idempotency-Key": "k1"})
    assert first[0] == again[0] == 201 and first[1] == again[1]
    assert again[2].headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first[2].headers
    assert await api.head() == head


async def test_a_refusal_is_replayed_too(api):
    await api.enrol("m1")
    body = {"redemption_id": "r1", "points": 5}
    first = await api.post("/v1/members/m1/redemptions", body, **{"Idempotency-Key": "k2"})
    await api.purchase("m1", "p1", 1_000_000, occurred_at="2025-01-01T00:00:00Z")
    again = await api.post("/v1/members/m1/redemptions", body, **{"Idempotency-Key": "k2"})
    assert first[0] == again[0] == 409 and first[1] == again[1]
    assert again[2].headers["Idempotent-Replayed"] == "true"


@pytest.mark.parametrize("refused_body, status", [
    (b'{"purchase_id": "p1", "store_id": "s1", "amount_cents": 100, "foo": 1}', 422),  # an unknown field
    (b'{"purchase_id": "p1", "store_id": "s1", "amount_cents": ', 400),  # not JSON
])
async def test_a_body_refused_before_any_decision_is_its_keys_first_answer_too(api, refused_body, status):
    await api.enrol("m1")
    head = await api.head()

    async def post(body: bytes, **query: str):
        headers = {**api.headers("checkout"), "Idempotency-Key": "k3", "Content-Type": "application/json"}
        response = await api.client.post("/v1/members/m1/purchases", data=body, headers=headers, params=query)
        return response.status, await response.json(content_type=None), response

    dry = await post(refused_body, dry_run="true")  # a dry run stores nothing
    first = await post(refused_body)
    again = await post(refused_body)
    assert dry[:2] == first[:2] and first[0] == again[0] == status and first[1] == again[1]
    assert "Idempotent-Replayed" not in first[2].headers and again[2].headers["Idempotent-Replayed"] == "true"
    assert again[2].content_type == "application/problem+json"
    corrected = await post(b'{"purchase_id": "p1", "store_id": "s1", "amount_cents": 100}')
    assert (corrected[0], corrected[1]["code"]) == (422, "idempotency_key_reused"), corrected[1]
    assert await api.head() == head


async def test_idempotency_key_reused_with_another_body_is_refused(api):
    await api.enrol("m1")
    await api.post("/v1/members/m1/purchases", {"purchase_id": "p1", "store_id": "s1", "amount_cents": 100},
                   **{"Idempotency-Key": "k1"})
    head = await api.head()
    status, body, response = await api.post(
        "/v1/members/m1/purchases", {"purchase_id": "p2", "store_id": "s1", "amount_cents": 100}, **{"Idempotency-Key": "k1"}
    )
    assert_problem(status, body, response, 422, "idempotency_key_reused")
    assert await api.head() == head


async def test_duplicate_purchase_id_replays_or_conflicts(api):
    await api.enrol("m1")
    first = await api.purchase("m1", "p1", 25800)
    head = await api.head()
    same = await api.purchase("m1", "p1", 25800)
    assert same[0] == 201 and same[1] == first[1] and same[2].headers["Idempotent-Replayed"] == "true"
    status, body, response = await api.purchase("m1", "p1", 99999)
    assert_problem(status, body, response, 409, "duplicate_id")
    assert await api.head() == head


async def test_if_match_on_a_stale_version_is_412(api):
    enrolled = await api.enrol("m1")
    version = enrolled["stream_version"]
    status, _, _ = await api.post(
        "/v1/members/m1/purchases", {"purchase_id": "p1", "store_id": "s", "amount_cents": 100}, **{"If-Match": str(version)}
    )
    assert status == 201
    head = await api.head()
    status, body, response = await api.post(
        "/v1/members/m1/purchases", {"purchase_id": "p2", "store_id": "s", "amount_cents": 100}, **{"If-Match": str(version)}
    )
    assert_problem(status, body, response, 412, "version_mismatch")
    assert await api.head() == head


@pytest.mark.parametrize(
    "body,status,code,field",
    [
        ({"purchase_id": "p1", "store_id": "s", "amount_cents": 0}, 422, "validation_failed", "amount_cents"),
        ({"purchase_id": "p1", "store_id": "s", "amount_cents": -5}, 422, "validation_failed", "amount_cents"),
        ({"purchase_id": "p1", "store_id": "s", "amount_cents": "5"}, 422, "validation_failed", "amount_cents"),
        ({"purchase_id": "p1", "store_id": "s", "amount_cents": 10**11 + 1}, 422, "validation_failed", "amount_cents"),
        ({"purchase_id": "p1", "store_id": "s", "amount_cents": 5, "bonus": 1}, 422, "validation_failed", "bonus"),
        ({"purchase_id": "p 1", "store_id": "s", "amount_cents": 5}, 422, "invalid_id", "purchase_id"),
        ({"purchase_id": "x" * 65, "store_id": "s", "amount_cents": 5}, 422, "invalid_id", "purchase_id"),
        ({"store_id": "s", "amount_cents": 5}, 422, "validation_failed", None),
    ],
)
async def test_bad_input_is_refused_with_the_field_and_appends_nothing(api, body, status, code, field):
    await api.enrol("m1")
    head = await api.head()
    got_status, got, response = await api.post("/v1/members/m1/purchases", body)
    assert_problem(got_status, got, response, status, code)
    if field:
        assert field in (got.get("field") or "") or field in got["detail"]
    assert await api.head() == head


async def test_malformed_json_wrong_media_type_and_oversized_bodies_are_problems(api):
    await api.enrol("m1")
    head = await api.head()
    url = "/v1/members/m1/purchases"
    response = await api.client.post(url, data=b"{nope", headers=api.headers("checkout", **{"Content-Type": "application/json"}))
    assert_problem(response.status, await response.json(content_type=None), response, 400, "malformed_json")
    response = await api.client.post(url, data=b"{}", headers=api.headers("checkout", **{"Content-Type": "text/plain"}))
    assert_problem(response.status, await response.json(content_type=None), response, 415, "unsupported_media_type")
    big = b'{"purchase_id": "' + b"x" * 70_000 + b'"}'
    response = await api.client.post(url, data=big, headers=api.headers("checkout", **{"Content-Type": "application/json"}))
    assert_problem(response.status, await response.json(content_type=None), response, 413, "body_too_large")
    response = await api.client.post(
        url, data=b'{"purchase_id":"p1","store_id":"s","amount_cents":5}',
        headers=api.headers("checkout", **{"Content-Type": "application/json; charset=utf-8"}),
    )
    assert response.status == 201
    assert await api.head() == head + 2


async def test_unknown_routes_and_methods_are_problems(api):
    response = await api.client.get("/v1/nope")
    assert_problem(response.status, await response.json(content_type=None), response, 404, "not_found")
    response = await api.client.delete("/v1/members")
    assert_problem(response.status, await response.json(content_type=None), response, 405, "method_not_allowed")


async def test_unknown_member_is_404_and_identities_find_members(api):
    status, body, response = await api.purchase("ghost", "p1", 100)
    assert_problem(status, body, response, 404, "member_not_found")
    await api.enrol("m1", identities=[{"type": "phone", "value": "+8613800000000"}])
    status, body, _ = await api.get("/v1/identities/phone/+8613800000000", role="checkout")
    assert status == 200 and body == {"member_id": "m1"}
    status, body, response = await api.post("/v1/members", {"member_id": "m2", "identities": [{"type": "phone", "value": "+8613800000000"}]})
    assert_problem(status, body, response, 409, "identity_taken")


async def test_feed_member_stream_and_verify(api):
    await api.enrol("m1")
    await api.purchase("m1", "p1", 25800)
    status, feed, _ = await api.get("/v1/events", role="auditor", limit=3)
    assert status == 200 and [e["position"] for e in feed["events"]] == [1, 2, 3] and feed["next_after"] == 3
    envelope = feed["events"][0]
    assert {"position", "stream_id", "stream_version", "type", "schema_version", "occurred_at", "recorded_at",
            "command_id", "actor", "programme_version", "data", "hash"} <= envelope.keys()
    status, stream, _ = await api.get("/v1/members/m1/events", role="auditor")
    assert [e["stream_version"] for e in stream["events"]] == list(range(1, len(stream["events"]) + 1))
    assert stream["next_after"] is None
    status, report, _ = await api.get("/v1/audit/verify", role="auditor")
    assert report["ok"] is True and report["checked"] == await api.head() and report["first_bad_position"] is None


async def test_api_keys_are_created_once_and_work(api):
    status, created, _ = await api.post("/v1/api-keys", {"name": "till-042", "role": "checkout"}, role="admin")
    assert status == 201 and created["key"].startswith("lk_") and created["role"] == "checkout"
    response = await api.client.post(
        "/v1/members", json={"member_id": "m9"}, headers={"Authorization": f"Bearer {created['key']}"}
    )
    assert response.status == 201
    row = await api.ledger.store.pool.fetchrow("SELECT key_hash FROM api_keys WHERE key_id = $1", created["key_id"])
    assert created["key"] not in row["key_hash"]


async def test_health_readiness_metrics_and_openapi(api):
    assert (await api.client.get("/healthz")).status == 200
    assert (await api.client.get("/readyz")).status == 200
    metrics = await (await api.client.get("/metrics")).text()
    assert "loyalty_http_requests_total" in metrics
    await api.enrol("m-cached")  # the member cache's gauges count what a command just cached
    metrics = await (await api.client.get("/metrics")).text()
    cached = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("loyalty_member_cache_")}
    assert cached["loyalty_member_cache_members"] >= 1 and cached["loyalty_member_cache_events"] >= 1
    document = await (await api.client.get("/openapi.json")).json()
    assert "/v1/members/{member_id}/purchases" in document["paths"]
    schema = document["components"]["schemas"]["RecordPurchase"]
    assert schema["properties"]["amount_cents"]["exclusiveMinimum"] == 0


async def test_a_time_job_with_an_idempotency_key_answers_its_first_run_again(api):
    """A job's retry without as_of would run at a later now: with the key it gets the first run's answer."""
    await api.enrol("m1")
    await api.purchase("m1", "p1", 10_000)
    api.clock.advance(days=400)  # p1's points have expired
    first = await api.post("/v1/jobs/expire", role="admin", **{"Idempotency-Key": "job-1"})
    assert first[0] == 200 and first[1]["appended"] > 0, first[1]  # p1's bucket and the welcome coupons
    api.clock.advance(days=1)
    again = await api.post("/v1/jobs/expire", role="admin", **{"Idempotency-Key": "job-1"})
    assert again[:2] == first[:2] and again[2].headers["Idempotent-Replayed"] == "true"
    other = await api.post("/v1/jobs/expire?as_of=2025-01-01T00:00:00Z", role="admin", **{"Idempotency-Key": "job-1"})
    assert (other[0], other[1]["code"]) == (422, "idempotency_key_reused"), other[1]

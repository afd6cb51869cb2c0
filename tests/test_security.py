"""Security: keys, roles, rate limits, the audit trail of admin actions, and SQL injection.

- API keys are high-entropy, stored only as SHA-256, compared in constant
  time, and never written to a log (in-process and in the real service's output).
- Every route of the application is in ROLE_TABLE with the roles that may
  call it; a route added without a decision here fails
  test_every_route_has_a_role_decision. Each route is then called with no key,
  a wrong key and each role's key.
- Per-key rate limits answer 429 problem+json with Retry-After and append nothing.
- Admin actions record who (events' actor, keys' created_by, the audit log)
  and why (the reason they require).
- Injection strings in every field are data, never SQL.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from datetime import timedelta

import aiohttp
import pytest

from api import auth
from api.app import create_app
from api.auth import KEYS
from events.codec import rfc3339
from ledger.programme import Programme
from ledger.settings import Settings
from tests.service_process import Client, ServiceProcess, create_key
from tests.support import TUESDAY, running_api

pytestmark = pytest.mark.asyncio

ROLES = ("checkout", "reader", "auditor", "admin")
PUBLIC = frozenset()
CHECKOUT = frozenset({"checkout", "admin"})
READ_ONE = frozenset({"checkout", "reader", "auditor", "admin"})
READ = frozenset({"reader", "auditor", "admin"})
AUDIT = frozenset({"auditor", "admin"})
ADMIN = frozenset({"admin"})

# Every route: who may call it (CONTRACT §4). PUBLIC needs no key at all.
ROLE_TABLE = {
    ("POST", "/v1/members"): CHECKOUT,
    ("POST", "/v1/members/{member_id}/purchases"): CHECKOUT,
    ("POST", "/v1/members/{member_id}/returns"): CHECKOUT,
    ("POST", "/v1/members/{member_id}/redemptions"): CHECKOUT,
    ("POST", "/v1/members/{member_id}/redemptions/{redemption_id}/reversal"): CHECKOUT,
    ("POST", "/v1/members/{member_id}/coupons"): CHECKOUT,  # checkout only with points_cost (tested below)
    ("POST", "/v1/members/{member_id}/coupons/{coupon_id}/redemption"): CHECKOUT,
    ("POST", "/v1/members/{member_id}/coupons/{coupon_id}/redemption/reversal"): CHECKOUT,
    ("POST", "/v1/members/{member_id}/coupons/{coupon_id}/void"): ADMIN,
    ("POST", "/v1/members/{member_id}/adjustments"): ADMIN,
    ("POST", "/v1/members/{member_id}/activities"): CHECKOUT,
    ("POST", "/v1/batch"): CHECKOUT,
    ("PUT", "/v1/programme"): ADMIN,
    ("GET", "/v1/programme"): READ,
    ("GET", "/v1/programme/versions"): READ,
    ("POST", "/v1/campaigns"): ADMIN,
    ("POST", "/v1/campaigns/{campaign_id}/end"): ADMIN,
    ("GET", "/v1/campaigns"): READ,
    ("GET", "/v1/campaigns/{campaign_id}"): READ,
    ("POST", "/v1/simulations"): ADMIN,
    ("GET", "/v1/members/{member_id}"): READ_ONE,
    ("GET", "/v1/members/{member_id}/balance"): READ,
    ("GET", "/v1/members/{member_id}/tier"): READ,
    ("GET", "/v1/members/{member_id}/coupons"): READ,
    ("GET", "/v1/members/{member_id}/ledger"): READ,
    ("GET", "/v1/members/{member_id}/activities"): READ,
    ("GET", "/v1/members/{member_id}/events"): AUDIT,
    ("GET", "/v1/identities/{type}/{value}"): READ_ONE,
    ("GET", "/v1/events"): AUDIT,
    ("GET", "/v1/audit/verify"): AUDIT,
    ("GET", "/v1/programme/liability"): READ,
    ("GET", "/v1/segments/{lifecycle}"): READ,
    ("GET", "/v1/projections"): READ,
    ("POST", "/v1/projections/{name}/rebuild"): ADMIN,
    ("POST", "/v1/api-keys"): ADMIN,
    ("POST", "/v1/jobs/{name}"): ADMIN,
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/v1/api-keys/me"): READ_ONE,  # every role: the console asks which role its key has
    ("GET", "/console"): PUBLIC,  # the console's page and files: no figure, the page calls the API with a key
    ("GET", "/console/{page}"): PUBLIC,
    ("GET", "/console/members/{member_id}"): PUBLIC,
    ("GET", "/console/assets/{name}"): PUBLIC,
}
PATH_VALUES = {"member_id": "m1", "redemption_id": "r1", "coupon_id": "c1", "type": "phone", "value": "138",
               "lifecycle": "active", "name": "members", "page": "liability", "campaign_id": "camp1"}


def application_routes() -> set[tuple[str, str]]:
    app = create_app(None, Programme(), settings=Settings(rate_limit_per_s=None))
    return {(route.method, route.resource.canonical) for route in app.router.routes() if route.method != "HEAD"}


def concrete(path: str, method: str) -> str:
    if path == "/v1/jobs/{name}":
        return "/v1/jobs/expire"
    if path == "/console/assets/{name}":
        return "/console/assets/app.js"
    return re.sub(r"{(\w+)}", lambda m: PATH_VALUES[m.group(1)], path)


async def test_every_route_has_a_role_decision():
    routes = application_routes()
    assert routes - ROLE_TABLE.keys() == set(), "a route without a role decision: add it to ROLE_TABLE"
    assert ROLE_TABLE.keys() - routes == set(), "ROLE_TABLE lists a route the application no longer has"


@pytest.fixture
async def api(pool):
    async with running_api(pool) as api:
        await api.enrol("m1")
        yield api


async def test_every_route_refuses_no_key_a_wrong_key_and_every_role_not_allowed(api):
    for (method, path), allowed in sorted(ROLE_TABLE.items()):
        url = concrete(path, method)
        where = f"{method} {path}"
        if not allowed:
            response = await api.client.request(method, url)
            assert response.status in (200, 503), (where, await response.text())
            continue
        for headers in ({}, {"Authorization": "Bearer lk_" + secrets.token_urlsafe(32)},
                        {"Authorization": "Basic " + api.keys["admin"]}):
            response = await api.client.request(method, url, json={}, headers=headers)
            body = await response.json(content_type=None)
            assert response.status == 401 and body["code"] == "unauthorized", (where, body)
            assert response.headers["WWW-Authenticate"] == "Bearer"
        for role in ROLES:
            response = await api.client.request(method, url, json={}, headers=api.headers(role))
            body = await response.json(content_type=None)
            if role in allowed:
                assert response.status not in (401, 403), (where, role, body)
            else:
                assert response.status == 403 and body["code"] == "forbidden", (where, role, body)


async def test_checkout_issues_coupons_only_by_paying_points_and_runs_no_admin_op_in_a_batch(api):
    coupon = {"coupon_id": "c9", "template": "T", "value_cents": 100, "expires_at": rfc3339(TUESDAY + timedelta(days=9))}
    status, body, _ = await api.post("/v1/members/m1/coupons", coupon, role="checkout")
    assert status == 403 and body["code"] == "forbidden", body
    line = '{"op": "adjustment", "member_id": "m1", "body": {"adjustment_id": "a1", "points": 99, "reason": "x"}}\n'
    response = await api.client.post("/v1/batch", data=line,
                                     headers=api.headers("checkout", **{"Content-Type": "application/x-ndjson"}))
    assert (await response.text()).startswith('{"line":1,"status":403,')
    status, events, _ = await api.get("/v1/members/m1/events", role="auditor")
    assert not [e for e in events["events"] if e["type"] in ("coupon_issued", "points_adjusted")
                and e["data"].get("source") != "welcome"]


# -- keys ---------------------------------------------------------------------------------------


async def test_keys_are_high_entropy_stored_as_sha256_only_and_compared_in_constant_time(api, pool, monkeypatch):
    created = []
    for n in range(20):
        status, body, _ = await api.post("/v1/api-keys", {"name": f"till-{n}", "role": "checkout"}, role="admin")
        assert status == 201, body
        created.append(body["key"])
    assert len(set(created)) == len(created)
    for key in created:
        assert key.startswith("lk_") and re.fullmatch(r"lk_[A-Za-z0-9_-]{43}", key), key  # 32 random bytes: 256 bits
    rows = await pool.fetch("SELECT * FROM api_keys")
    stored = {row["key_hash"].strip() for row in rows}
    for key in created:
        assert hashlib.sha256(key.encode()).hexdigest() in stored
        for row in rows:
            assert all(key not in str(value) for value in row.values()), "a key secret is stored in clear"

    compared = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    fresh = auth.KeyRing(pool, Settings(), api.clock)  # no cache: the lookup runs
    principal = await fresh.authenticate(created[0])
    assert principal is not None and principal.role == "checkout"
    assert compared, "the key hash was not compared with hmac.compare_digest"


async def test_key_secrets_never_reach_the_log(api, caplog):
    caplog.set_level(logging.DEBUG)
    status, body, _ = await api.post("/v1/api-keys", {"name": "till-log", "role": "checkout"}, role="admin")
    secret = body["key"]
    await api.client.get("/v1/members/m1", headers={"Authorization": f"Bearer {secret}"})
    await api.client.get("/v1/members/m1", headers={"Authorization": f"Bearer {secret}x"})  # a wrong key
    await api.client.get("/v1/members/m1", headers={"Authorization": f"Bearer {secret}"})
    await api.app[KEYS].create("cli-key", "reader", "command line")
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "till-log" in logged  # the creation is logged...
    for known in (secret, *api.keys.values()):
        assert known not in logged  # ...its secret never


async def test_the_real_service_logs_no_key_secret(database_url):
    async with ServiceProcess(database_url, env={"LOYALTY_LOG_LEVEL": "DEBUG"}) as live, \
            aiohttp.ClientSession() as session:
        secret = await create_key(session, live, "checkout", "till-live")
        client = Client(session, live.url, secret)
        status, body, _ = await client.post("/v1/members", {"member_id": "m1"})
        assert status == 201, body
        status, body, _ = await Client(session, live.url, secret + "x").post("/v1/members", {"member_id": "m2"})
        assert status == 401 and secret not in str(body)
        output = live.output()
        assert "till-live" in output
        assert secret not in output and live.admin_key not in output


# -- rate limits ---------------------------------------------------------------------------------


async def test_rate_limits_answer_429_with_retry_after_per_key_and_append_nothing(pool):
    settings = Settings(rate_limit_per_s=1.0, rate_burst=3.0)
    async with running_api(pool, settings=settings) as api:
        await api.app[KEYS].create("x", "admin", "tests")  # creation itself is not rate limited
        head = await api.head()  # the programme's version 1, appended at start
        answers = []
        for n in range(6):
            answers.append(await api.purchase("m-none", f"p{n}", 1000))
        statuses = [status for status, _, _ in answers]
        assert statuses[:3] == [404, 404, 404] and statuses[3:] == [429, 429, 429], statuses
        status, body, response = answers[-1]
        assert body["code"] == "rate_limited" and response.content_type == "application/problem+json"
        assert int(response.headers["Retry-After"]) >= 1
        # Another key has its own budget.
        status, _, _ = await api.get("/v1/members/m-none", role="reader")
        assert status == 404
        assert await api.head() == head


# -- who and why ---------------------------------------------------------------------------------


async def test_admin_actions_record_who_and_why(api, pool, caplog):
    caplog.set_level(logging.INFO, logger="loyalty.audit")
    admin_name = "test-admin"
    status, body, _ = await api.post("/v1/members/m1/adjustments", {"adjustment_id": "a1", "points": 50}, role="admin")
    assert status == 422, "an adjustment needs a reason"
    status, body, _ = await api.post("/v1/members/m1/adjustments",
                                     {"adjustment_id": "a1", "points": 50, "reason": "goodwill", "note": "ticket 42"},
                                     role="admin")
    assert status == 201, body
    status, body, _ = await api.post("/v1/members/m1/coupons/welcome-1/void", {}, role="admin")
    assert status == 422, "a void needs a reason"
    status, body, _ = await api.post("/v1/members/m1/coupons/welcome-1/void", {"reason": "fraud"}, role="admin")
    assert status == 201, body
    status, body, _ = await api.post("/v1/api-keys", {"name": "till-7", "role": "checkout"}, role="admin")
    assert status == 201
    api.clock.advance(days=400)
    status, body, _ = await api.post("/v1/jobs/expire", role="admin")
    assert status == 200 and body["appended"] >= 1, body
    status, body, _ = await api.post("/v1/projections/members/rebuild", role="admin")
    assert status in (200, 202), body

    status, page, _ = await api.get("/v1/members/m1/events", role="auditor", limit=1000)
    by_type = {}
    for event in page["events"]:
        by_type.setdefault(event["type"], []).append(event)
    adjusted = by_type["points_adjusted"][0]
    assert adjusted["actor"] == admin_name and adjusted["data"]["reason"] == "goodwill"
    assert adjusted["data"]["note"] == "ticket 42"
    voided = by_type["coupon_voided"][0]
    assert voided["actor"] == admin_name and voided["data"]["reason"] == "fraud"
    assert all(admin_name in e["actor"] and "expire" in e["actor"] for e in by_type["points_expired"])
    assert await pool.fetchval("SELECT created_by FROM api_keys WHERE name = 'till-7'") == admin_name
    audit = [record.getMessage() for record in caplog.records if record.name == "loyalty.audit"]
    for action in ("/adjustments", "/void", "/v1/api-keys", "/v1/jobs/expire", "/v1/projections/members/rebuild"):
        assert any(action in line and admin_name in line for line in audit), (action, audit)


# -- SQL injection -------------------------------------------------------------------------------

INJECTIONS = [
    "'; DROP TABLE events; --",
    "' OR '1'='1",
    "1; UPDATE api_keys SET role = 'admin'; --",
    "\\'; TRUNCATE command_results; --",
    "$1$2$$; DELETE FROM identities; $$",
    "') ; SELECT pg_sleep(5); --",
    "%' AND 1=0 UNION SELECT key_hash FROM api_keys --",
]


async def test_injection_strings_in_every_field_are_stored_as_data_or_refused(api, pool):
    tables = await pool.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
    keys_before = await pool.fetchval("SELECT count(*) FROM api_keys")
    expected_texts = []
    for n, attack in enumerate(INJECTIONS):
        # Ids: refused by the id rule before anything else sees them.
        for path, body in (
            ("/v1/members", {"member_id": attack}),
            ("/v1/members/m1/purchases", {"purchase_id": attack, "store_id": "s1", "amount_cents": 100}),
            ("/v1/members/m1/purchases", {"purchase_id": f"p{n}", "store_id": attack, "amount_cents": 100}),
            ("/v1/members/m1/redemptions", {"redemption_id": "r1", "points": 1, "order_ref": attack}),
            ("/v1/members/m1/adjustments", {"adjustment_id": attack, "points": 1, "reason": "r"}),
        ):
            status, answer, _ = await api.post(path, body, role="admin")
            assert status == 422 and answer["code"] == "invalid_id", (path, answer)
        status, answer, _ = await api.post(f"/v1/members/{attack}/purchases",
                                           {"purchase_id": "p", "store_id": "s", "amount_cents": 1})
        assert status in (404, 422), answer
        # Free text: accepted and stored exactly as sent.
        status, answer, _ = await api.post("/v1/members", {"member_id": f"inj{n}",
                                                           "identities": [{"type": "email", "value": attack}]})
        assert status == 201, answer
        status, answer, _ = await api.post(
            "/v1/members/m1/adjustments",
            {"adjustment_id": f"a{n}", "points": 1, "reason": attack, "note": attack}, role="admin",
            **{"Idempotency-Key": attack})
        assert status == 201, answer
        status, answer, _ = await api.post("/v1/api-keys", {"name": attack, "role": "reader"}, role="admin")
        assert status == 201, answer
        expected_texts.append(attack)
        # Reads: data, never a wider query.
        status, answer, _ = await api.get(f"/v1/identities/email/{attack}", role="reader")
        assert status == 200 and answer["member_id"] == f"inj{n}", answer
        status, answer, _ = await api.get("/v1/events", role="auditor", type=attack)
        assert status == 422 and answer["field"] == "type", answer  # no such event type
        status, answer, _ = await api.get("/v1/members/m1/balance", role="reader", as_of=attack)
        assert status == 422, answer

    assert await pool.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == tables
    assert await pool.fetchval("SELECT count(*) FROM api_keys") == keys_before + len(INJECTIONS)
    assert await pool.fetchval("SELECT count(*) FROM api_keys WHERE role = 'admin'") == 1
    events = (await api.get("/v1/members/m1/events", role="auditor", limit=1000))[1]["events"]
    reasons = [e["data"]["reason"] for e in events if e["type"] == "points_adjusted"]
    assert reasons == expected_texts
    assert sorted(await pool.fetchval("SELECT array_agg(value) FROM identities")) == sorted(INJECTIONS)
    status, report, _ = await api.get("/v1/audit/verify", role="auditor")
    assert report["ok"], report

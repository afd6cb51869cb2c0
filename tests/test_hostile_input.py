"""Hostile input: every limit holds, every refusal is a problem+json with a code and appends nothing.

Three layers: the decoders fuzzed with hypothesis (any bytes, any JSON, any
query string: a command or a 4xx problem, never another exception); every
limit of the contract over HTTP (body size, JSON depth, list and string
lengths, the id charset, amounts, page sizes, waits, media types), checking
that the log's head did not move; and slow clients against the real service
(a body that never arrives, a request head that never ends), which are cut off
after a bounded time while everyone else is served.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.admin import NewKey
from api.batch import parse_batch_line
from api.commands import OPERATIONS
from api.decoding import (
    BATCH_MAX_BYTES,
    BATCH_MAX_LINES,
    BODY_MAX_BYTES,
    BODY_READ_S,
    PAGE_LIMIT_MAX,
    decode,
    query_int,
    query_time,
)
from api.problems import HttpProblem
from ledger.store import MAX_WAIT_MS
from tests.service_process import ServiceProcess
from tests.support import running_api

BODY_TYPES = [op.body for op in OPERATIONS] + [NewKey]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=20), inner, max_size=6),
    max_leaves=30,
)
FIELD_NAMES = st.sampled_from([
    "member_id", "purchase_id", "store_id", "amount_cents", "occurred_at", "return_id", "redemption_id", "points",
    "order_ref", "coupon_id", "template", "value_cents", "min_spend_cents", "valid_from", "expires_at",
    "points_cost", "order_amount_cents", "adjustment_id", "reason", "note", "identities", "birthday",
    "enrolled_at", "name", "role", "type", "value",
])
# Objects with the fields the decoders know, so that fuzzing gets past "unknown field".
LIKELY_BODIES = st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=8)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def assert_refusal(failure: HttpProblem, statuses=(400, 413, 415, 422)) -> None:
    assert failure.status in statuses and failure.code and failure.detail, vars(failure)


# -- the decoders, fuzzed ----------------------------------------------------------------


@FUZZ
@given(body_type=st.sampled_from(BODY_TYPES), value=JSON_VALUES | LIKELY_BODIES)
def test_body_decoders_answer_any_json_with_a_command_or_a_4xx_problem(body_type, value):
    try:
        command = decode(json.dumps(value).encode(), body_type)
    except HttpProblem as failure:
        assert_refusal(failure)
    else:
        assert isinstance(command, body_type)


@FUZZ
@given(body_type=st.sampled_from(BODY_TYPES), raw=st.binary(max_size=300))
def test_body_decoders_answer_any_bytes_with_a_command_or_a_4xx_problem(body_type, raw):
    try:
        decode(raw, body_type)
    except HttpProblem as failure:
        assert_refusal(failure)


@FUZZ
@given(line=st.binary(max_size=300) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
def test_batch_lines_decode_to_a_line_or_a_4xx_problem(line):
    parsed = parse_batch_line(1, line)
    if isinstance(parsed, HttpProblem):
        assert_refusal(parsed)


@FUZZ
@given(raw=st.text(max_size=40))
def test_query_values_parse_or_are_refused_with_422(raw):
    request = make_mocked_request("GET", "/", headers={})
    request = request.clone(rel_url=request.rel_url.with_query({"limit": raw, "as_of": raw}))
    for parse in (lambda: query_int(request, "limit", 100, 1, PAGE_LIMIT_MAX),
                  lambda: query_time(request, "as_of", None)):
        try:
            parse()
        except HttpProblem as failure:
            assert failure.status == 422 and failure.code == "validation_failed"


@pytest.mark.parametrize("depth", [900, 100_000])
def test_deeply_nested_json_is_refused_with_400_not_a_crash(depth):
    deep = b"[" * depth + b"]" * depth
    with pytest.raises(HttpProblem) as refused:
        decode(b'{"note": ' + deep + b"}", OPERATIONS[-1].body)
    assert_refusal(refused.value)
    parsed = parse_batch_line(1, b'{"op": "enrol", "body": ' + deep + b"}")
    if isinstance(parsed, HttpProblem):  # past msgspec's depth limit (about 1000)
        assert parsed.status == 400 and parsed.code == "json_too_deep", vars(parsed)
    else:  # within it: the line parses, and its body is refused
        with pytest.raises(HttpProblem) as refused:
            decode(bytes(parsed.body), OPERATIONS[0].body)
        assert_refusal(refused.value)


# -- every limit over HTTP: a problem with a code, and nothing appended ---------------------------

LONG_ID = "m" * 65
TEXT_257 = "x" * 257
COUPON = {"coupon_id": "c1", "template": "T", "value_cents": 100, "expires_at": "2025-02-01T00:00:00Z"}

# method, path, body (dict: JSON; bytes: sent as is), extra headers, status, code
REFUSALS = [
    ("POST", "/v1/members/m1/purchases", b"{" + b" " * BODY_MAX_BYTES + b"}", {}, 413, "body_too_large"),
    ("POST", "/v1/members/m1/purchases", b'{"purchase_id": "p1", "store_id": "s1", "amount_cents": 1',
     {}, 400, "malformed_json"),
    ("POST", "/v1/members/m1/purchases", b"[" * 20_000 + b"]" * 20_000, {}, 422, "validation_failed"),
    ("POST", "/v1/members/m1/adjustments", b'{"adjustment_id": "a1", "points": 5, "reason": "r", "note": '
     + b"[" * 20_000 + b"]" * 20_000 + b"}", {}, 422, "validation_failed"),
    ("POST", "/v1/members/m1/purchases", {"purchase_id": "p1", "store_id": "s1", "amount_cents": 100},
     {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ("POST", "/v1/members", {"member_id": "m2", "identities": [{"type": "phone", "value": str(n)} for n in range(17)]},
     {}, 422, "validation_failed"),
    ("POST", "/v1/members", {"member_id": "m2", "identities": [{"type": "phone", "value": TEXT_257}]},
     {}, 422, "validation_failed"),
    ("POST", "/v1/members", {"member_id": "m2", "identities": [{"type": "fax", "value": "1"}]},
     {}, 422, "validation_failed"),
    ("POST", "/v1/members", {"member_id": LONG_ID}, {}, 422, "invalid_id"),
    ("POST", "/v1/members", {"member_id": "m/../2"}, {}, 422, "invalid_id"),
    ("POST", "/v1/members", {"member_id": "会员2"}, {}, 422, "invalid_id"),
    ("POST", "/v1/members", {"member_id": ""}, {}, 422, "invalid_id"),
    ("POST", "/v1/members/m!1/purchases", {"purchase_id": "p1", "store_id": "s1", "amount_cents": 100},
     {}, 422, "invalid_id"),
    ("POST", "/v1/members/m1/purchases", {"purchase_id": "p 1", "store_id": "s1", "amount_cents": 100},
     {}, 422, "invalid_id"),
    ("POST", "/v1/members/m1/purchases", {"purchase_id": "p1", "store_id": "s1", "amount_cents": 10**11 + 1},
     {}, 422, "validation_failed"),
    ("POST", "/v1/members/m1/purchases", {"purchase_id": "p1", "store_id": "s1", "amount_cents": 0},
     {}, 422, "validation_failed"),
    ("POST", "/v1/members/m1/purchases", {"purchase_id": "p1", "store_id": "s1", "amount_cents": -5},
     {}, 422, "validation_failed"),
    ("POST", "/v1/members/m1/purchases", {"purchase_id": "p1", "store_id": "s1", "amount_cents": 100.5},
     {}, 422, "validation_failed"),
    ("POST", "/v1/members/m1/purchases", {"purchase_id": "p1", "store_id": "s1", "amount_cents": "100"},
     {}, 422, "validation_failed"),
    ("POST", "/v1/members/m1/purchases", {"purchase_id": "p1", "store_id": "s1", "amount_cents": 100, "points": 5},
     {}, 422, "validation_failed"),
    ("POST", "/v1/members/m1/adjustments", {"adjustment_id": "a1", "points": 5, "reason": TEXT_257},
     {}, 422, "validation_failed"),
    ("POST", "/v1/members/m1/adjustments", {"adjustment_id": "a1", "points": 5, "reason": "r", "note": "a\u0000b"},
     {}, 422, "validation_failed"),
    ("POST", "/v1/members/m1/coupons", {**COUPON, "points_cost": 0}, {}, 422, "validation_failed"),
    ("POST", "/v1/members/m1/purchases", {"purchase_id": "p1", "store_id": "s1", "amount_cents": 100},
     {"Idempotency-Key": "k" * 256}, 422, "validation_failed"),
    ("POST", "/v1/members/m1/purchases", {"purchase_id": "p1", "store_id": "s1", "amount_cents": 100},
     {"If-Match": "three"}, 400, "invalid_if_match"),
    ("POST", "/v1/api-keys", {"name": "x", "role": "root"}, {}, 422, "validation_failed"),
    ("POST", "/v1/api-keys", {"name": TEXT_257, "role": "reader"}, {}, 422, "validation_failed"),
    ("POST", "/v1/batch", b"{}\n" * (BATCH_MAX_LINES + 1), {"Content-Type": "application/x-ndjson"},
     413, "batch_too_large"),
    ("POST", "/v1/batch", b" " * (BATCH_MAX_BYTES + 1), {"Content-Type": "application/x-ndjson"},
     413, "body_too_large"),
    ("POST", "/v1/batch", b'{"op": "enrol"}\n', {"Content-Type": "application/json"}, 415, "unsupported_media_type"),
    ("GET", "/v1/events?limit=0", None, {}, 422, "validation_failed"),
    ("GET", f"/v1/events?limit={PAGE_LIMIT_MAX + 1}", None, {}, 422, "validation_failed"),
    ("GET", "/v1/events?after=-1", None, {}, 422, "validation_failed"),
    ("GET", "/v1/events?after=", None, {}, 422, "validation_failed"),
    ("GET", f"/v1/events?wait_ms={MAX_WAIT_MS + 1}", None, {}, 422, "validation_failed"),
    ("GET", "/v1/members/m1/events?after=99999999999", None, {}, 200, None),  # past int32: an empty page, no 500
    ("GET", "/v1/members/m1/balance?as_of=yesterday", None, {}, 422, "validation_failed"),
    ("GET", "/v1/members/m1/balance?as_of=2025-01-01T00:00:00", None, {}, 422, "validation_failed"),
    ("GET", f"/v1/members/{LONG_ID}", None, {}, 422, "invalid_id"),
    ("GET", f"/v1/identities/phone/{TEXT_257}", None, {}, 422, "validation_failed"),
    ("GET", "/v1/members/m1/coupons?status=stolen", None, {}, 422, "validation_failed"),
    ("GET", "/v1/members/m1/ledger?limit=100000", None, {}, 422, "validation_failed"),
    ("DELETE", "/v1/members/m1", None, {}, 405, "method_not_allowed"),
    ("GET", "/v1/../etc/passwd", None, {}, 404, "not_found"),
]


@pytest.fixture
async def api(pool):
    async with running_api(pool) as api:
        await api.enrol("m1")
        yield api


async def test_every_limit_is_refused_with_a_problem_and_appends_nothing(api):
    head = await api.head()
    for method, path, body, headers, status, code in REFUSALS:
        kwargs = {"data": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
        headers = {"Content-Type": "application/json", **headers} if isinstance(body, bytes) else headers
        response = await api.client.request(method, path, headers=api.headers("admin", **headers), **kwargs)
        answer = await response.json(content_type=None)
        where = f"{method} {path[:80]}"
        assert response.status == status, (where, answer)
        if code is None:
            continue
        if path == "/v1/batch" and status == 200:
            continue
        assert response.content_type == "application/problem+json", where
        assert answer["code"] == code and answer["status"] == status and answer["detail"], (where, answer)
    assert await api.head() == head, "a refusal appended something"


async def test_a_batch_line_too_deep_is_refused_alone(api):
    deep = "[" * 5000 + "]" * 5000
    body = (json.dumps({"op": "enrol", "member_id": "m9"}) + "\n" + '{"op": "enrol", "body": ' + deep + "}\n").encode()
    response = await api.client.post("/v1/batch", data=body,
                                     headers=api.headers("checkout", **{"Content-Type": "application/x-ndjson"}))
    assert response.status == 200
    lines = [json.loads(line) for line in (await response.text()).splitlines()]
    assert [line["status"] for line in lines] == [201, 400]
    assert lines[1]["body"]["code"] == "json_too_deep"


async def test_a_wait_for_a_projection_position_is_bounded_then_503_with_retry_after(api):
    started = time.monotonic()
    # A position in the log (m1 is enrolled) that no projector (none runs here) will apply.
    status, answer, response = await api.get("/v1/members/m1/ledger", role="reader", min_position=await api.head())
    assert status == 503 and answer["code"] == "projection_lagging" and response.headers["Retry-After"], answer
    assert time.monotonic() - started < 5


async def test_a_long_poll_is_bounded_by_its_wait(api):
    head = await api.head()
    started = time.monotonic()
    status, answer, _ = await api.get("/v1/events", role="auditor", after=head, wait_ms=300)
    assert status == 200 and answer["events"] == []
    assert 0.25 < time.monotonic() - started < 3


# -- slow clients against the real service ------------------------------------------------------

KEEPALIVE_S = 2.0
LINGERING_S = 2.0  # the service drains an unread body this long after answering, then closes


async def read_until_closed(reader: asyncio.StreamReader, timeout_s: float) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout_s)


async def test_slow_clients_are_cut_off_in_bounded_time_and_hold_no_one_else_up(database_url):
    async with ServiceProcess(database_url, env={"LOYALTY_KEEPALIVE_S": str(KEEPALIVE_S)}) as service:
        started = time.monotonic()
        # A body promised and never sent.
        slow_bodies = []
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
            writer.write(
                b"POST /v1/members HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + service.admin_key.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"memb"
            )
            await writer.drain()
            slow_bodies.append((reader, writer))
        # A request head that never ends (slowloris).
        slow_heads = []
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            await writer.drain()
            slow_heads.append((reader, writer))

        # Meanwhile everyone else is served at once.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            for _ in range(20):
                async with session.get(f"{service.url}/healthz") as response:
                    assert response.status == 200
            assert time.monotonic() - started < 2

        for reader, writer in slow_bodies:
            answer = await read_until_closed(reader, BODY_READ_S + LINGERING_S + 3)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"application/problem+json" in answer and b'"code":"body_timeout"' in answer
            writer.close()
        for reader, writer in slow_heads:
            assert await read_until_closed(reader, KEEPALIVE_S + 3) == b""  # closed without an answer
            writer.close()
        assert time.monotonic() - started < BODY_READ_S + LINGERING_S + KEEPALIVE_S + 3

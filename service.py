"""The aiohttp application and the ``loyalty`` command line.

Thin on purpose: HTTP and the command line are translated into commands for
``ledger.application.Ledger`` and reads of the store and projections.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any, Awaitable, Callable, TypeVar

import asyncpg
import msgspec
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from events.codec import encode_json, parse_time
from ledger import commands as cmd
from ledger.answers import coupon_view, member_view
from ledger.application import Ledger, Outcome, Request, new_id, request_hash
from ledger.clock import Clock, system_clock
from ledger.errors import problem
from ledger.jobs import JOBS, run_job
from ledger.programme import Programme, load_programme
from ledger.store import MAX_WAIT_MS, EventStore
from ledger.views import balance, tier_view
from projections.members import rfm

log = logging.getLogger("loyalty.service")
audit_log = logging.getLogger("loyalty.audit")

BODY_MAX_BYTES = 64 * 1024
BATCH_MAX_BYTES = 8 * 1024 * 1024
BATCH_MAX_LINES = 10_000
PAGE_LIMIT_MAX = 1000
MIN_POSITION_WAIT_MS = 2000
BODY_READ_S = 5.0  # a body of at most 64 KiB arrives within this (else 408)
BATCH_READ_S = 60.0  # an 8 MiB batch at >= 140 KB/s
KEEPALIVE_S = 15.0  # idle connections, and request heads that never finish, are closed after this
JSON = "application/json"
PROBLEM_JSON = "application/problem+json"
NDJSON = "application/x-ndjson"

ROLES = ("checkout", "reader", "auditor", "admin")
CHECKOUT = frozenset({"checkout", "admin"})
READER = frozenset({"reader", "auditor", "admin"})
MEMBER_READER = READER | {"checkout"}
AUDITOR = frozenset({"auditor", "admin"})
ADMIN = frozenset({"admin"})

LEDGER = web.AppKey("ledger", Ledger)
SETTINGS = web.AppKey("settings", "Settings")
METRICS = web.AppKey("metrics", "Metrics")
KEYS = web.AppKey("keys", "KeyRing")
PRINCIPAL = web.RequestKey("principal", "Principal")


# -- settings ------------------------------------------------------------------


@dataclass
class Settings:
    rate_limit_per_s: float | None = 200.0  # per key; None: off
    rate_burst: float = 400.0
    scheduler: bool = True
    admin_key: str | None = None
    request_deadline_s: float = 10.0  # every bounded request answers within this (503 after)

    @classmethod
    def from_env(cls) -> Settings:
        limit = os.environ.get("LOYALTY_RATE_LIMIT", "200")
        return cls(
            rate_limit_per_s=None if limit.lower() == "off" else float(limit),
            rate_burst=2 * float(limit) if limit.lower() != "off" else 0.0,
            scheduler=os.environ.get("LOYALTY_SCHEDULER", "on").lower() != "off",
            admin_key=os.environ.get("LOYALTY_ADMIN_KEY") or None,
            request_deadline_s=float(os.environ.get("LOYALTY_REQUEST_DEADLINE_S", "10")),
        )


# -- errors ----------------------------------------------------------------------


class HttpProblem(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers, self.extra = status, code, detail, headers or {}, extra


def problem_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any):
    return web.Response(
        status=status,
        body=encode_json(problem(status, code, detail, **extra)),
        content_type=PROBLEM_JSON,
        headers=headers,
    )


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=encode_json(body), content_type=JSON, headers=headers)


def outcome_response(outcome: Outcome) -> web.Response:
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else None
    content_type = PROBLEM_JSON if outcome.is_problem else JSON
    return web.Response(status=outcome.status, body=outcome.body, content_type=content_type, headers=headers)


_FIELD_AT = " - at `$."


def validation_problem(error: msgspec.ValidationError) -> HttpProblem:
    """Name the offending field; ids that break the id rule get ``invalid_id``."""
    message = str(error)
    field_path = message.split(_FIELD_AT, 1)[1].rstrip("`") if _FIELD_AT in message else None
    if "unknown field" in message:
        field_path = message.split("`")[1] if "`" in message else field_path
    leaf = (field_path or "").split(".")[-1].split("[")[0]
    if ("matching regex" in message or "length" in message) and (leaf.endswith("_id") or leaf.endswith("_ref")):
        return HttpProblem(422, "invalid_id", f"{leaf} must be 1-64 characters of A-Z a-z 0-9 . _ : -", field=field_path)
    return HttpProblem(422, "validation_failed", message, field=field_path)


# -- metrics ---------------------------------------------------------------------


class Metrics:
    def __init__(self, ledger: Ledger) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "loyalty_http_requests_total", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "loyalty_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.appended = Counter("loyalty_events_appended_total", "Events appended", registry=self.registry)
        self.head = Gauge("loyalty_log_head_position", "Highest position appended", registry=self.registry)
        # Read at scrape time. The cache fills up to its bound, then stays
        # there: RSS that grows with these is the cache, not a leak.
        Gauge("loyalty_member_cache_members", "Member states cached in this process",
              registry=self.registry).set_function(lambda: ledger.cached_members)
        Gauge("loyalty_member_cache_events", "Events folded into the cached member states (bounded by "
              "LOYALTY_CACHE_EVENTS)", registry=self.registry).set_function(lambda: ledger.cached_events)


# -- auth ------------------------------------------------------------------------


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class Principal:
    key_id: str
    name: str
    role: str


@dataclass
class KeyRing:
    """API keys, stored hashed; looked up by hash and compared in constant time."""

    pool: Any
    settings: Settings
    clock: Clock
    _cache: dict[str, tuple[Principal | None, float]] = field(default_factory=dict)
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    CACHE_SECONDS = 30.0

    async def authenticate(self, secret: str) -> Principal | None:
        digest = hash_key(secret)
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        row = await self.pool.fetchrow(
            "SELECT key_id, key_hash, name, role FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL", digest
        )
        principal = None
        if row is not None and hmac.compare_digest(row["key_hash"].strip(), digest):
            principal = Principal(row["key_id"], row["name"], row["role"])
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (principal, now + self.CACHE_SECONDS)
        return principal

    async def create(self, name: str, role: str, created_by: str | None, secret: str | None = None) -> dict[str, Any]:
        secret = secret or f"lk_{secrets.token_urlsafe(32)}"
        key_id = new_id("key")
        await self.pool.execute(
            """INSERT INTO api_keys (key_id, key_hash, name, role, created_by) VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (key_hash) DO NOTHING""",
            key_id,
            hash_key(secret),
            name,
            role,
            created_by,
        )
        log.info("api key %s (%s, role %s) created by %s", key_id, name, role, created_by or "the command line")
        return {"key": secret, "key_id": key_id, "name": name, "role": role}

    def take_token(self, key_id: str) -> float | None:
        """Per-key token bucket; returns the seconds to wait when empty."""
        rate = self.settings.rate_limit_per_s
        if rate is None:
            return None
        now = time.monotonic()
        tokens, last = self._buckets.get(key_id, (self.settings.rate_burst, now))
        tokens = min(self.settings.rate_burst, tokens + (now - last) * rate)
        if tokens < 1:
            self._buckets[key_id] = (tokens, now)
            return (1 - tokens) / rate
        self._buckets[key_id] = (tokens - 1, now)
        return None


# -- middleware --------------------------------------------------------------------


def route_name(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


@web.middleware
async def problems_and_metrics(request: web.Request, handler):
    metrics: Metrics = request.app[METRICS]
    started = time.perf_counter()
    try:
        response = await bounded(handler(request), request_deadline_s(request))
    except HttpProblem as failure:
        response = problem_response(failure.status, failure.code, failure.detail, failure.headers, **failure.extra)
    except web.HTTPException as http:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(http.status, "http_error")
        detail = {
            404: f"no route {request.path}; see /openapi.json",
            405: f"{request.method} is not allowed on {request.path}",
            413: "the body is larger than allowed (64 KiB; batch 8 MiB)",
        }.get(http.status, http.reason or "error")
        allow_header = {"Allow": http.headers["Allow"]} if "Allow" in http.headers else None  # RFC 9110 on 405
        response = problem_response(http.status, code, detail, allow_header)
    except RequestTimeout:
        log.warning("%s %s did not finish within its deadline: answered 503", request.method, request.path)
        response = problem_response(503, "request_timeout", "the request did not finish in time (the database is slow "
                                    "or unreachable); retry with the same Idempotency-Key", {"Retry-After": "1"})
    except Exception as failure:  # the last line of defence: a 5xx is never stored as an answer
        answer = unexpected_failure(failure, f"{request.method} {request.path}", reading=request.method == "GET")
        response = problem_response(answer.status, answer.code, answer.detail, answer.headers)
    route = route_name(request)
    metrics.requests.labels(request.method, route, str(response.status)).inc()
    metrics.latency.labels(request.method, route).observe(time.perf_counter() - started)
    return response


# Every request answers within Settings.request_deadline_s (LOYALTY_REQUEST_DEADLINE_S,
# default 10), whatever the database does; a long poll gets its wait on top.
# Long jobs (batch, verify, time jobs, rebuilds) are not bounded.
READY_PROBE_S = 2.0
_UNBOUNDED_PATHS = ("/v1/batch", "/v1/audit/verify", "/v1/jobs/", "/v1/projections/")


T = TypeVar("T")


class RequestTimeout(Exception):
    pass


def request_deadline_s(request: web.Request) -> float | None:
    if request.path.startswith(_UNBOUNDED_PATHS):
        return None
    deadline_s = request.app[SETTINGS].request_deadline_s
    if request.path == "/v1/events":
        return deadline_s + MAX_WAIT_MS / 1000
    return deadline_s


async def bounded(work: Awaitable[T], deadline_s: float | None) -> T:
    """``work``'s result, or RequestTimeout after ``deadline_s``.

    On time-out the work is cancelled but not waited for: asyncpg returns a
    connection cut off mid-query to its pool only after a cancel request that
    can itself hang on a silent database (tests/test_database_faults.py), so
    waiting for the cancellation would hold the answer just as long. A command
    that still commits after its 503 is found by the retry's Idempotency-Key.
    """
    if deadline_s is None:
        return await work
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=deadline_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_forget_result)
        raise RequestTimeout()
    return task.result()


def _forget_result(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


def unexpected_failure(failure: Exception, where: str, reading: bool = False) -> HttpProblem:
    """The answer to an exception no handler turned into one, logged with ``where`` it happened."""
    if _is_unchecked_input(failure, reading):
        log.warning("a value out of the database's range on %s: %s", where, failure)
        return HttpProblem(422, "validation_failed", "a value in the request is out of range")
    if isinstance(failure, (asyncio.TimeoutError, OSError)) or _is_connection_failure(failure):
        log.warning("database unavailable on %s: %s", where, failure)
        return HttpProblem(503, "database_unavailable", "the database is not reachable; retry", {"Retry-After": "1"})
    log.error("unexpected failure on %s", where, exc_info=failure)
    return HttpProblem(500, "internal_error", "an unexpected error; it has been logged")


def _is_unchecked_input(failure: Exception, reading: bool) -> bool:
    """A request value the handler passed on unchecked and the database refused.

    A gap in the handler's validation, but the client's input: 422, not 500
    (schemathesis found ``after`` past int32 and NUL in ``type`` on reads). Only
    reads: a write must be validated before it joins a group commit.
    """
    if isinstance(failure, asyncpg.exceptions._base.DataError):  # asyncpg could not encode an argument
        return True
    return reading and isinstance(failure, asyncpg.exceptions.DataError)  # SQLSTATE class 22


def _is_connection_failure(failure: Exception) -> bool:
    # Whole SQLSTATE classes, not single errors: a connection cut mid-query shows
    # up as any of them (tests/test_database_faults.py found InternalClientError).
    return isinstance(
        failure,
        (asyncpg.exceptions.PostgresConnectionError,  # class 08: connection exceptions
         asyncpg.exceptions.OperatorInterventionError,  # class 57: shutdown, cannot connect now, cancelled
         asyncpg.exceptions.InsufficientResourcesError,  # class 53: too many connections, disk full
         asyncpg.exceptions.TransactionRollbackError,  # class 40: serialization failure, deadlock
         asyncpg.exceptions.InterfaceError,
         asyncpg.exceptions.InternalClientError),  # a connection left mid-operation by a cut
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def allow(roles: frozenset[str]) -> Callable[[Handler], Handler]:
    """Require a bearer key with one of ``roles`` (401 without, 403 with another)."""

    def wrap(handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            header = request.headers.get("Authorization", "")
            scheme, _, secret = header.partition(" ")
            if scheme.lower() != "bearer" or not secret:
                raise HttpProblem(401, "unauthorized", "send Authorization: Bearer <key>",
                                  {"WWW-Authenticate": "Bearer"})
            keys: KeyRing = request.app[KEYS]
            principal = await keys.authenticate(secret.strip())
            if principal is None:
                raise HttpProblem(401, "unauthorized", "the API key is unknown or revoked", {"WWW-Authenticate": "Bearer"})
            if principal.role not in roles:
                raise HttpProblem(403, "forbidden", f"role {principal.role} may not do this; it needs one of {sorted(roles)}")
            wait_s = keys.take_token(principal.key_id)
            if wait_s is not None:
                raise HttpProblem(429, "rate_limited", "too many requests for this key; slow down",
                                  {"Retry-After": str(max(1, int(wait_s + 0.999)))})
            request[PRINCIPAL] = principal
            if principal.role == "admin" and request.method != "GET":
                # Who did an admin action (rebuilds and key creation append no event to say so).
                audit_log.info("%s %s by %s (key %s)", request.method, request.path_qs, principal.name, principal.key_id)
            return await handler(request)

        guarded.roles = roles  # type: ignore[attr-defined]
        return guarded

    return wrap


# -- request decoding --------------------------------------------------------------


async def read_body(request: web.Request, limit: int = BODY_MAX_BYTES, media: str = JSON) -> bytes:
    if request.content_length is not None and request.content_length > limit:  # refused before it is read
        raise HttpProblem(413, "body_too_large", f"the body is {request.content_length} bytes; at most {limit}")
    # A client that sends its body slowly (or never) does not hold the request past this.
    read_s = BATCH_READ_S if limit > BODY_MAX_BYTES else BODY_READ_S
    try:
        body = await asyncio.wait_for(request.read(), read_s)
    except asyncio.TimeoutError:
        raise HttpProblem(408, "body_timeout", f"the body did not arrive within {read_s:g} s",
                          {"Connection": "close"}) from None
    if len(body) > limit:
        raise HttpProblem(413, "body_too_large", f"the body is {len(body)} bytes; at most {limit}")
    if body and request.content_type != media:
        raise HttpProblem(415, "unsupported_media_type", f"send Content-Type: {media}")
    return body


def decode(body: bytes, type_: type, **path_fields: str):
    if b"\\u0000" in body:
        # PostgreSQL stores no NUL in text or jsonb: refused here, or the append
        # would fail, and with it every command in its group commit (test_hostile_input.py).
        raise HttpProblem(422, "validation_failed", "text may not contain NUL (\\u0000)")
    try:
        command = msgspec.json.decode(body or b"{}", type=type_)
    except msgspec.ValidationError as error:
        raise validation_problem(error) from None
    except msgspec.DecodeError as error:
        raise HttpProblem(400, "malformed_json", f"the body is not valid JSON: {error}") from None
    except RecursionError:
        raise HttpProblem(400, "json_too_deep", "the body nests deeper than the decoder allows") from None
    if path_fields:
        command = msgspec.structs.replace(command, **path_fields)
    return command


def path_id(request: web.Request, name: str) -> str:
    value = request.match_info[name]
    if not _ID.match(value):
        raise HttpProblem(422, "invalid_id", f"{name} must be 1-64 characters of A-Z a-z 0-9 . _ : -", field=name)
    return value


_ID = re.compile(cmd.ID_PATTERN)


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:  # an empty value is not a number (schemathesis): 422, not the default
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HttpProblem(422, "validation_failed", f"{name} must be an integer", field=name) from None
    if not low <= value <= high:
        raise HttpProblem(422, "validation_failed", f"{name} must be within {low}..{high}", field=name)
    return value


def query_time(request: web.Request, name: str, default: datetime) -> datetime:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return parse_time(raw)
    except (ValueError, msgspec.ValidationError):
        raise HttpProblem(422, "validation_failed", f"{name} must be an RFC 3339 time with offset", field=name) from None


def if_match(request: web.Request) -> int | None:
    raw = request.headers.get("If-Match")
    if raw is None:
        return None
    try:
        return int(raw.strip().strip('"'))
    except ValueError:
        raise HttpProblem(400, "invalid_if_match", "If-Match must be a stream_version number") from None


def idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 1 <= len(key) <= 255:
        raise HttpProblem(422, "validation_failed", "Idempotency-Key must be 1-255 characters", field="Idempotency-Key")
    return key


# -- commands ------------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    """One command endpoint: its name (also the batch ``op``), body type and path ids."""

    name: str
    method: str
    path: str
    body: type
    roles: frozenset[str]
    path_fields: tuple[str, ...] = ()
    summary: str = ""


OPERATIONS = [
    Operation("enrol", "POST", "/v1/members", cmd.Enrol, CHECKOUT, summary="Enrol a member"),
    Operation("purchase", "POST", "/v1/members/{member_id}/purchases", cmd.RecordPurchase, CHECKOUT,
              summary="Record a purchase and earn points"),
    Operation("return", "POST", "/v1/members/{member_id}/returns", cmd.RecordReturn, CHECKOUT,
              summary="Return (part of) a purchase; claws points back"),
    Operation("redemption", "POST", "/v1/members/{member_id}/redemptions", cmd.Redeem, CHECKOUT,
              summary="Burn points at checkout"),
    Operation("redemption_reversal", "POST", "/v1/members/{member_id}/redemptions/{redemption_id}/reversal",
              cmd.ReverseRedemption, CHECKOUT, ("redemption_id",), "Give back exactly the buckets a redemption took"),
    Operation("coupon_issue", "POST", "/v1/members/{member_id}/coupons", cmd.IssueCoupon, CHECKOUT,
              summary="Issue a coupon (admin), or buy one with points_cost (checkout)"),
    Operation("coupon_redemption", "POST", "/v1/members/{member_id}/coupons/{coupon_id}/redemption",
              cmd.RedeemCoupon, CHECKOUT, ("coupon_id",), "Redeem a coupon on an order"),
    Operation("coupon_redemption_reversal", "POST",
              "/v1/members/{member_id}/coupons/{coupon_id}/redemption/reversal",
              cmd.ReverseCouponRedemption, CHECKOUT, ("coupon_id",), "Reverse a coupon redemption"),
    Operation("coupon_void", "POST", "/v1/members/{member_id}/coupons/{coupon_id}/void", cmd.VoidCoupon, ADMIN,
              ("coupon_id",), "Void an issued coupon (admin)"),
    Operation("adjustment", "POST", "/v1/members/{member_id}/adjustments", cmd.Adjust, ADMIN,
              summary="Adjust points by hand (admin; reason required)"),
]
OPERATIONS_BY_NAME = {op.name: op for op in OPERATIONS}


def prepare_command(
    operation: Operation, member_id: str | None, command: cmd.Command, principal: Principal
) -> tuple[str, cmd.Command, str]:
    """The member, the command with its server-made ids, and the request's fingerprint."""
    if isinstance(command, cmd.IssueCoupon) and command.points_cost is None and principal.role != "admin":
        raise HttpProblem(403, "forbidden", "only admin issues coupons without points_cost")
    # Fingerprinted before the ids are made: a retry without them is the same request.
    fingerprint = request_hash(operation.name, member_id or "", command)
    if isinstance(command, cmd.Enrol):
        member_id = command.member_id or new_id("m")
        command = msgspec.structs.replace(command, member_id=member_id)
    if isinstance(command, cmd.IssueCoupon) and command.coupon_id is None:
        command = msgspec.structs.replace(command, coupon_id=new_id("c"))
    assert member_id is not None
    return member_id, command, fingerprint


async def run_operation(
    app: web.Application,
    operation: Operation,
    member_id: str | None,
    command: cmd.Command,
    principal: Principal,
    key: str | None,
    expected_version: int | None = None,
) -> Outcome:
    """Run one decoded HTTP command through the ledger."""
    member_id, command, fingerprint = prepare_command(operation, member_id, command, principal)
    outcome = await app[LEDGER].execute(
        operation.name,
        member_id,
        command,
        actor=principal.name,
        idempotency_key=key,
        expected_version=expected_version,
        fingerprint=fingerprint,
    )
    record_head(app, [outcome])
    return outcome


def record_head(app: web.Application, outcomes: list[Outcome]) -> None:
    positions = [outcome.position for outcome in outcomes if outcome.position is not None]
    if positions:
        app[METRICS].head.set(max(positions))


def command_handler(operation: Operation) -> Handler:
    @allow(operation.roles)
    async def handle(request: web.Request) -> web.StreamResponse:
        member_id = path_id(request, "member_id") if "{member_id}" in operation.path else None
        path_fields = {name: path_id(request, name) for name in operation.path_fields}
        command = decode(await read_body(request), operation.body, **path_fields)
        outcome = await run_operation(
            request.app, operation, member_id, command, request[PRINCIPAL], idempotency_key(request),
            if_match(request),
        )
        return outcome_response(outcome)

    handle.operation = operation  # type: ignore[attr-defined]
    return handle


class BatchLine(msgspec.Struct, forbid_unknown_fields=True):
    op: str
    member_id: str | None = None
    body: msgspec.Raw = msgspec.Raw(b"{}")
    idempotency_key: Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern="^[^\x00]*$")] | None = None


@allow(CHECKOUT)
async def batch(request: web.Request) -> web.StreamResponse:
    """NDJSON in, one result line per input line, in order; each line its own command."""
    body = await read_body(request, BATCH_MAX_BYTES, NDJSON)
    lines = [line for line in body.split(b"\n") if line.strip()]
    if len(lines) > BATCH_MAX_LINES:
        raise HttpProblem(413, "batch_too_large", f"{len(lines)} lines; at most {BATCH_MAX_LINES}")
    parsed = [parse_batch_line(n, line) for n, line in enumerate(lines, start=1)]
    results = await run_batch_lines(request.app, request[PRINCIPAL], parsed)
    payload = b"".join(encode_json({"line": n, "status": status, "body": msgspec.Raw(out)}) + b"\n"
                       for n, (status, out) in enumerate(results, start=1))
    return web.Response(status=200, body=payload, content_type=NDJSON)


async def run_batch_lines(
    app: web.Application, principal: Principal, parsed: list[BatchLine | HttpProblem]
) -> list[tuple[int, bytes]]:
    """Each line's (status, body), in order.

    A member's lines run in order, as one series (``Ledger.execute_series``:
    appended together, each answered as on its own); members run
    concurrently, and group commit puts their appends into few transactions.
    """
    results: list[tuple[int, bytes]] = [(0, b"")] * len(parsed)
    series: dict[str, list[tuple[int, Request]]] = {}
    for index, line in enumerate(parsed):
        try:
            member_id, request = prepare_batch_line(principal, line)
        except HttpProblem as failure:
            results[index] = failure.status, encode_json(problem(failure.status, failure.code, failure.detail, **failure.extra))
            continue
        series.setdefault(member_id, []).append((index, request))
    ledger = app[LEDGER]

    async def run_series(member_id: str, lines: list[tuple[int, Request]]) -> None:
        try:
            outcomes = await ledger.execute_series(member_id, [request for _, request in lines])
        except Exception as failure:
            # This member's lines only: the other members' lines have their
            # answers. Some of these may have committed; each line's retry
            # (same ids, same key) answers it exactly once either way.
            answer = unexpected_failure(failure, f"the batch lines of {member_id}")
            body = encode_json(problem(answer.status, answer.code, answer.detail + f"; retry {member_id}'s lines"))
            for index, _ in lines:
                results[index] = answer.status, body
            return
        for (index, _), outcome in zip(lines, outcomes, strict=True):
            results[index] = outcome.status, outcome.body
        record_head(app, outcomes)

    await asyncio.gather(*(run_series(member_id, lines) for member_id, lines in series.items()))
    return results


def parse_batch_line(number: int, line: bytes) -> BatchLine | HttpProblem:
    try:
        return msgspec.json.decode(line, type=BatchLine)
    except msgspec.ValidationError as error:
        return validation_problem(error)
    except msgspec.DecodeError as error:
        return HttpProblem(400, "malformed_json", f"line {number} is not valid JSON: {error}")
    except RecursionError:  # msgspec's depth limit (~1000); a 500 for the whole batch before (test_hostile_input.py)
        return HttpProblem(400, "json_too_deep", f"line {number} nests deeper than the decoder allows")


def prepare_batch_line(principal: Principal, parsed: BatchLine | HttpProblem) -> tuple[str, Request]:
    """The member and the command a line runs, or the HttpProblem that answers it."""
    if isinstance(parsed, HttpProblem):
        raise parsed
    operation = OPERATIONS_BY_NAME.get(parsed.op)
    if operation is None or operation.name == "coupon_void":
        raise HttpProblem(422, "validation_failed", f"unknown op {parsed.op!r}", field="op")
    if principal.role not in operation.roles:
        raise HttpProblem(403, "forbidden", f"role {principal.role} may not run {parsed.op}")
    member_id = parsed.member_id
    if member_id is not None and not _ID.match(member_id):
        raise HttpProblem(422, "invalid_id", "member_id must be 1-64 characters of A-Z a-z 0-9 . _ : -", field="member_id")
    if member_id is None and operation.name != "enrol":
        raise HttpProblem(422, "validation_failed", "member_id is required", field="member_id")
    command = decode(bytes(parsed.body), operation.body)
    for name in operation.path_fields:  # in a batch the path's ids travel in the body
        if not getattr(command, name):
            raise HttpProblem(422, "validation_failed", f"{name} is required in the body of a {parsed.op} line", field=name)
    if operation.name == "enrol" and member_id is not None:
        command = msgspec.structs.replace(command, member_id=member_id)
        member_id = None
    member_id, command, fingerprint = prepare_command(operation, member_id, command, principal)
    return member_id, Request(operation.name, command, fingerprint, principal.name, parsed.idempotency_key)


# -- reads -------------------------------------------------------------------------------


async def member_state(request: web.Request, at: datetime | None = None):
    ledger = request.app[LEDGER]
    member_id = path_id(request, "member_id")
    state = await (ledger.state_as_of(member_id, at) if at is not None else ledger.load(member_id))
    if not state.enrolled:
        raise HttpProblem(404, "member_not_found", f"member {member_id} does not exist; check the id")
    return state


@allow(MEMBER_READER)
async def get_member(request: web.Request) -> web.StreamResponse:
    ledger = request.app[LEDGER]
    state = await member_state(request)
    now = ledger.clock()
    view = member_view(state, now, ledger.programme)
    view.update(rfm(state.purchases.values(), now, ledger.programme).as_dict())
    return json_response(view)


@allow(READER)
async def get_balance(request: web.Request) -> web.StreamResponse:
    at = query_time(request, "as_of", request.app[LEDGER].clock())
    state = await member_state(request, at)
    return json_response(balance(state, at))


@allow(READER)
async def get_tier(request: web.Request) -> web.StreamResponse:
    ledger = request.app[LEDGER]
    at = query_time(request, "as_of", ledger.clock())
    state = await member_state(request, at)
    return json_response(tier_view(state, at, ledger.programme))


@allow(READER)
async def get_coupons(request: web.Request) -> web.StreamResponse:
    ledger = request.app[LEDGER]
    at = ledger.clock()
    wanted = request.query.get("status")
    if wanted is not None and wanted not in ("issued", "redeemed", "expired", "voided"):
        raise HttpProblem(422, "validation_failed", "status is one of issued, redeemed, expired, voided", field="status")
    state = await member_state(request)
    coupons = [coupon_view(c, at) for c in state.coupons.values()]
    return json_response({"coupons": [c for c in coupons if wanted is None or c["status"] == wanted]})


@allow(CHECKOUT | READER)
async def get_identity(request: web.Request) -> web.StreamResponse:
    identity_type, value = request.match_info["type"], request.match_info["value"]
    if identity_type not in ("phone", "unionid", "openid", "email", "card") or len(value) > 256:
        raise HttpProblem(422, "validation_failed", "identity type is one of phone, unionid, openid, email, card")
    member_id = await request.app[LEDGER].store.identity_owner(identity_type, value)
    if member_id is None:
        raise HttpProblem(404, "member_not_found", f"no member has {identity_type} {value}")
    return json_response({"member_id": member_id})


def page(request: web.Request) -> tuple[int, int]:
    return query_int(request, "after", 0, 0, 2**62), query_int(request, "limit", 100, 1, PAGE_LIMIT_MAX)


@allow(AUDITOR)
async def get_member_events(request: web.Request) -> web.StreamResponse:
    after, limit = page(request)
    await member_state(request)
    envelopes = await request.app[LEDGER].store.read_stream(path_id(request, "member_id"), after, limit + 1)
    more = len(envelopes) > limit
    envelopes = envelopes[:limit]
    return json_response({"events": envelopes, "next_after": envelopes[-1].stream_version if more else None})


@allow(AUDITOR)
async def get_events(request: web.Request) -> web.StreamResponse:
    after, limit = page(request)
    wait_ms = query_int(request, "wait_ms", 0, 0, MAX_WAIT_MS)
    types = [t for t in request.query.getall("type", []) for t in t.split(",") if t] or None
    store = request.app[LEDGER].store
    envelopes = await store.read_all(after, limit + 1, types)
    if not envelopes and wait_ms:
        deadline = time.monotonic() + wait_ms / 1000
        while not envelopes and time.monotonic() < deadline:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if await store.wait_for_position(after, remaining_ms):
                envelopes = await store.read_all(after, limit + 1, types)
                after = max(after, envelopes[-1].position if envelopes else (await store.head())[0])
    more = len(envelopes) > limit
    envelopes = envelopes[:limit]
    return json_response({"events": envelopes, "next_after": envelopes[-1].position if more else None})


@allow(AUDITOR)
async def audit_verify(request: web.Request) -> web.StreamResponse:
    return json_response(await request.app[LEDGER].store.verify())


# -- admin ------------------------------------------------------------------------------


class NewKey(msgspec.Struct, forbid_unknown_fields=True):
    name: cmd.Text
    role: str


@allow(ADMIN)
async def create_api_key(request: web.Request) -> web.StreamResponse:
    body = decode(await read_body(request), NewKey)
    if body.role not in ROLES:
        raise HttpProblem(422, "validation_failed", f"role is one of {', '.join(ROLES)}", field="role")
    created = await request.app[KEYS].create(body.name, body.role, request[PRINCIPAL].name)
    return json_response(created, status=201)


@allow(ADMIN)
async def run_job_endpoint(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in JOBS:
        raise HttpProblem(404, "job_not_found", f"jobs are {', '.join(JOBS)}")
    ledger = request.app[LEDGER]
    as_of = query_time(request, "as_of", ledger.clock())
    log.info("job %s at %s started by %s", name, as_of.isoformat(), request[PRINCIPAL].name)
    report = await run_job(ledger, name, as_of, actor=f"job:{name}:{request[PRINCIPAL].name}")
    return json_response(report)


# -- operations --------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.StreamResponse:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    from ledger.database import schema_is_current

    async def probe() -> bool:
        async with request.app[LEDGER].store.pool.acquire(timeout=2) as conn:
            return await schema_is_current(conn)

    try:
        if not await bounded(probe(), READY_PROBE_S):
            return problem_response(503, "not_ready", "the schema is not applied yet", {"Retry-After": "1"})
    except RequestTimeout:
        return problem_response(503, "not_ready", f"the database did not answer within {READY_PROBE_S} s", {"Retry-After": "1"})
    except Exception as failure:  # any failure to reach the database means not ready
        return problem_response(503, "not_ready", f"the database is not reachable: {failure}", {"Retry-After": "1"})
    return json_response({"status": "ready"})


async def metrics_endpoint(request: web.Request) -> web.StreamResponse:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def openapi_endpoint(request: web.Request) -> web.StreamResponse:
    return json_response(build_openapi())


# Reads: path, summary, roles, query parameters.
READS = [
    ("/v1/members/{member_id}", "Member profile, status, tier, balance", MEMBER_READER, []),
    ("/v1/members/{member_id}/balance", "Balance as of a time", READER, ["as_of"]),
    ("/v1/members/{member_id}/tier", "Tier as of a time", READER, ["as_of"]),
    ("/v1/members/{member_id}/coupons", "Coupon wallet", READER, ["status"]),
    ("/v1/members/{member_id}/events", "The member's stream", AUDITOR, ["after", "limit"]),
    ("/v1/identities/{type}/{value}", "Find a member by identity", CHECKOUT | READER, []),
    ("/v1/events", "The global feed", AUDITOR, ["after", "limit", "type", "wait_ms"]),
    ("/v1/audit/verify", "Verify the hash chain", AUDITOR, []),
    # Served by projections (projections/http.py): min_position waits for read-your-writes.
    ("/v1/members/{member_id}/ledger", "The member's points trail", READER, ["after", "limit", "min_position"]),
    ("/v1/programme/liability", "Points liability as of a time, by month", READER, ["as_of", "min_position"]),
    ("/v1/segments/{lifecycle}", "Members in a lifecycle, by member id", READER, ["after", "limit", "min_position"]),
    ("/v1/projections", "Projection positions, lag and state", READER, []),
]
_QUERY_SCHEMAS = {
    "as_of": {"type": "string", "format": "date-time"},
    "status": {"type": "string", "enum": ["issued", "redeemed", "expired", "voided"]},
    "after": {"type": "integer", "minimum": 0, "maximum": 2**62},
    "limit": {"type": "integer", "minimum": 1, "maximum": PAGE_LIMIT_MAX},
    "type": {"type": "string"},
    "wait_ms": {"type": "integer", "minimum": 0, "maximum": MAX_WAIT_MS},
    "min_position": {"type": "integer", "minimum": 0, "maximum": 2**62},
}
_PROBLEM = {"description": "A refusal", "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}}


# What the handlers accept, so that generated "valid" requests are valid (tests/test_schemathesis.py).
_PATH_SCHEMAS = {
    "type": {"type": "string", "enum": ["phone", "unionid", "openid", "email", "card"]},
    "value": {"type": "string", "minLength": 1, "maxLength": 256},
    "lifecycle": {"type": "string", "enum": ["prospect", "active", "loyal", "dormant"]},
}
_ID_SCHEMA = {"type": "string", "pattern": cmd.ID_PATTERN}


def _path_parameters(path: str) -> list[dict[str, Any]]:
    names = re.findall(r"{(\w+)}", path)
    return [{"name": n, "in": "path", "required": True, "schema": _PATH_SCHEMAS.get(n, _ID_SCHEMA)} for n in names]


def _query_schema(path: str, name: str) -> dict[str, Any]:
    if path == "/v1/segments/{lifecycle}" and name == "after":
        return _ID_SCHEMA  # segments page by member id
    return _QUERY_SCHEMAS[name]


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): _PROBLEM for status in statuses}


def build_openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document, generated from the msgspec types the handlers decode."""
    bodies = [op.body for op in OPERATIONS] + [NewKey]
    schemas, components = msgspec.json.schema_components(bodies, ref_template="#/components/schemas/{name}")
    components["Problem"] = {
        "type": "object",
        "required": ["type", "title", "status", "detail", "code"],
        "properties": {k: {"type": "integer" if k == "status" else "string"} for k in ("type", "title", "status", "detail", "code")},
    }
    security = [{"bearer": []}]
    paths: dict[str, Any] = {}
    for operation, schema in zip(OPERATIONS, schemas):
        paths.setdefault(operation.path, {})["post"] = {
            "operationId": operation.name,
            "summary": operation.summary,
            "security": security,
            "x-roles": sorted(operation.roles),
            "parameters": _path_parameters(operation.path)
            + [
                {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string", "minLength": 1, "maxLength": 255}},
                {"name": "If-Match", "in": "header", "schema": {"type": "string", "pattern": r'^"?[0-9]{1,9}"?$'}},
            ],
            # Required when the body has required fields: an Enrol may be sent without one.
            "requestBody": {"required": bool(components.get(operation.body.__name__, {}).get("required")),
                            "content": {JSON: {"schema": schema}}},
            "responses": {
                "201": {"description": "Appended", "content": {JSON: {"schema": {"type": "object"}}}},
                **_errors(400, 401, 403, 404, 408, 409, 412, 413, 415, 422, 429, 503),
            },
        }
    for path, summary, roles, query in READS:
        paths.setdefault(path, {})["get"] = {
            "summary": summary,
            "security": security,
            "x-roles": sorted(roles),
            "parameters": _path_parameters(path)
            + [{"name": q, "in": "query", "schema": _query_schema(path, q)} for q in query],
            "responses": {"200": {"description": "OK", "content": {JSON: {"schema": {"type": "object"}}}},
                          **_errors(401, 403, 404, 422, 429, 503)},
        }
    paths["/v1/batch"] = {"post": {
        "summary": "NDJSON batch of commands; one result line per input line, in order",
        "security": security, "x-roles": sorted(CHECKOUT),
        # NDJSON is no JSON value, so its schema constrains nothing; an empty body has no lines.
        "requestBody": {"required": False, "content": {NDJSON: {"schema": {"description": "one command object per line"}}}},
        "responses": {"200": {"description": "Results", "content": {NDJSON: {"schema": {"type": "string"}}}},
                      **_errors(401, 403, 408, 413, 415, 429, 503)},
    }}
    paths["/v1/api-keys"] = {"post": {
        "summary": "Create an API key (shown once)", "security": security, "x-roles": ["admin"],
        "requestBody": {"required": True, "content": {JSON: {"schema": schemas[-1]}}},
        "responses": {"201": {"description": "Created", "content": {JSON: {"schema": {"type": "object"}}}},
                      **_errors(400, 401, 403, 408, 413, 415, 422, 429, 503)},
    }}
    paths["/v1/jobs/{name}"] = {"post": {
        "summary": "Run a time job at as_of", "security": security, "x-roles": ["admin"],
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": list(JOBS)}},
                       {"name": "as_of", "in": "query", "schema": _QUERY_SCHEMAS["as_of"]}],
        "responses": {"200": {"description": "Job report", "content": {JSON: {"schema": {"type": "object"}}}},
                      **_errors(401, 403, 404, 422, 429, 503)},
    }}
    for path, summary in (("/healthz", "Liveness"), ("/readyz", "Readiness"), ("/metrics", "Prometheus metrics"),
                          ("/openapi.json", "This document")):
        paths[path] = {"get": {"summary": summary, "responses": {"200": {"description": "OK"}, **_errors(503)}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Loyalty ledger", "version": "1"},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


# -- the application ----------------------------------------------------------------------


def create_app(pool, programme: Programme, clock: Clock = system_clock, settings: Settings | None = None) -> web.Application:
    settings = settings or Settings.from_env()
    app = web.Application(middlewares=[problems_and_metrics], client_max_size=BATCH_MAX_BYTES)
    app[SETTINGS] = settings
    app[LEDGER] = Ledger(EventStore(pool, clock), programme, clock)
    app[METRICS] = Metrics(app[LEDGER])
    app[KEYS] = KeyRing(pool, settings, clock)
    for operation in OPERATIONS:
        app.router.add_route(operation.method, operation.path, command_handler(operation))
    routes = [
        ("POST", "/v1/batch", batch),
        ("GET", "/v1/members/{member_id}", get_member),
        ("GET", "/v1/members/{member_id}/balance", get_balance),
        ("GET", "/v1/members/{member_id}/tier", get_tier),
        ("GET", "/v1/members/{member_id}/coupons", get_coupons),
        ("GET", "/v1/members/{member_id}/events", get_member_events),
        ("GET", "/v1/identities/{type}/{value}", get_identity),
        ("GET", "/v1/events", get_events),
        ("GET", "/v1/audit/verify", audit_verify),
        ("POST", "/v1/api-keys", create_api_key),
        ("POST", "/v1/jobs/{name}", run_job_endpoint),
        ("GET", "/healthz", healthz),
        ("GET", "/readyz", readyz),
        ("GET", "/metrics", metrics_endpoint),
        ("GET", "/openapi.json", openapi_endpoint),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    from projections.http import install as install_projections  # it imports this module

    install_projections(app)
    app.on_startup.append(_seed_admin_key)
    app.on_startup.append(_start_group_commit)
    app.on_cleanup.append(_stop_group_commit)
    return app


async def _start_group_commit(app: web.Application) -> None:
    app[LEDGER].store.start_group_commit()


async def _stop_group_commit(app: web.Application) -> None:
    await app[LEDGER].store.stop_group_commit()


async def _seed_admin_key(app: web.Application) -> None:
    settings = app[SETTINGS]
    if settings.admin_key:
        await app[KEYS].create("admin (LOYALTY_ADMIN_KEY)", "admin", "environment", secret=settings.admin_key)


# -- the command line ------------------------------------------------------------------------


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("LOYALTY_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


async def open_database():
    """The pool on DATABASE_URL or the embedded server, with the schema applied."""
    from ledger.database import apply_schema, create_pool, resolve_database_url

    url = await asyncio.to_thread(resolve_database_url)
    pool = await create_pool(url)
    await apply_schema(pool)
    return url, pool


async def serve(host: str, port: int) -> None:
    url, pool = await open_database()
    programme = load_programme()
    app = create_app(pool, programme)
    keepalive_s = float(os.environ.get("LOYALTY_KEEPALIVE_S", KEEPALIVE_S))
    # lingering_time: after answering a request whose body never came, drain it for 2 s at most, then close.
    runner = web.AppRunner(app, handle_signals=True, shutdown_timeout=30, keepalive_timeout=keepalive_s,
                           lingering_time=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    await app[LEDGER].store.start_listening(lambda: asyncpg.connect(url))
    from projections.http import start_projectors

    projectors = await start_projectors(app, lambda: asyncpg.connect(url))
    log.info("loyalty ledger serving on http://%s:%d (programme version %d)", host, port, programme.version)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    scheduler = asyncio.create_task(run_scheduler(app)) if app[SETTINGS].scheduler else None
    await stop.wait()
    log.info("stopping: draining in-flight requests")
    if scheduler is not None:
        scheduler.cancel()
    await runner.cleanup()
    await projectors.stop()
    await app[LEDGER].store.stop_listening()
    await pool.close()
    log.info("stopped")


async def run_scheduler(app: web.Application) -> None:
    """Run the time jobs once a day, just after midnight in the programme's timezone."""
    ledger = app[LEDGER]
    while True:
        now = ledger.clock()
        local = now.astimezone(ledger.programme.zone)
        next_run = (local + timedelta(days=1)).replace(hour=0, minute=5, second=0, microsecond=0)
        await asyncio.sleep(max((next_run - local).total_seconds(), 1))
        for name in JOBS:
            try:
                report = await run_job(ledger, name, ledger.clock(), actor=f"scheduler:{name}")
                log.info("scheduled job %s appended %d events", name, report["appended"])
            except Exception:
                log.exception("scheduled job %s failed; it runs again tomorrow", name)


async def create_key_cli(role: str, name: str) -> None:
    _url, pool = await open_database()
    try:
        keys = KeyRing(pool, Settings.from_env(), system_clock)
        created = await keys.create(name, role, "command line")
        print(encode_json(created).decode())
    finally:
        await pool.close()


async def verify_cli() -> int:
    from tqdm import tqdm

    _url, pool = await open_database()
    try:
        store = EventStore(pool)
        total = (await store.head())[0]
        with tqdm(total=total, unit="event", desc="verify", file=sys.stderr) as bar:
            report = await store.verify(progress=bar.update)
        print(encode_json(report).decode())
        return 0 if report.ok else 1
    finally:
        await pool.close()


IMPORT_CHUNK_LINES = 2000


def holds_commands(path: str) -> bool:
    """Whether a file holds batch lines (``{"op": ...}``), not an export of envelopes."""
    with open(path, "rb") as lines:
        for line in lines:
            if line.strip():
                try:
                    first = msgspec.json.decode(line)
                except msgspec.DecodeError:
                    return False
                return isinstance(first, dict) and "op" in first
    return False


async def import_commands_cli(path: str) -> int:
    """``loyalty import`` of batch lines: each line a command, exactly as ``POST /v1/batch`` runs it.

    Resumable and idempotent: a line without an ``idempotency_key`` gets one
    derived from its bytes, so running the same file again replays every
    first answer and appends nothing. Prints a count of answers by status and
    the problems of refused lines (to standard error); exit 1 if any line was
    refused.
    """
    from tqdm import tqdm

    _url, pool = await open_database()
    app = create_app(pool, load_programme(), settings=Settings(rate_limit_per_s=None, scheduler=False))
    app[LEDGER].store.start_group_commit()
    principal = Principal("cli", "loyalty import", "admin")
    statuses: dict[int, int] = {}
    try:
        with open(path, "rb") as lines, tqdm(
            total=os.path.getsize(path), unit="B", unit_scale=True, desc="import", file=sys.stderr
        ) as bar:
            chunk: list[tuple[int, bytes]] = []
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    chunk.append((number, line))
                if len(chunk) == IMPORT_CHUNK_LINES:
                    await _import_chunk(app, principal, chunk, statuses)
                    chunk = []
                bar.update(len(line))
            await _import_chunk(app, principal, chunk, statuses)
    finally:
        await app[LEDGER].store.stop_group_commit()
        await pool.close()
    print(encode_json({"lines": sum(statuses.values()), "by_status": {str(k): v for k, v in sorted(statuses.items())}}).decode())
    return 0 if all(status < 400 for status in statuses) else 1


async def _import_chunk(app, principal: Principal, chunk: list[tuple[int, bytes]], statuses: dict[int, int]) -> None:
    parsed = []
    for number, line in chunk:
        batch_line_ = parse_batch_line(number, line)
        if isinstance(batch_line_, BatchLine) and batch_line_.idempotency_key is None:
            derived = f"import:{hashlib.sha256(line.strip()).hexdigest()[:40]}"
            batch_line_ = msgspec.structs.replace(batch_line_, idempotency_key=derived)
        parsed.append(batch_line_)
    for (number, _line), (status, body) in zip(chunk, await run_batch_lines(app, principal, parsed)):
        statuses[status] = statuses.get(status, 0) + 1
        if status >= 400:
            print(f"line {number}: {body.decode()}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loyalty", description="The event-sourced loyalty ledger.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the HTTP service")
    keys = commands.add_parser("keys", help="manage API keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser("create", help="create an API key (printed once)")
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--name", required=True)
    commands.add_parser("verify", help="verify the hash chain of the whole log")
    from projections import cli as projection_cli

    projection_cli.add_commands(commands)
    return parser


# Young collections every this many allocations (Python's default: 700).
GC_YOUNG_OBJECTS = 50_000


def tune_garbage_collector() -> None:
    """Fewer, cheaper collections for a process whose heap is mostly long-lived.

    The member cache and the modules are long-lived; a command allocates a few
    hundred short-lived objects, rarely in cycles. With the default thresholds
    the collector took a third of a batch command's CPU (bench/README.md);
    freezing what start-up made keeps it out of every full collection too.
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG_OBJECTS, 10, 10)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    tune_garbage_collector()
    if args.command == "serve":
        host = os.environ.get("LOYALTY_HOST", "127.0.0.1")
        port = int(os.environ.get("LOYALTY_PORT", "8080"))
        uvloop.run(serve(host, port))
        return 0
    if args.command == "keys":
        asyncio.run(create_key_cli(args.role, args.name))
        return 0
    if args.command == "verify":
        return asyncio.run(verify_cli())
    if args.command == "import" and holds_commands(args.file):
        return asyncio.run(import_commands_cli(args.file))
    from projections import cli as projection_cli

    if args.command in projection_cli.COMMANDS:
        return projection_cli.run(args)
    return 2


if __name__ == "__main__":
    # `python -m service`: run the module as `service`, not as `__main__`, or
    # projections/http.py (which imports `service`) would see other AppKeys.
    import service

    sys.exit(service.main())

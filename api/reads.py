"""Reads computed from a member's own events (always read-your-writes), and the auditors' log reads.

A member's reads take ``min_position`` (the ``position`` a write answered): a read naming a position
this process has applied to its member cache is served from memory; any other read waits for one
shared catch-up with the log first (README, member state cache: the consistency promise).
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

from aiohttp import web

from api.answers import CouponWallet, EventsPage, IdentityOwner
from api.auth import AUDITOR, CHECKOUT, MEMBER_READER, READER
from api.context import LEDGER
from api.decoding import POSITION_MAX, page, path_id, query_int, query_time
from api.problems import NDJSON, HttpProblem, json_response, unexpected_failure
from api.route import Route
from events.catalogue import EVENT_TYPES
from events.codec import encode_json
from ledger.answers import MemberProfile, coupon_view, member_profile
from ledger.commands import IDENTITY_TYPES
from ledger.errors import problem
from ledger.state import COUPON_STATUSES
from ledger.store import MAX_WAIT_MS, EventStore, VerifyReport
from ledger.views import Balance, TierView, balance, tier_view


async def member_state(request: web.Request, at: datetime | None = None):
    ledger = request.app[LEDGER]
    member_id = path_id(request, "member_id")
    min_position = query_int(request, "min_position", 0, 0, POSITION_MAX) or None
    state = await (ledger.state_as_of(member_id, at, min_position) if at is not None
                   else ledger.read(member_id, min_position))
    if not state.enrolled:
        raise HttpProblem(404, "member_not_found", f"member {member_id} does not exist; check the id")
    return state


async def get_member(request: web.Request) -> web.StreamResponse:
    ledger = request.app[LEDGER]
    state = await member_state(request)
    return json_response(member_profile(state, ledger.clock(), ledger.programme))


async def get_balance(request: web.Request) -> web.StreamResponse:
    at = query_time(request, "as_of", request.app[LEDGER].clock())
    state = await member_state(request, at)
    return json_response(balance(state, at))


async def get_tier(request: web.Request) -> web.StreamResponse:
    ledger = request.app[LEDGER]
    at = query_time(request, "as_of", ledger.clock())
    state = await member_state(request, at)
    return json_response(tier_view(state, at, ledger.programme))


async def get_coupons(request: web.Request) -> web.StreamResponse:
    ledger = request.app[LEDGER]
    at = ledger.clock()
    wanted = request.query.get("status")
    if wanted is not None and wanted not in COUPON_STATUSES:
        raise HttpProblem(422, "validation_failed", f"status is one of {', '.join(COUPON_STATUSES)}", field="status")
    state = await member_state(request)
    coupons = [coupon_view(c, at) for c in state.coupons.values()]
    return json_response(CouponWallet(coupons=[c for c in coupons if wanted is None or c.status == wanted]))


async def get_identity(request: web.Request) -> web.StreamResponse:
    identity_type, value = request.match_info["type"], request.match_info["value"]
    if identity_type not in IDENTITY_TYPES or len(value) > 256:
        raise HttpProblem(422, "validation_failed", f"identity type is one of {', '.join(IDENTITY_TYPES)}")
    member_id = await request.app[LEDGER].store.identity_owner(identity_type, value)
    if member_id is None:
        raise HttpProblem(404, "member_not_found", f"no member has {identity_type} {value}")
    return json_response(IdentityOwner(member_id=member_id))


async def get_member_events(request: web.Request) -> web.StreamResponse:
    after, limit = page(request)
    await member_state(request)
    envelopes = await request.app[LEDGER].store.read_stream(path_id(request, "member_id"), after, limit + 1)
    more = len(envelopes) > limit
    envelopes = envelopes[:limit]
    return json_response(EventsPage(events=envelopes, next_after=envelopes[-1].stream_version if more else None))


async def get_events(request: web.Request) -> web.StreamResponse:
    after, limit = page(request)
    wait_ms = query_int(request, "wait_ms", 0, 0, MAX_WAIT_MS)
    types = event_types(request)
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
    return json_response(EventsPage(events=envelopes, next_after=envelopes[-1].position if more else None))


def event_types(request: web.Request) -> list[str] | None:
    """The ``type`` filter of the feed (repeated or comma-separated); an unknown type is refused, not an empty page."""
    given = [t for t in request.query.getall("type", []) for t in t.split(",")]
    if "" in given:  # as an empty after= is: a client that meant a type but sent none is told so
        raise HttpProblem(422, "validation_failed", "type is an event type (or several, comma-separated); "
                          "leave it out for every type", field="type")
    types = given or None
    unknown = sorted(set(given) - EVENT_TYPES.keys())
    if unknown:
        raise HttpProblem(422, "validation_failed", f"unknown event type {unknown[0][:64]!r}; the types are "
                          f"{', '.join(sorted(EVENT_TYPES))}", field="type")
    return types


async def audit_verify(request: web.Request) -> web.StreamResponse:
    store = request.app[LEDGER].store
    if NDJSON in request.headers.get("Accept", ""):
        return await verify_with_progress(request, store)
    return json_response(await store.verify())


VERIFY_PROGRESS_EVERY_S = 0.5


async def verify_with_progress(request: web.Request, store: EventStore) -> web.StreamResponse:
    """The verification as NDJSON: ``{checked, head_position}`` every VERIFY_PROGRESS_EVERY_S while it
    runs (the console's progress bar), then the report. A failure before the first line is an ordinary
    problem answer; after it, the status is sent, so the problem is the last line."""
    head_position, _ = await store.head()
    checked = 0

    def count(events: int) -> None:
        nonlocal checked
        checked += events

    verifying = asyncio.ensure_future(store.verify(count))
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    try:
        while not (await asyncio.wait({verifying}, timeout=VERIFY_PROGRESS_EVERY_S))[0]:
            if not response.prepared:
                await response.prepare(request)
            await response.write(encode_json({"checked": checked, "head_position": head_position}) + b"\n")
        last = encode_json(verifying.result())
    except Exception as failure:
        if not response.prepared:
            raise
        answer = unexpected_failure(failure, "GET /v1/audit/verify", reading=True)
        last = encode_json(problem(answer.status, answer.code, answer.detail))
    finally:
        verifying.cancel()  # the client went away: stop reading the log (a no-op once it is done)
    if not response.prepared:
        await response.prepare(request)
    await response.write(last + b"\n")
    await response.write_eof()
    return response


_IDENTITY_PATH = {
    "type": {"type": "string", "enum": list(IDENTITY_TYPES)},
    "value": {"type": "string", "minLength": 1, "maxLength": 256},
}

ROUTES = [
    Route("GET", "/v1/members/{member_id}", get_member, MEMBER_READER, "Member profile, status, tier, balance",
          query=("min_position",), answer=MemberProfile, operation_id="get_member", from_memory=True),
    Route("GET", "/v1/members/{member_id}/balance", get_balance, READER, "Balance as of a time",
          query=("as_of", "min_position"),
          answer=Balance, operation_id="get_balance", from_memory=True),
    Route("GET", "/v1/members/{member_id}/tier", get_tier, READER, "Tier as of a time", query=("as_of", "min_position"),
          answer=TierView, operation_id="get_tier", from_memory=True),
    Route("GET", "/v1/members/{member_id}/coupons", get_coupons, READER, "Coupon wallet", query=("status", "min_position"),
          answer=CouponWallet, operation_id="get_coupons", from_memory=True),
    Route("GET", "/v1/members/{member_id}/events", get_member_events, AUDITOR, "The member's stream",
          query=("after", "limit"), answer=EventsPage, operation_id="get_member_events"),
    Route("GET", "/v1/identities/{type}/{value}", get_identity, CHECKOUT | READER, "Find a member by identity",
          parameter_schemas=_IDENTITY_PATH, answer=IdentityOwner, operation_id="find_member"),
    Route("GET", "/v1/events", get_events, AUDITOR, "The global feed", query=("after", "limit", "type", "wait_ms"),
          answer=EventsPage, operation_id="get_events"),
    Route("GET", "/v1/audit/verify", audit_verify, AUDITOR,
          "Verify the hash chain (with Accept: application/x-ndjson, progress lines, then the report)",
          answer=VerifyReport, operation_id="verify_chain"),
]

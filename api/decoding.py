"""Reading requests: bodies (bounded in size and time), path ids, query values and command headers."""

from __future__ import annotations

import asyncio
import re
from datetime import datetime

import msgspec
from aiohttp import web

from api.context import LEDGER
from api.problems import JSON, Answered, HttpProblem, validation_problem
from events.codec import encode_json, parse_time
from ledger import commands as cmd
from ledger.application import Outcome, body_hash
from ledger.clock import as_of_problem
from ledger.errors import problem

BODY_MAX_BYTES = 64 * 1024
BATCH_MAX_BYTES = 8 * 1024 * 1024
BATCH_MAX_LINES = 10_000
PAGE_LIMIT_MAX = 1000
BODY_READ_S = 5.0  # a body of at most 64 KiB arrives within this (else 408)
BATCH_READ_S = 60.0  # an 8 MiB batch at >= 140 KB/s
POSITION_MAX = 2**62

ID = re.compile(cmd.ID_PATTERN)


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
    for name, value in path_fields.items():
        given = getattr(command, name)
        if given is not None and given != value:
            raise HttpProblem(422, "path_mismatch", f"{name} {given!r} in the body is not the path's {value!r}; "
                              "leave it out of the body", field=name)
    if path_fields:
        command = msgspec.structs.replace(command, **path_fields)
    return command


def check_id(name: str, value: str, detail: str | None = None) -> str:
    """``value`` if it keeps the id rule, else 422 ``invalid_id`` naming ``name``."""
    if not ID.match(value):
        raise HttpProblem(422, "invalid_id", detail or f"{name} must be 1-64 characters of A-Z a-z 0-9 . _ : -",
                          field=name)
    return value


def path_id(request: web.Request, name: str) -> str:
    return check_id(name, request.match_info[name])


def query_present(request: web.Request, name: str) -> str | None:
    """The query value ``name``, None when absent; an empty one is refused (``after=`` meant something)."""
    raw = request.query.get(name)
    if raw == "":
        raise HttpProblem(422, "validation_failed", f"{name} is empty; leave it out instead", field=name)
    return raw


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = query_present(request, name)
    if raw is None:
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
        moment = parse_time(raw)
    except (ValueError, msgspec.ValidationError):
        raise HttpProblem(422, "validation_failed", f"{name} must be an RFC 3339 time with offset", field=name) from None
    if (why := as_of_problem(moment)) is not None:
        raise HttpProblem(422, "validation_failed", f"{name} must be a time that {why}", field=name)
    return moment


DRY_RUN = web.RequestKey("dry_run", bool)


def query_bool(request: web.Request, name: str) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return False
    if raw not in ("true", "false"):
        raise HttpProblem(422, "validation_failed", f"{name} is true or false", field=name)
    return raw == "true"


def page(request: web.Request) -> tuple[int, int]:
    return query_int(request, "after", 0, 0, POSITION_MAX), query_int(request, "limit", 100, 1, PAGE_LIMIT_MAX)


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


async def decode_command(request: web.Request, operation: str, type_: type, stream_id: str = "", **path_fields: str):
    """The request's command, decoded from its body as ``decode`` does.

    A body refused here (not JSON, a field wrong) is an answer like the ledger's refusals: with an
    Idempotency-Key it is stored, so a retry gets it again and the same key with a corrected body is
    ``idempotency_key_reused`` (CONTRACT §4). A dry run stores nothing.
    """
    body = await read_body(request)
    try:
        return decode(body, type_, **path_fields)
    except HttpProblem as refusal:
        key = idempotency_key(request)
        if key is None or request.get(DRY_RUN, False):
            raise
        outcome = Outcome(refusal.status, encode_json(problem(refusal.status, refusal.code, refusal.detail,
                                                              **refusal.extra)))

        async def refused() -> Outcome:
            return outcome

        fingerprint = body_hash(operation, stream_id, body)
        raise Answered(await request.app[LEDGER].answer_once(stream_id, key, fingerprint, refused)) from None

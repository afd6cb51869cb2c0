"""``POST /v1/batch``: NDJSON lines, each its own command; a member's lines run as one series."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

import msgspec
from aiohttp import web

from api.auth import CHECKOUT, PRINCIPAL, Principal
from api.commands import OPERATIONS, OPERATIONS_BY_NAME, prepare_command
from api.context import LEDGER
from api.decoding import BATCH_MAX_BYTES, BATCH_MAX_LINES, check_id, decode, read_body
from api.problems import NDJSON, HttpProblem, unexpected_failure, validation_problem
from api.route import Route
from events.codec import encode_json
from ledger.application import Request
from ledger.errors import problem


BatchOp = Literal[tuple(op.name for op in OPERATIONS if op.in_batch)]  # type: ignore[misc]


class BatchLine(msgspec.Struct, forbid_unknown_fields=True):
    """One line of a batch: ``body`` is the body its operation's endpoint takes, path ids included."""

    op: BatchOp
    member_id: str | None = None  # absent only for enrol (then the body's member_id, or one made)
    body: Annotated[msgspec.Raw, msgspec.Meta(extra_json_schema={"type": "object"})] = msgspec.field(
        default_factory=lambda: msgspec.Raw(b"{}"))
    idempotency_key: Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern="^[^\x00]*$")] | None = None


class BatchResult(msgspec.Struct):
    """One line of a batch's answer: the line's number (from 1), and the status and body it would get alone."""

    line: int
    status: int
    body: Annotated[msgspec.Raw, msgspec.Meta(extra_json_schema={"type": "object"})]


_results_encoder = msgspec.json.Encoder()


async def batch(request: web.Request) -> web.StreamResponse:
    """NDJSON in, one result line per input line, in order; each line its own command."""
    body = await read_body(request, BATCH_MAX_BYTES, NDJSON)
    payload = await answer_batch(request.app, request[PRINCIPAL], body)
    return web.Response(status=200, body=payload, content_type=NDJSON)


async def answer_batch(app: web.Application, principal: Principal, body: bytes) -> bytes:
    """The NDJSON answer to a batch's NDJSON body (the handler without HTTP: ``bench/batch_inprocess.py`` times it)."""
    lines = [line for line in body.split(b"\n") if line.strip()]
    if len(lines) > BATCH_MAX_LINES:
        raise HttpProblem(413, "batch_too_large", f"{len(lines)} lines; at most {BATCH_MAX_LINES}")
    parsed = [parse_batch_line(n, line) for n, line in enumerate(lines, start=1)]
    results = await run_batch_lines(app, principal, parsed)
    # One encoder call for the whole answer: each line's body is already JSON (msgspec.Raw).
    return _results_encoder.encode_lines([BatchResult(n, status, msgspec.Raw(out))
                                          for n, (status, out) in enumerate(results, start=1)])


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
    operation = OPERATIONS_BY_NAME[parsed.op]  # BatchOp names only operations a batch may run
    if principal.role not in operation.roles:
        raise HttpProblem(403, "forbidden", f"role {principal.role} may not run {parsed.op}")
    member_id = parsed.member_id
    if member_id is not None:
        check_id("member_id", member_id)
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


ROUTES = [
    Route("POST", "/v1/batch", batch, CHECKOUT, "NDJSON batch of commands; one result line per input line, in order",
          body=BatchLine, body_media=NDJSON, answer=BatchResult, answer_media=NDJSON,
          errors=(401, 403, 408, 413, 415, 429, 503), operation_id="batch"),
]

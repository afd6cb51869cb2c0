"""Answers: JSON, problem+json refusals, and what an unexpected exception becomes."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import asyncpg
import msgspec
from aiohttp import web

from events.codec import encode_json
from ledger.application import Outcome
from ledger.commands import ID_PATTERN
from ledger.errors import problem

log = logging.getLogger("loyalty.service")

JSON = "application/json"
PROBLEM_JSON = "application/problem+json"
NDJSON = "application/x-ndjson"


class HttpProblem(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers, self.extra = status, code, detail, headers or {}, extra


class Answered(Exception):
    """An answer given before the handler's own (a stored refusal): sent as it is."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.status)
        self.outcome = outcome


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
_ID_LONGEST = re.compile(r"(?:<= |\{1,)(\d+)")  # the bound in "of length <= 32" or "{1,32}"
_MISSING = "missing required field `"


def validation_problem(error: msgspec.ValidationError) -> HttpProblem:
    """Name the offending field; ids that break the id rule get ``invalid_id``."""
    message = str(error)
    field_path = message.split(_FIELD_AT, 1)[1].rstrip("`") if _FIELD_AT in message else None
    if "unknown field" in message:
        field_path = message.split("`")[1] if "`" in message else field_path
    if _MISSING in message:  # the field that is missing, under the object that misses it
        missing = message.split(_MISSING, 1)[1].split("`", 1)[0]
        field_path = f"{field_path}.{missing}" if field_path else missing
    leaf = (field_path or "").split(".")[-1].split("[")[0]
    named_id = leaf.endswith("_id") or leaf.endswith("_ref")
    # Or any field of the id type: referred_by (a member id), an activity's ref.
    if (("matching regex" in message or "length" in message) and named_id) or ID_PATTERN in message:
        longest = _ID_LONGEST.search(message)  # 64 for most ids; a campaign_id is at most 32
        return HttpProblem(422, "invalid_id", f"{leaf} must be 1-{longest[1] if longest else 64} characters of "
                           "A-Z a-z 0-9 . _ : -", field=field_path)
    return HttpProblem(422, "validation_failed", message, field=field_path)


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

"""The programme's versions over HTTP (CONTRACT §6.1): change it, read the version in force, list versions.

The versions are the ``$programme`` stream, which the ledger reads before
answering, so a read always includes every version committed before it
(``min_position`` is accepted and holds by construction).
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from api import answers
from api.auth import ADMIN, PRINCIPAL, READER
from api.context import LEDGER
from api.decoding import POSITION_MAX, decode_command, idempotency_key, query_int, query_time
from api.problems import json_response, outcome_response
from api.route import Route
from ledger import commands as cmd


async def put_programme(request: web.Request) -> web.StreamResponse:
    command = await decode_command(request, "programme_change", cmd.ChangeProgramme)
    outcome = await request.app[LEDGER].execute_rules(
        "programme_change", command, actor=request[PRINCIPAL].name, idempotency_key=idempotency_key(request)
    )
    return outcome_response(outcome)


async def _read_versions(request: web.Request):
    query_int(request, "min_position", 0, 0, POSITION_MAX)  # checked; reading the stream satisfies it
    ledger = request.app[LEDGER]
    await ledger.refresh_rules()
    return ledger


async def get_programme(request: web.Request) -> web.StreamResponse:
    ledger = await _read_versions(request)
    at = query_time(request, "as_of", ledger.clock())
    return json_response(msgspec.convert(ledger.rules.programmes.version_at(at).view(), answers.ProgrammeVersionView))


async def get_versions(request: web.Request) -> web.StreamResponse:
    ledger = await _read_versions(request)
    return json_response(answers.ProgrammeVersions(versions=[
        answers.ProgrammeVersionEntry(
            version=v.version, effective_from=v.effective_from, recorded_at=v.recorded_at, actor=v.actor
        )
        for v in ledger.rules.programmes.versions
    ]))


ROUTES = [
    Route("PUT", "/v1/programme", put_programme, ADMIN,
          "Add a programme version: the settings named replace the latest version's, from effective_from",
          status=201, body=cmd.ChangeProgramme, answer=answers.ProgrammeChanged, headers=("Idempotency-Key",),
          errors=(400, 401, 403, 408, 413, 415, 422, 429, 503)),
    Route("GET", "/v1/programme", get_programme, READER, "The programme version in force at as_of",
          answer=answers.ProgrammeVersionView, query=("as_of", "min_position")),
    Route("GET", "/v1/programme/versions", get_versions, READER, "Every programme version, in log order",
          answer=answers.ProgrammeVersions, query=("min_position",)),
]

"""Admin operations that are no ledger command: API keys and the time jobs."""

from __future__ import annotations

import logging

import msgspec
from aiohttp import web

from api.answers import CreatedKey, JobReport
from api.auth import ADMIN, KEYS, PRINCIPAL, Role
from api.context import LEDGER
from api.decoding import DRY_RUN, decode, idempotency_key, query_time, read_body
from api.problems import HttpProblem, json_response, outcome_response
from api.route import Route
from events.codec import encode_json
from ledger import commands as cmd
from ledger.application import Outcome, body_hash
from ledger.jobs import JOBS, run_job

log = logging.getLogger("loyalty.service")


class NewKey(msgspec.Struct, forbid_unknown_fields=True):
    name: cmd.Text
    role: Role


async def create_api_key(request: web.Request) -> web.StreamResponse:
    body = decode(await read_body(request), NewKey)
    created = await request.app[KEYS].create(body.name, body.role, request[PRINCIPAL].name)
    return json_response(msgspec.convert(created, CreatedKey), status=201)


async def run_job_endpoint(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in JOBS:
        raise HttpProblem(404, "job_not_found", f"jobs are {', '.join(JOBS)}")
    ledger = request.app[LEDGER]
    as_of = query_time(request, "as_of", ledger.clock())
    key = idempotency_key(request)

    async def run() -> Outcome:
        log.info("job %s at %s started by %s", name, as_of.isoformat(), request[PRINCIPAL].name)
        report = await run_job(ledger, name, as_of, actor=f"job:{name}:{request[PRINCIPAL].name}",
                               dry_run=request[DRY_RUN])
        return Outcome(200, encode_json(msgspec.convert(report, JobReport)))

    if key is None or request[DRY_RUN]:
        return outcome_response(await run())
    # A retry without as_of (now) replays the first run's answer instead of running at a later now.
    fingerprint = body_hash(f"job:{name}", "", request.query.get("as_of", "").encode())
    return outcome_response(await ledger.answer_once("", key, fingerprint, run))


ROUTES = [
    Route("POST", "/v1/api-keys", create_api_key, ADMIN, "Create an API key (shown once)", status=201, body=NewKey,
          errors=(400, 401, 403, 408, 413, 415, 422, 429, 503), answer=CreatedKey, operation_id="create_api_key"),
    Route("POST", "/v1/jobs/{name}", run_job_endpoint, ADMIN, "Run a time job at as_of", query=("as_of",),
          parameter_schemas={"name": {"type": "string", "enum": list(JOBS)}}, answer=JobReport,
          headers=("Idempotency-Key",), operation_id="run_job", dry_run=True),
]

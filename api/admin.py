"""Admin operations that are no ledger command: API keys and the time jobs."""

from __future__ import annotations

import logging

import msgspec
from aiohttp import web

from api.answers import CreatedKey, JobReport
from api.auth import ADMIN, KEYS, PRINCIPAL, Role
from api.context import LEDGER
from api.decoding import DRY_RUN, decode, query_time, read_body
from api.problems import HttpProblem, json_response
from api.route import Route
from ledger import commands as cmd
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
    log.info("job %s at %s started by %s", name, as_of.isoformat(), request[PRINCIPAL].name)
    report = await run_job(ledger, name, as_of, actor=f"job:{name}:{request[PRINCIPAL].name}", dry_run=request[DRY_RUN])
    return json_response(msgspec.convert(report, JobReport))


ROUTES = [
    Route("POST", "/v1/api-keys", create_api_key, ADMIN, "Create an API key (shown once)", status=201, body=NewKey,
          errors=(400, 401, 403, 408, 413, 415, 422, 429, 503), answer=CreatedKey, operation_id="create_api_key"),
    Route("POST", "/v1/jobs/{name}", run_job_endpoint, ADMIN, "Run a time job at as_of", query=("as_of",),
          parameter_schemas={"name": {"type": "string", "enum": list(JOBS)}}, answer=JobReport,
          operation_id="run_job", dry_run=True),
]

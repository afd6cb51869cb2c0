"""Public operations: liveness, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import generate_latest

from api.answers import Status
from api.context import LEDGER, ROUTE_TABLE
from api.middleware import METRICS, RequestTimeout, bounded
from api.openapi import build_openapi
from api.problems import json_response, problem_response
from api.route import Route
from ledger.database import schema_is_current

READY_PROBE_S = 2.0

log = logging.getLogger("loyalty.service")


async def healthz(request: web.Request) -> web.StreamResponse:
    return json_response(Status(status="ok"))


async def readyz(request: web.Request) -> web.StreamResponse:
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
    return json_response(Status(status="ready"))


async def metrics_endpoint(request: web.Request) -> web.StreamResponse:
    metrics = request.app[METRICS]
    try:
        metrics.head.set((await bounded(request.app[LEDGER].store.head(), READY_PROBE_S))[0])
    except Exception:  # the database is away: the other metrics still answer, the head keeps its last value
        log.warning("the log's head could not be read for /metrics", exc_info=True)
    body = generate_latest(metrics.registry)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def openapi_endpoint(request: web.Request) -> web.StreamResponse:
    return json_response(build_openapi(request.app[ROUTE_TABLE]))


ROUTES = [
    Route("GET", "/healthz", healthz, None, "Liveness", answer=Status, operation_id="healthz", errors=(503,)),
    Route("GET", "/readyz", readyz, None, "Readiness: the database reachable, the schema applied", answer=Status,
          operation_id="readyz", errors=(503,)),
    Route("GET", "/metrics", metrics_endpoint, None, "Prometheus metrics", answer_media="text/plain",
          operation_id="metrics", errors=(503,)),
    Route("GET", "/openapi.json", openapi_endpoint, None, "This document", operation_id="openapi", errors=(503,)),
]

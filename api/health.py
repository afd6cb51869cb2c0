"""Public operations: liveness, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import generate_latest

from api.context import LEDGER, ROUTE_TABLE
from api.middleware import METRICS, RequestTimeout, bounded
from api.openapi import build_openapi
from api.problems import json_response, problem_response
from api.route import Route
from ledger.database import schema_is_current

READY_PROBE_S = 2.0


async def healthz(request: web.Request) -> web.StreamResponse:
    return json_response({"status": "ok"})


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
    return json_response({"status": "ready"})


async def metrics_endpoint(request: web.Request) -> web.StreamResponse:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def openapi_endpoint(request: web.Request) -> web.StreamResponse:
    return json_response(build_openapi(request.app[ROUTE_TABLE]))


ROUTES = [
    Route("GET", path, handler, None, summary, answer_media=None, errors=(503,))
    for path, handler, summary in (
        ("/healthz", healthz, "Liveness"),
        ("/readyz", readyz, "Readiness"),
        ("/metrics", metrics_endpoint, "Prometheus metrics"),
        ("/openapi.json", openapi_endpoint, "This document"),
    )
]

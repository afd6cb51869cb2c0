"""The reads served by projections, and their operations (CONTRACT §4).

Each read names the projection that serves it and takes ``min_position``:
it waits (at most ``MIN_POSITION_WAIT_MS``) until that projection has
applied the position a write answered with, else answers 503
``projection_lagging`` with ``Retry-After``: read-your-writes.

``service.create_app`` calls ``install``; this module imports ``service``
for its HTTP helpers, so it is imported from there lazily.
"""

from __future__ import annotations

import os
import re

from aiohttp import web

from ledger.commands import ID_PATTERN
from projections import liability, members, points
from projections.runtime import (
    PROJECTIONS,
    Connect,
    ProjectionMetrics,
    ProjectionRuntime,
    ProjectionService,
    ensure_tables,
)
from service import (
    ADMIN,
    LEDGER,
    METRICS,
    MIN_POSITION_WAIT_MS,
    PAGE_LIMIT_MAX,
    READER,
    HttpProblem,
    allow,
    json_response,
    page,
    path_id,
    query_int,
    query_time,
)

PROJECTION_SERVICE = web.AppKey("projections", ProjectionService)
_ID = re.compile(ID_PATTERN)


def install(app: web.Application) -> None:
    """Register the projection-served reads and operations on the application."""
    ledger = app[LEDGER]
    app[PROJECTION_SERVICE] = ProjectionService(
        ledger.store.pool, ledger.programme, ledger.clock, metrics=ProjectionMetrics(app[METRICS].registry)
    )
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    app.on_startup.append(_ensure_tables)


async def start_projectors(app: web.Application, connect: Connect) -> ProjectionRuntime:
    """Run the projectors in this process (``loyalty serve``) unless ``LOYALTY_PROJECTORS=off``.

    Every process may run them: the leases keep one projector per
    projection active, and a standby takes over when its process dies.
    """
    enabled = os.environ.get("LOYALTY_PROJECTORS", "on").lower() != "off"
    runtime = ProjectionRuntime(connect, app[PROJECTION_SERVICE], names=None if enabled else [])
    await runtime.start()
    return runtime


async def _ensure_tables(app: web.Application) -> None:
    service = app[PROJECTION_SERVICE]
    await ensure_tables(service.pool, service.programme)


async def caught_up(request: web.Request, name: str) -> ProjectionService:
    """Wait until projection ``name`` has applied the request's ``min_position`` (bounded)."""
    service = request.app[PROJECTION_SERVICE]
    min_position = query_int(request, "min_position", 0, 0, 2**62)
    if min_position and not await service.wait_for(name, min_position, MIN_POSITION_WAIT_MS):
        raise HttpProblem(
            503, "projection_lagging",
            f"the {name} projection has not applied position {min_position} yet; retry shortly",
            {"Retry-After": "1"}, projection=name, min_position=min_position,
        )
    return service


@allow(READER)
async def get_ledger(request: web.Request) -> web.StreamResponse:
    member_id = path_id(request, "member_id")
    after_line, limit = page(request)
    service = await caught_up(request, points.NAME)
    if not await service.pool.fetchval(
        "SELECT 1 FROM events WHERE stream_id = $1 AND stream_version = 1", member_id
    ):
        raise HttpProblem(404, "member_not_found", f"member {member_id} does not exist; check the id")
    lines = await points.ledger_page(service.pool, member_id, after_line, limit + 1)
    more = len(lines) > limit
    lines = lines[:limit]
    return json_response({"lines": lines, "next_after": lines[-1]["line"] if more else None})


@allow(READER)
async def get_liability(request: web.Request) -> web.StreamResponse:
    service = request.app[PROJECTION_SERVICE]
    at = query_time(request, "as_of", service.clock())
    await caught_up(request, liability.NAME)
    return json_response(await liability.liability(service.pool, at, service.programme))


@allow(READER)
async def get_segment(request: web.Request) -> web.StreamResponse:
    lifecycle = request.match_info["lifecycle"]
    if lifecycle not in members.LIFECYCLES:
        raise HttpProblem(404, "segment_not_found", f"segments are {', '.join(members.LIFECYCLES)}")
    after = request.query.get("after", "")
    if after and not _ID.match(after):
        raise HttpProblem(422, "invalid_id", "after is a member id: 1-64 characters of A-Z a-z 0-9 . _ : -",
                          field="after")
    limit = query_int(request, "limit", 100, 1, PAGE_LIMIT_MAX)
    service = await caught_up(request, members.NAME)
    now = service.clock()
    listed = await members.segment_page(service.pool, lifecycle, after, limit + 1, now, service.programme)
    more = len(listed) > limit
    listed = listed[:limit]
    return json_response({
        "lifecycle": lifecycle,
        "as_of": now,
        "members": listed,
        "next_after": listed[-1]["member_id"] if more else None,
    })


@allow(READER)
async def get_projections(request: web.Request) -> web.StreamResponse:
    return json_response({"projections": await request.app[PROJECTION_SERVICE].statuses()})


@allow(ADMIN)
async def post_rebuild(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in PROJECTIONS:
        raise HttpProblem(404, "projection_not_found", f"projections are {', '.join(PROJECTIONS)}")
    await request.app[PROJECTION_SERVICE].request_rebuild(name)
    return json_response({"name": name, "state": "rebuilding"}, status=202)


ROUTES = [
    ("GET", "/v1/members/{member_id}/ledger", get_ledger),
    ("GET", "/v1/programme/liability", get_liability),
    ("GET", "/v1/segments/{lifecycle}", get_segment),
    ("GET", "/v1/projections", get_projections),
    ("POST", "/v1/projections/{name}/rebuild", post_rebuild),
]

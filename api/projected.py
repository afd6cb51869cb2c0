"""The reads served by projections, and their operations (CONTRACT §4).

Each read names the projection that serves it and takes ``min_position``:
it waits (at most ``MIN_POSITION_WAIT_MS``) until that projection has
applied the position a write answered with, else answers 503
``projection_lagging`` with ``Retry-After``: read-your-writes.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from api.answers import LedgerLine, LedgerPage, Liability, Projections, RebuildStarted, Segment, SegmentMember
from api.auth import ADMIN, READER
from api.context import LEDGER, PROJECTION_SERVICE, PUBLICATION
from api.decoding import PAGE_LIMIT_MAX, POSITION_MAX, check_id, page, path_id, query_int, query_present, query_time
from api.problems import HttpProblem, json_response
from api.route import Route
from ledger.commands import ID_PATTERN
from ledger.views import LIFECYCLES
from projections import liability, members, points
from projections.runtime import PROJECTIONS, ProjectionService

MIN_POSITION_WAIT_MS = 2000


async def caught_up(request: web.Request, name: str) -> ProjectionService:
    """Wait until projection ``name`` has applied the request's ``min_position`` (bounded)."""
    service = request.app[PROJECTION_SERVICE]
    min_position = query_int(request, "min_position", 0, 0, POSITION_MAX)
    if not min_position:
        return service
    head_position, _hash = await request.app[LEDGER].store.head()
    if min_position > head_position:  # no wait can help: no write has answered with it
        raise HttpProblem(
            422, "min_position_ahead",
            f"min_position {min_position} is past the log's head ({head_position}); pass a position a write answered with",
            field="min_position", head_position=head_position,
        )
    if not await service.wait_for(name, min_position, MIN_POSITION_WAIT_MS):
        raise HttpProblem(
            503, "projection_lagging",
            f"the {name} projection has not applied position {min_position} yet; retry shortly",
            {"Retry-After": "1"}, projection=name, min_position=min_position,
        )
    return service


async def get_ledger(request: web.Request) -> web.StreamResponse:
    member_id = path_id(request, "member_id")
    after_line, limit = page(request)
    service = await caught_up(request, points.NAME)
    if not await service.pool.fetchval(
        "SELECT 1 FROM events WHERE stream_id = $1 AND stream_version = 1", member_id
    ):
        raise HttpProblem(404, "member_not_found", f"member {member_id} does not exist; check the id")
    lines = msgspec.convert(await points.ledger_page(service.pool, member_id, after_line, limit + 1), list[LedgerLine])
    more = len(lines) > limit
    lines = lines[:limit]
    return json_response(LedgerPage(lines=lines, next_after=lines[-1].line if more else None))


async def get_liability(request: web.Request) -> web.StreamResponse:
    service = request.app[PROJECTION_SERVICE]
    at = query_time(request, "as_of", service.clock())
    await caught_up(request, liability.NAME)
    return json_response(msgspec.convert(await liability.liability(service.pool, at, service.programme), Liability))


async def get_segment(request: web.Request) -> web.StreamResponse:
    lifecycle = request.match_info["lifecycle"]
    if lifecycle not in LIFECYCLES:
        raise HttpProblem(404, "segment_not_found", f"segments are {', '.join(LIFECYCLES)}")
    after = query_present(request, "after")
    if after is not None:
        check_id("after", after, "after is a member id: 1-64 characters of A-Z a-z 0-9 . _ : -")
    limit = query_int(request, "limit", 100, 1, PAGE_LIMIT_MAX)
    service = await caught_up(request, members.NAME)
    now = service.clock()
    listed = msgspec.convert(
        await members.segment_page(service.pool, lifecycle, after or "", limit + 1, now, service.programme),
        list[SegmentMember],
    )
    more = len(listed) > limit
    listed = listed[:limit]
    return json_response(Segment(lifecycle=lifecycle, as_of=now, members=listed,
                                 next_after=listed[-1].member_id if more else None))


async def get_projections(request: web.Request) -> web.StreamResponse:
    listed = await request.app[PROJECTION_SERVICE].statuses()
    if PUBLICATION in request.app:  # publication to NATS (CONTRACT §7) is configured
        listed.append(await request.app[PUBLICATION].read())
    return json_response(msgspec.convert({"projections": listed}, Projections))


async def post_rebuild(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in PROJECTIONS:
        raise HttpProblem(404, "projection_not_found", f"projections are {', '.join(PROJECTIONS)}")
    await request.app[PROJECTION_SERVICE].request_rebuild(name)
    return json_response(RebuildStarted(name=name, state="rebuilding"), status=202)


ROUTES = [
    Route("GET", "/v1/members/{member_id}/ledger", get_ledger, READER, "The member's points trail",
          query=("after", "limit", "min_position"), answer=LedgerPage, operation_id="get_ledger"),
    Route("GET", "/v1/programme/liability", get_liability, READER, "Points liability as of a time, by month",
          query=("as_of", "min_position"), answer=Liability, operation_id="get_liability"),
    Route("GET", "/v1/segments/{lifecycle}", get_segment, READER, "Members in a lifecycle, by member id",
          query=("after", "limit", "min_position"),
          parameter_schemas={"lifecycle": {"type": "string", "enum": list(LIFECYCLES)},
                             # segments page by member id; an empty one is refused, as on every page
                             "after": {"type": "string", "pattern": ID_PATTERN}},
          answer=Segment, operation_id="get_segment"),
    Route("GET", "/v1/projections", get_projections, READER, "Projection positions, lag and state",
          answer=Projections, operation_id="get_projections"),
    Route("POST", "/v1/projections/{name}/rebuild", post_rebuild, ADMIN,
          "Rebuild a projection beside the live one, then swap", status=202,
          parameter_schemas={"name": {"type": "string", "enum": list(PROJECTIONS)}},
          errors=(401, 403, 404, 429, 503), answer=RebuildStarted, operation_id="rebuild_projection"),
]

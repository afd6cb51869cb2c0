"""A route descriptor: what the router serves and what /openapi.json says about it, in one value.

``api.routes.ROUTES`` lists them; ``api.app.create_app`` registers each (the
handler wrapped in ``allow(roles)`` unless the route is public) and
``api.openapi.build_openapi`` describes the same list, so a route can never
be served without being documented, nor documented with other roles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from api.auth import Handler
from api.problems import JSON


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    roles: frozenset[str] | None  # None: public (no key)
    summary: str
    status: int = 200  # the success answer's status
    body: Any = None  # the msgspec type of the body, or None for no body
    body_media: str = JSON
    answer: Any = None  # the msgspec type of the success answer; None: a JSON object
    answer_media: str | None = JSON  # None: not JSON (metrics) or not described
    query: tuple[str, ...] = ()  # query parameters, by name (schemas: api.openapi.QUERY_SCHEMAS)
    # Parameters (path or query) whose schema is not the usual one for their name (a path's is an id).
    parameter_schemas: dict[str, Any] = field(default_factory=dict)
    headers: tuple[str, ...] = ()  # request headers it reads: Idempotency-Key, If-Match
    errors: tuple[int, ...] = (401, 403, 404, 422, 429, 503)
    operation_id: str | None = None
    # It appends and takes ?dry_run=true (CONTRACT §6.5): its handler reads request[DRY_RUN].
    dry_run: bool = False
    # It may answer from memory (a member read): its first step runs in the request's own task, with no
    # task of its own unless it waits (api.middleware.bounded, which says what that step must not do).
    from_memory: bool = False

"""The OpenAPI 3.1 document, built from the route table and the msgspec types the handlers decode."""

from __future__ import annotations

import re
from typing import Any, Iterable

import msgspec

from api.decoding import PAGE_LIMIT_MAX, POSITION_MAX
from api.problems import JSON, NDJSON, PROBLEM_JSON
from api.route import Route
from ledger.commands import ID_PATTERN
from ledger.state import COUPON_STATUSES
from ledger.store import MAX_WAIT_MS

# What the handlers accept, so that generated "valid" requests are valid (tests/test_schemathesis.py).
QUERY_SCHEMAS = {
    "as_of": {"type": "string", "format": "date-time"},
    "status": {"type": "string", "enum": list(COUPON_STATUSES)},
    "after": {"type": "integer", "minimum": 0, "maximum": POSITION_MAX},
    "limit": {"type": "integer", "minimum": 1, "maximum": PAGE_LIMIT_MAX},
    "type": {"type": "string"},
    "wait_ms": {"type": "integer", "minimum": 0, "maximum": MAX_WAIT_MS},
    "min_position": {"type": "integer", "minimum": 0, "maximum": POSITION_MAX},
    "dry_run": {"type": "boolean", "description": "true: decide and answer, append nothing (CONTRACT §6.5)"},
}
HEADER_SCHEMAS = {
    "Idempotency-Key": {"type": "string", "minLength": 1, "maxLength": 255},
    "If-Match": {"type": "string", "pattern": r'^"?[0-9]{1,9}"?$'},
}
ID_SCHEMA = {"type": "string", "pattern": ID_PATTERN}
PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {k: {"type": "integer" if k == "status" else "string"} for k in ("type", "title", "status", "detail", "code")},
}
_PROBLEM = {"description": "A refusal", "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
_DESCRIPTIONS = {200: "OK", 201: "Created", 202: "Accepted"}


def build_openapi(routes: Iterable[Route]) -> dict[str, Any]:
    routes = list(routes)
    types = list(dict.fromkeys(t for route in routes for t in (route.body, route.answer) if t is not None))
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    schema_of = dict(zip(types, schemas))
    components["Problem"] = PROBLEM_SCHEMA
    paths: dict[str, Any] = {}
    for route in routes:
        paths.setdefault(_template(route.path), {})[route.method.lower()] = _operation(route, schema_of, components)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Loyalty ledger", "version": "1"},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _operation(route: Route, schema_of: dict[Any, Any], components: dict[str, Any]) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": route.summary}
    if route.operation_id:
        operation["operationId"] = route.operation_id
    if route.roles is not None:
        operation["security"] = [{"bearer": []}]
        operation["x-roles"] = sorted(route.roles)
    parameters = _parameters(route)
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None:
        # Required when the body has required fields: an Enrol may be sent without one; an empty batch has no lines.
        required = route.body_media != NDJSON and bool(components.get(route.body.__name__, {}).get("required"))
        operation["requestBody"] = {"required": required,
                                    "content": _content(route.body_media, schema_of[route.body])}
    success: dict[str, Any] = {"description": _DESCRIPTIONS.get(route.status, "OK")}
    if route.answer_media is not None:
        success["content"] = _content(route.answer_media, schema_of.get(route.answer, {"type": "object"}))
    operation["responses"] = {str(route.status): success, **{str(status): _PROBLEM for status in route.errors}}
    return operation


def _content(media: str, schema: dict[str, Any]) -> dict[str, Any]:
    if media == NDJSON:
        # NDJSON is no JSON value: each line's JSON is x-item-schema (OpenAPI 3.2 calls it
        # itemSchema). The text itself is any text: a line that breaks the item schema gets
        # its own problem in the answer, the batch is not refused for it.
        return {NDJSON: {"schema": {"description": f"one {_name(schema)} as JSON per line"},
                         "x-item-schema": schema}}
    if media != JSON:
        return {media: {"schema": {"type": "string"}}}
    return {JSON: {"schema": schema}}


def _name(schema: dict[str, Any]) -> str:
    return schema.get("$ref", "value").rsplit("/", 1)[-1]


def _template(path: str) -> str:
    """A route's path as OpenAPI writes it: ``{page}``, not aiohttp's ``{page:.*}`` with its pattern."""
    return re.sub(r"{(\w+):[^}]*}", r"{\1}", path)


def _parameters(route: Route) -> list[dict[str, Any]]:
    overrides = route.parameter_schemas
    path = [{"name": name, "in": "path", "required": True, "schema": overrides.get(name, ID_SCHEMA)}
            for name in re.findall(r"{(\w+)}", _template(route.path))]
    query = [{"name": name, "in": "query", "schema": overrides[name] if name in overrides else QUERY_SCHEMAS[name]}
             for name in route.query + (("dry_run",) if route.dry_run else ())]
    headers = [{"name": name, "in": "header", "schema": HEADER_SCHEMAS[name]} for name in route.headers]
    return path + query + headers

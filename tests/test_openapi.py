"""/openapi.json describes every route the application serves, with the roles it enforces."""

from __future__ import annotations

from api.app import create_app
from api.context import ROUTE_TABLE
from api.openapi import build_openapi
from ledger.programme import Programme
from ledger.settings import Settings


def served_and_documented():
    app = create_app(None, Programme(), settings=Settings(rate_limit_per_s=None))
    served = {(route.method, route.resource.canonical): getattr(route.handler, "roles", None)
              for route in app.router.routes() if route.method != "HEAD"}
    document = build_openapi(app[ROUTE_TABLE])  # what GET /openapi.json answers
    documented = {(method.upper(), path): frozenset(operation["x-roles"]) if "x-roles" in operation else None
                  for path, operations in document["paths"].items() for method, operation in operations.items()}
    return served, documented


def test_every_registered_route_is_documented_with_the_roles_it_enforces():
    served, documented = served_and_documented()
    assert served.keys() - documented.keys() == set(), "a route the document does not describe"
    assert documented.keys() - served.keys() == set(), "the document describes a route the application lacks"
    assert served == documented
    assert documented[("POST", "/v1/projections/{name}/rebuild")] == {"admin"}

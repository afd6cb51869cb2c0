"""What the application holds for its handlers: the ledger, the settings, the projections and the route table."""

from __future__ import annotations

from aiohttp import web

from ledger.application import Ledger
from ledger.settings import Settings
from projections.runtime import ProjectionService

LEDGER = web.AppKey("ledger", Ledger)
SETTINGS = web.AppKey("settings", Settings)
PROJECTION_SERVICE = web.AppKey("projections", ProjectionService)
ROUTE_TABLE = web.AppKey("routes", list)  # the Routes the application serves: /openapi.json describes them

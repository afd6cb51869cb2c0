"""What the application holds for its handlers: the ledger, the settings, the projections, the publication
status and the route table."""

from __future__ import annotations

from aiohttp import web

from ledger.application import Ledger
from ledger.settings import Settings
from projections.publisher import PublicationStatus
from projections.runtime import ProjectionService

LEDGER = web.AppKey("ledger", Ledger)
SETTINGS = web.AppKey("settings", Settings)
PROJECTION_SERVICE = web.AppKey("projections", ProjectionService)
PUBLICATION = web.AppKey("publication", PublicationStatus)  # only with LOYALTY_NATS_URL
ROUTE_TABLE = web.AppKey("routes", list)  # the Routes the application serves: /openapi.json describes them

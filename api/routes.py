"""The route table: every route the service serves, one feature module at a time.

A feature adds a module under ``api/`` with a ``ROUTES`` list of ``Route``
and adds it here; ``create_app`` registers these and /openapi.json describes
these, so nothing else needs to know about it.
"""

from __future__ import annotations

from api import activities, admin, batch, campaigns, commands, console, health, programme, projected, reads, simulations
from api.route import Route

# aiohttp tries the routes under one path prefix (every /v1/members/{member_id}/... route) one regex
# after another in this order: the member reads, the most frequent requests, come first.
ROUTES: list[Route] = [
    *reads.ROUTES,
    *commands.ROUTES,
    *batch.ROUTES,
    *activities.ROUTES,
    *projected.ROUTES,
    *admin.ROUTES,
    *programme.ROUTES,
    *campaigns.ROUTES,
    *simulations.ROUTES,
    *health.ROUTES,
    *console.ROUTES,
]

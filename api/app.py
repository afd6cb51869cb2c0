"""The aiohttp application: the ledger, keys, metrics and projections wired to the route table."""

from __future__ import annotations

from aiohttp import web

from api.auth import KEYS, Handler, KeyRing, allow
from api.context import LEDGER, PROJECTION_SERVICE, PUBLICATION, ROUTE_TABLE, SETTINGS
from api.decoding import BATCH_MAX_BYTES, DRY_RUN, query_bool
from api.middleware import FROM_MEMORY, METRICS, Metrics, problems_and_metrics
from api.problems import HttpProblem
from api.route import Route
from api.routes import ROUTES
from ledger.application import Ledger
from ledger.clock import Clock, system_clock
from ledger.programme import Programme
from ledger.settings import Settings
from ledger.store import EventStore
from projections.publisher import PublicationStatus
from projections.runtime import ProjectionMetrics, ProjectionService, ensure_tables


def create_app(
    pool, programme: Programme, clock: Clock = system_clock, settings: Settings | None = None,
    routes: list[Route] = ROUTES,
) -> web.Application:
    settings = settings or Settings()
    app = web.Application(middlewares=[problems_and_metrics], client_max_size=BATCH_MAX_BYTES)
    app[SETTINGS] = settings
    app[LEDGER] = Ledger(
        EventStore(pool, clock), programme, clock, cache_events_max=settings.cache_events_max,
        programme_file_given=settings.programme_path is not None,
    )
    app[METRICS] = Metrics(app[LEDGER])
    app[KEYS] = KeyRing(pool, settings, clock)
    app[PROJECTION_SERVICE] = ProjectionService(pool, programme, clock, metrics=ProjectionMetrics(app[METRICS].registry))
    if settings.nats_url is not None:
        app[PUBLICATION] = PublicationStatus(pool, clock, app[METRICS].registry)
    app[ROUTE_TABLE] = routes
    from_memory = set()
    for route in routes:
        handler = _dry_runs(route)
        handler = handler if route.roles is None else allow(route.roles)(handler)
        app.router.add_route(route.method, route.path, handler)
        if route.from_memory:
            from_memory.add(handler)
    app[FROM_MEMORY] = frozenset(from_memory)
    app.on_startup.append(_ensure_projection_tables)
    app.on_startup.append(_seed_admin_key)
    app.on_startup.append(_start_group_commit)
    app.on_startup.append(_seed_programme)
    app.on_startup.append(_follow_log)
    app.on_cleanup.append(_stop_group_commit)
    app.on_cleanup.append(_stop_following)
    return app


def _dry_runs(route: Route) -> Handler:
    """The one place ``?dry_run`` is read (CONTRACT §6.5): a route that takes it finds it in
    ``request[DRY_RUN]``; any other write refuses it (422) rather than doing for real what was asked
    as a trial (``PUT /v1/programme``, the batch, keys, jobs)."""
    if route.method == "GET":
        return route.handler

    async def handle(request: web.Request) -> web.StreamResponse:
        request[DRY_RUN] = query_bool(request, "dry_run")
        if request[DRY_RUN] and not route.dry_run:
            raise HttpProblem(422, "validation_failed", f"{route.method} {route.path} has no dry run", field="dry_run")
        return await route.handler(request)

    return handle


async def _start_group_commit(app: web.Application) -> None:
    app[LEDGER].store.start_group_commit()


async def _stop_group_commit(app: web.Application) -> None:
    await app[LEDGER].store.stop_group_commit()


async def _seed_programme(app: web.Application) -> None:
    """Version 1 on an empty log; the given file as the next version when it differs (CONTRACT §6.1)."""
    await app[LEDGER].refresh_rules()


async def _follow_log(app: web.Application) -> None:
    """Reads from the member cache (``Ledger.read``), from before the first request."""
    await app[LEDGER].follow_log()


async def _stop_following(app: web.Application) -> None:
    await app[LEDGER].stop_following()


async def _seed_admin_key(app: web.Application) -> None:
    settings = app[SETTINGS]
    if settings.admin_key:
        await app[KEYS].create("admin (LOYALTY_ADMIN_KEY)", "admin", "environment", secret=settings.admin_key)


async def _ensure_projection_tables(app: web.Application) -> None:
    service = app[PROJECTION_SERVICE]
    await ensure_tables(service.pool, service.programme)


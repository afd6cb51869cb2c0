"""The composition root: settings, the wiring of a serving process, and ``main``.

``loyalty serve`` is here; the HTTP edge is ``api/`` (``api.app.create_app``
and the route table), every other command is ``cli/``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
from datetime import timedelta
from typing import Any, Awaitable, Callable

import asyncpg
from aiohttp import web

from api.app import create_app
from api.context import LEDGER, PROJECTION_SERVICE, PUBLICATION, SETTINGS
from cli import commands
from cli.session import programme_setting, stop_on_signals
from ledger.database import open_database
from ledger.application import Ledger
from ledger.jobs import Scheduler
from ledger.settings import Settings, SettingsError
from projections.publisher import Publisher, PublisherConfig
from projections.runtime import CATCH_UP_BATCH_EVENTS_MAX, Connect, ProjectionRuntime

log = logging.getLogger("loyalty.service")

EXIT_BAD_SETTINGS = 2  # as argparse exits on a bad command line


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


async def serve(settings: Settings) -> None:
    programme = programme_setting(settings.programme_path)  # first: a mistake in it is told at once
    url, pool = await open_database(settings.database_url)
    app = create_app(pool, programme, settings=settings)
    # lingering_time: after answering a request whose body never came, drain it for 2 s at most, then close.
    runner = web.AppRunner(app, handle_signals=True, shutdown_timeout=30, keepalive_timeout=settings.keepalive_s,
                           lingering_time=2.0)
    await runner.setup()
    await app[LEDGER].store.start_listening(lambda: asyncpg.connect(url))
    projectors = await start_projectors(app, lambda: asyncpg.connect(url))
    publication = start_publication(app, lambda: asyncpg.connect(url))
    # The port opens last: a service that answers /readyz has finished starting (the projection tables
    # included), so a database failing after that never meets a start-up step that cannot retry.
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    ledger = app[LEDGER]
    log.info("loyalty ledger serving on http://%s:%d (programme version %d in force)", settings.host, settings.port,
             ledger.programme_at(ledger.clock()).version)
    stop = stop_on_signals()  # after runner.setup(), whose own handlers it replaces
    background = background_tasks(app[LEDGER], settings, url)
    await stop.wait()
    log.info("stopping: draining in-flight requests")
    for task in background:
        task.cancel()
    await runner.cleanup()
    for task in publication:
        task.cancel()
    await asyncio.gather(*publication, return_exceptions=True)
    await projectors.stop()
    await app[LEDGER].store.stop_listening()
    await pool.close()
    log.info("stopped")


async def start_projectors(app: web.Application, connect: Connect) -> ProjectionRuntime:
    """Run the projectors in this process (``loyalty serve``) unless ``LOYALTY_PROJECTORS=off``.

    Every process may run them: the leases keep one projector per
    projection active, and a standby takes over when its process dies.
    """
    names = None if app[SETTINGS].projectors else []
    runtime = ProjectionRuntime(connect, app[PROJECTION_SERVICE], names=names,
                                catch_up_batch_size=CATCH_UP_BATCH_EVENTS_MAX)
    await runtime.start()
    return runtime


def start_publication(app: web.Application, connect: Connect) -> list[asyncio.Task]:
    """With ``LOYALTY_NATS_URL``: the publication gauges, and a publisher unless ``LOYALTY_PUBLISHER=off``.

    Every process may run one: the lease keeps one publishing, a standby takes
    over when its process dies. A publisher that cannot publish says why in its
    state and keeps retrying; it never ends the service.
    """
    settings = app[SETTINGS]
    if settings.nats_url is None:
        return []
    tasks = [asyncio.create_task(app[PUBLICATION].monitor(), name="publication:monitor")]
    if settings.publisher:
        publisher = Publisher(connect, PublisherConfig(url=settings.nats_url))
        tasks.append(asyncio.create_task(publisher.run(), name="publication:publisher"))
    return tasks


async def every(interval_s: float, work: Callable[[], Awaitable[Any]], what: str) -> None:
    """Run ``work`` now and every ``interval_s``; a failure is logged and the next round comes all the same."""
    while True:
        try:
            await work()
        except Exception:
            log.warning("%s failed; trying again in %g s", what, interval_s, exc_info=True)
        await asyncio.sleep(interval_s)


def background_tasks(ledger: Ledger, settings: Settings, url: str) -> list[asyncio.Task]:
    """What every ``loyalty serve`` runs beside the requests; none of it holds up an append."""
    retention = timedelta(days=settings.idempotency_days)
    tasks = [
        # Idempotency-Key answers live days: pruning hourly keeps each delete small.
        asyncio.create_task(every(3600, lambda: ledger.prune_idempotency_answers(retention),
                                  "pruning Idempotency-Key answers")),
    ]
    if settings.scheduler:
        tasks.append(asyncio.create_task(Scheduler(ledger, lambda: asyncpg.connect(url)).run()))
    return tasks


# Young collections every this many allocations (Python's default: 700).
GC_YOUNG_OBJECTS = 50_000


def tune_garbage_collector() -> None:
    """Fewer, cheaper collections for a process whose heap is mostly long-lived.

    The member cache and the modules are long-lived; a command allocates a few
    hundred short-lived objects, rarely in cycles. With the default thresholds
    the collector took a third of a batch command's CPU (bench/README.md);
    freezing what start-up made keeps it out of every full collection too.
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG_OBJECTS, 10, 10)


def main(argv: list[str] | None = None) -> int:
    args = commands.build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as refused:
        print(f"loyalty: {refused}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    configure_logging(settings)
    tune_garbage_collector()
    command = serve_command if args.command == "serve" else commands.COMMANDS[args.command]
    return commands.run(command, args, settings)


async def serve_command(args: argparse.Namespace, settings: Settings) -> int:
    await serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())

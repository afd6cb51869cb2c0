"""``loyalty publish``: a publication worker (CONTRACT §7), beside or instead of serve's publisher."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import asyncpg

from cli.session import database, stop_on_signals
from ledger.settings import Settings
from projections.publisher import Publisher, PublisherConfig

EXIT_NOT_CONFIGURED = 2

log = logging.getLogger("loyalty.publish")


def add_commands(commands: argparse._SubParsersAction) -> None:
    commands.add_parser("publish", help="publish the log to NATS JetStream (LOYALTY_NATS_URL) until stopped")


async def publish(args: argparse.Namespace, settings: Settings) -> int:
    """Runs until SIGTERM or SIGINT; the lease makes it a standby while another publisher leads."""
    if settings.nats_url is None:
        print("loyalty publish: set LOYALTY_NATS_URL (e.g. nats://127.0.0.1:4222)", file=sys.stderr)
        return EXIT_NOT_CONFIGURED
    stop = stop_on_signals()
    async with database(settings) as (url, _pool, _programme):
        publisher = Publisher(lambda: asyncpg.connect(url), PublisherConfig(url=settings.nats_url))
        task = asyncio.create_task(publisher.run(), name="publication:publisher")
        log.info("publication worker started: it publishes to %s while it holds the lease, and stands by "
                 "while another publisher does", publisher.config.stream)
        await stop.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return 0


COMMANDS = {"publish": publish}

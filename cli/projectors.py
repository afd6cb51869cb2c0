"""The projections' commands: ``replay`` (the auditors' check), ``rebuild`` and ``project`` (a worker)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import asyncpg
from tqdm import tqdm

from cli import replay as replay_module
from cli.session import database, stop_on_signals
from cli.usage import time_argument
from events.codec import encode_json
from ledger.clock import system_clock
from ledger.settings import Settings
from projections.runtime import (
    CATCH_UP_BATCH_EVENTS_MAX,
    PROJECTIONS,
    ProjectionRuntime,
    ProjectionService,
    projection,
    request_rebuild,
    statuses,
)

# How often `loyalty rebuild` looks whether the swap happened; the command ends at the first look after
# it, so half of this is lost on average (a rebuild of members over 300k events takes 3-4 s).
REBUILD_POLL_S = 0.1


def add_commands(commands: argparse._SubParsersAction) -> None:
    replay_ = commands.add_parser("replay", help="recompute balances and tiers from the log; compare with the projections")
    replay_.add_argument("--as-of", type=time_argument, help="RFC 3339 time (default: now)")
    replay_.add_argument("--member", help="replay one member only")
    rebuild_ = commands.add_parser("rebuild", help="rebuild a projection beside the live one, then swap")
    rebuild_.add_argument("name", choices=sorted(PROJECTIONS))
    project_ = commands.add_parser("project", help="run the projectors (a worker beside or instead of serve's)")
    project_.add_argument("--only", action="append", choices=sorted(PROJECTIONS), help="run only these projections")


async def replay(args: argparse.Namespace, settings: Settings) -> int:
    as_of = args.as_of or system_clock()
    async with database(settings) as (_url, pool, programme):
        total = 1 if args.member else await replay_module.count_members(pool)
        with tqdm(total=total, unit="member", desc="replay", file=sys.stderr) as bar:
            report = await replay_module.replay(pool, programme, as_of, args.member, progress=bar.update)
    for line in report.mismatches:
        print(line)
    print(report.summary())
    return 0 if report.ok else 1


async def rebuild(args: argparse.Namespace, settings: Settings) -> int:
    """Request the rebuild and help run it: whichever process holds the lease does the work."""
    async with database(settings) as (url, pool, programme):
        await request_rebuild(pool, args.name)
        service = ProjectionService(pool, programme, system_clock)
        runtime = ProjectionRuntime(lambda: asyncpg.connect(url), service, names=[args.name],
                                    catch_up_batch_size=CATCH_UP_BATCH_EVENTS_MAX)
        await runtime.start()
        try:
            with tqdm(unit="event", desc=f"rebuild {args.name}", file=sys.stderr) as bar:
                while (status := await _status(pool, args.name)).get("rebuild"):
                    bar.total = status["rebuild"]["target_position"]
                    bar.n = status["rebuild"]["position"]
                    bar.refresh()
                    await asyncio.sleep(REBUILD_POLL_S)
        finally:
            await runtime.stop()
        print(encode_json(await _status(pool, args.name)).decode())
    return 0


async def _status(pool, name: str) -> dict[str, Any]:
    projection(name)
    return next(s for s in await statuses(pool) if s["name"] == name)


async def project(args: argparse.Namespace, settings: Settings) -> int:
    """The projector worker: runs until SIGTERM or SIGINT."""
    stop = stop_on_signals()
    async with database(settings) as (url, pool, programme):
        service = ProjectionService(pool, programme, system_clock)
        runtime = ProjectionRuntime(lambda: asyncpg.connect(url), service, names=args.only,
                                    catch_up_batch_size=CATCH_UP_BATCH_EVENTS_MAX)
        await runtime.start()
        await stop.wait()
        await runtime.stop()
    return 0


COMMANDS = {"replay": replay, "rebuild": rebuild, "project": project}

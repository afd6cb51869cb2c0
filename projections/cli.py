"""The auditors' and operators' commands: replay, export, import, rebuild, project.

``service.build_parser`` adds these with ``add_commands`` and ``service.main``
runs them with ``run``. Long runs show a tqdm progress bar on standard
error, so standard output stays clean for the data (export) or the verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from datetime import datetime
from typing import Any

import asyncpg
import uvloop
from tqdm import tqdm

from events.codec import encode_json, parse_time
from ledger.clock import system_clock
from projections import replay as replay_module
from projections import transfer
from projections.runtime import (
    PROJECTIONS,
    ProjectionRuntime,
    ProjectionService,
    ensure_tables,
    projection,
    request_rebuild,
    statuses,
)

COMMANDS = ("replay", "export", "import", "rebuild", "project")
REBUILD_POLL_S = 0.5


def _time(text: str) -> datetime:
    try:
        return parse_time(text)
    except Exception:
        raise argparse.ArgumentTypeError(f"{text!r} is not an RFC 3339 time with an offset") from None


def add_commands(commands: argparse._SubParsersAction) -> None:
    replay = commands.add_parser("replay", help="recompute balances and tiers from the log; compare with the projections")
    replay.add_argument("--as-of", type=_time, help="RFC 3339 time (default: now)")
    replay.add_argument("--member", help="replay one member only")
    export = commands.add_parser("export", help="write the log as JSON lines or CSV (standard output by default)")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument("--after", type=int, default=0, help="start after this position")
    export.add_argument("--out", help="write to this file instead of standard output")
    import_ = commands.add_parser(
        "import", help="bulk-import batch command lines ({\"op\", ...}) or an export of envelopes (resumable, idempotent)"
    )
    import_.add_argument("file")
    rebuild = commands.add_parser("rebuild", help="rebuild a projection beside the live one, then swap")
    rebuild.add_argument("name", choices=sorted(PROJECTIONS))
    project = commands.add_parser("project", help="run the projectors (a worker beside or instead of serve's)")
    project.add_argument("--only", action="append", choices=sorted(PROJECTIONS), help="run only these projections")


def run(args: argparse.Namespace) -> int:
    command = {"replay": replay, "export": export, "import": import_file, "rebuild": rebuild, "project": project}
    return uvloop.run(command[args.command](args))


@contextlib.asynccontextmanager
async def _database():
    from ledger.programme import load_programme
    from service import open_database  # service imports this module's caller lazily too

    url, pool = await open_database()
    programme = load_programme()
    try:
        await ensure_tables(pool, programme)
        yield url, pool, programme
    finally:
        await pool.close()


async def replay(args: argparse.Namespace) -> int:
    as_of = args.as_of or system_clock()
    async with _database() as (_url, pool, programme):
        total = 1 if args.member else await replay_module.count_members(pool)
        with tqdm(total=total, unit="member", desc="replay", file=sys.stderr) as bar:
            report = await replay_module.replay(pool, programme, as_of, args.member, progress=bar.update)
    for line in report.mismatches:
        print(line)
    print(report.summary())
    return 0 if report.ok else 1


async def export(args: argparse.Namespace) -> int:
    async with _database() as (_url, pool, _programme):
        head = await pool.fetchval("SELECT position FROM event_head")
        out = open(args.out, "w", encoding="utf-8", newline="") if args.out else sys.stdout
        try:
            with tqdm(total=max(head - args.after, 0), unit="event", desc="export", file=sys.stderr) as bar:
                await transfer.export(pool, out, args.format, args.after, progress=bar.update)
        finally:
            if args.out:
                out.close()
    return 0


async def import_file(args: argparse.Namespace) -> int:
    async with _database() as (_url, pool, _programme):
        with open(args.file, "rb") as lines, tqdm(
            total=os.path.getsize(args.file), unit="B", unit_scale=True, desc="import", file=sys.stderr
        ) as bar:
            try:
                report = await transfer.import_lines(pool, lines, progress=bar.update)
            except transfer.ImportRefused as refused:
                print(f"import refused: {refused}", file=sys.stderr)
                return 1
    print(encode_json(report).decode())
    return 0


async def rebuild(args: argparse.Namespace) -> int:
    """Request the rebuild and help run it: whichever process holds the lease does the work."""
    async with _database() as (url, pool, programme):
        await request_rebuild(pool, args.name)
        service = ProjectionService(pool, programme, system_clock)
        runtime = ProjectionRuntime(lambda: asyncpg.connect(url), service, names=[args.name])
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


async def project(args: argparse.Namespace) -> int:
    """The projector worker: runs until SIGTERM or SIGINT."""
    async with _database() as (url, pool, programme):
        service = ProjectionService(pool, programme, system_clock)
        runtime = ProjectionRuntime(lambda: asyncpg.connect(url), service, names=args.only)
        await runtime.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runtime.stop()
    return 0

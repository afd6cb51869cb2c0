"""The log's own commands: ``verify`` (the hash chain), ``export``, and ``import`` of an export or of command lines.

Long runs show a tqdm progress bar on standard error, so standard output
stays clean for the data (export) or the verdict.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys

import msgspec
from aiohttp import web
from tqdm import tqdm

from api.app import create_app
from api.auth import Principal
from api.batch import BatchLine, parse_batch_line, run_batch_lines
from api.context import LEDGER
from api.decoding import POSITION_MAX
from cli.session import database
from cli.usage import open_file
from events.codec import encode_json
from ledger.settings import Settings
from ledger.store import EventStore
from projections import transfer

IMPORT_CHUNK_LINES = 2000


def _position(text: str) -> int:
    """The argparse type of ``--after``: a position in the log, 0 (before the first event) or more."""
    try:
        position = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= position <= POSITION_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is not a position: give one from 0 to {POSITION_MAX}")
    return position


def add_commands(commands: argparse._SubParsersAction) -> None:
    commands.add_parser("verify", help="verify the hash chain of the whole log")
    export_ = commands.add_parser("export", help="write the log as JSON lines or CSV (standard output by default)")
    export_.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export_.add_argument("--after", type=_position, default=0, help="start after this position")
    export_.add_argument("--out", help="write to this file instead of standard output")
    import_ = commands.add_parser(
        "import", help="bulk-import batch command lines ({\"op\", ...}) or an export of envelopes (resumable, idempotent)"
    )
    import_.add_argument("file")


async def verify(args: argparse.Namespace, settings: Settings) -> int:
    async with database(settings) as (_url, pool, _programme):
        store = EventStore(pool)
        total = (await store.head())[0]
        with tqdm(total=total, unit="event", desc="verify", file=sys.stderr) as bar:
            report = await store.verify(progress=bar.update)
    print(encode_json(report).decode())
    return 0 if report.ok else 1


async def export(args: argparse.Namespace, settings: Settings) -> int:
    async with database(settings) as (_url, pool, _programme):
        head = await pool.fetchval("SELECT position FROM event_head")
        out = open_file(args.out, "w", encoding="utf-8", newline="") if args.out else sys.stdout
        try:
            with tqdm(total=max(head - args.after, 0), unit="event", desc="export", file=sys.stderr) as bar:
                await transfer.export(pool, out, args.format, args.after, progress=bar.update)
        finally:
            if args.out:
                out.close()
    return 0


async def import_file(args: argparse.Namespace, settings: Settings) -> int:
    """An export of envelopes, or batch lines: the file's first line tells them apart."""
    if holds_commands(args.file):
        return await import_commands(args.file, settings)
    async with database(settings) as (_url, pool, _programme):
        with open_file(args.file) as lines, tqdm(
            total=os.path.getsize(args.file), unit="B", unit_scale=True, desc="import", file=sys.stderr
        ) as bar:
            try:
                report = await transfer.import_lines(pool, lines, progress=bar.update)
            except transfer.ImportRefused as refused:
                print(f"import refused: {refused}", file=sys.stderr)
                return 1
    print(encode_json(report).decode())
    return 0


def holds_commands(path: str) -> bool:
    """Whether a file holds batch lines (``{"op": ...}``), not an export of envelopes."""
    with open_file(path) as lines:
        for line in lines:
            if line.strip():
                try:
                    first = msgspec.json.decode(line)
                except msgspec.DecodeError:
                    return False
                return isinstance(first, dict) and "op" in first
    return False


async def import_commands(path: str, settings: Settings) -> int:
    """``loyalty import`` of batch lines: each line a command, exactly as ``POST /v1/batch`` runs it.

    Resumable and idempotent: a line without an ``idempotency_key`` gets one
    derived from its bytes, so running the same file again replays every
    first answer and appends nothing. Prints a count of answers by status and
    the problems of refused lines (to standard error); exit 1 if any line was
    refused.
    """
    async with database(settings) as (_url, pool, programme):
        app = create_app(pool, programme, settings=dataclasses.replace(settings, rate_limit_per_s=None, scheduler=False))
        app[LEDGER].store.start_group_commit()
        principal = Principal("cli", "loyalty import", "admin")
        statuses: dict[int, int] = {}
        try:
            with open_file(path) as lines, tqdm(
                total=os.path.getsize(path), unit="B", unit_scale=True, desc="import", file=sys.stderr
            ) as bar:
                chunk: list[tuple[int, bytes]] = []
                for number, line in enumerate(lines, start=1):
                    if line.strip():
                        chunk.append((number, line))
                    if len(chunk) == IMPORT_CHUNK_LINES:
                        await _import_chunk(app, principal, chunk, statuses)
                        chunk = []
                    bar.update(len(line))
                await _import_chunk(app, principal, chunk, statuses)
        finally:
            await app[LEDGER].store.stop_group_commit()
    print(encode_json({"lines": sum(statuses.values()), "by_status": {str(k): v for k, v in sorted(statuses.items())}}).decode())
    return 0 if all(status < 400 for status in statuses) else 1


async def _import_chunk(app: web.Application, principal: Principal, chunk: list[tuple[int, bytes]],
                        statuses: dict[int, int]) -> None:
    parsed = []
    for number, line in chunk:
        batch_line = parse_batch_line(number, line)
        if isinstance(batch_line, BatchLine) and batch_line.idempotency_key is None:
            derived = f"import:{hashlib.sha256(line.strip()).hexdigest()[:40]}"
            batch_line = msgspec.structs.replace(batch_line, idempotency_key=derived)
        parsed.append(batch_line)
    for (number, _line), (status, body) in zip(chunk, await run_batch_lines(app, principal, parsed)):
        statuses[status] = statuses.get(status, 0) + 1
        if status >= 400:
            print(f"line {number}: {body.decode()}", file=sys.stderr)


COMMANDS = {"verify": verify, "export": export, "import": import_file}

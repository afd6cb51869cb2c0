"""The ``loyalty`` parser and the dispatch of every command but ``serve`` (service.py runs that one).

A command group is a module under ``cli/`` with ``add_commands(subparsers)``
and ``COMMANDS`` (name -> ``async def command(args, settings) -> exit code``),
listed in ``GROUPS``. A user's mistake that only running finds out is a
``cli.usage.UsageError`` (or a database that cannot be reached): ``run``
prints it as one line and exits 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Awaitable, Callable

import uvloop

from cli import keys, log, programme, projectors, publication, simulate
from cli.usage import EXIT_USAGE, UsageError
from ledger.database import DatabaseUnreachable
from ledger.settings import Settings

Command = Callable[[argparse.Namespace, Settings], Awaitable[int]]

GROUPS = (keys, log, projectors, programme, simulate, publication)
COMMANDS: dict[str, Command] = {name: command for group in GROUPS for name, command in group.COMMANDS.items()}

# What a shell reports for a command that SIGPIPE ended (`yes | head -1`): the output was cut short.
EXIT_READER_GONE = 128 + signal.SIGPIPE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loyalty", description="The event-sourced loyalty ledger.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the HTTP service")
    for group in GROUPS:
        group.add_commands(commands)
    return parser


def run(command: Command, args: argparse.Namespace, settings: Settings) -> int:
    """Run ``command`` (one of ``COMMANDS``, or service.py's ``serve``) to its exit status."""
    try:
        status = uvloop.run(command(args, settings))
        sys.stdout.flush()  # here rather than at exit, so a reader that has gone is met below
        return status
    except (UsageError, DatabaseUnreachable) as error:
        print(f"loyalty {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return reader_gone()


def reader_gone() -> int:
    """End quietly when standard output's reader has gone (``loyalty export | head -1``), as Unix tools do.

    Python ignores SIGPIPE (so that a lost database connection is an error, not a
    kill) and raises BrokenPipeError instead. Standard output is pointed at
    /dev/null so the output still buffered is dropped at exit without a word.
    """
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_READER_GONE

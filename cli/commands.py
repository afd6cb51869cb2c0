"""The ``loyalty`` parser and the dispatch of every command but ``serve`` (service.py runs that one).

A command group is a module under ``cli/`` with ``add_commands(subparsers)``
and ``COMMANDS`` (name -> ``async def command(args, settings) -> exit code``),
listed in ``GROUPS``.
"""

from __future__ import annotations

import argparse

import uvloop

from cli import keys, log, programme, projectors, publication, simulate
from ledger.settings import Settings

GROUPS = (keys, log, projectors, programme, simulate, publication)
COMMANDS = {name: command for group in GROUPS for name, command in group.COMMANDS.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loyalty", description="The event-sourced loyalty ledger.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the HTTP service")
    for group in GROUPS:
        group.add_commands(commands)
    return parser


def run(args: argparse.Namespace, settings: Settings) -> int:
    return uvloop.run(COMMANDS[args.command](args, settings))

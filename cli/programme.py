"""``loyalty programme show [--as-of T]`` and ``loyalty programme set FILE.toml [--effective-from T]`` (CONTRACT §6.1).

``set`` is ``PUT /v1/programme`` from the command line: every setting the
file names replaces that setting of the latest version; the answer (or the
refusal, as problem JSON) is printed, and a refusal exits 1.
"""

from __future__ import annotations

import argparse
import sys

from cli.session import database
from cli.usage import time_argument, toml_file
from events.codec import encode_json
from ledger import commands as cmd
from ledger.application import Ledger
from ledger.clock import system_clock
from ledger.programme import file_settings
from ledger.settings import Settings
from ledger.store import EventStore


def add_commands(commands: argparse._SubParsersAction) -> None:
    programme = commands.add_parser("programme", help="show or change the programme (versions by date)")
    actions = programme.add_subparsers(dest="programme_command", required=True)
    show = actions.add_parser("show", help="the version in force now, or at --as-of")
    show.add_argument("--as-of", type=time_argument, help="RFC 3339 time (default: now)")
    set_ = actions.add_parser("set", help="add a version from a TOML file of settings")
    set_.add_argument("file", help="TOML: the settings to change (the others carry over)")
    set_.add_argument("--effective-from", type=time_argument, help="RFC 3339 time (default: now)")


async def programme(args: argparse.Namespace, settings: Settings) -> int:
    # Read before the database is opened, so a mistake in the file is told at once.
    changes = file_settings(toml_file(args.file)) if args.programme_command == "set" else None
    async with database(settings) as (_url, pool, given):
        ledger = Ledger(EventStore(pool), given, system_clock, programme_file_given=settings.programme_path is not None)
        await ledger.refresh_rules()
        if args.programme_command == "show":
            print(encode_json(ledger.rules.programmes.version_at(args.as_of or system_clock()).view()).decode())
            return 0
        command = cmd.ChangeProgramme(settings=changes, effective_from=args.effective_from)
        outcome = await ledger.execute_rules("programme_change", command, actor="command line")
    print(outcome.body.decode(), file=sys.stderr if outcome.is_problem else sys.stdout)
    return 1 if outcome.is_problem else 0


COMMANDS = {"programme": programme}

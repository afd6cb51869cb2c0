"""``loyalty simulate --from T --to T CHANGES.json`` (CONTRACT §6.5): ``POST /v1/simulations`` from the
command line. CHANGES.json is the request's ``changes`` object (``{"settings": {...}, "campaigns":
[...]}``); the answer is printed as JSON on standard output, a refusal as problem JSON on standard error
(exit 1). A tqdm bar on standard error counts the purchases read."""

from __future__ import annotations

import argparse
import sys

import msgspec
from tqdm import tqdm

from cli.session import database
from cli.usage import json_file, time_argument
from events.codec import encode_json
from ledger import commands as cmd
from ledger.application import Ledger
from ledger.clock import system_clock
from ledger.errors import Refusal, problem
from ledger.settings import Settings
from ledger.store import EventStore


def add_commands(commands: argparse._SubParsersAction) -> None:
    simulate_ = commands.add_parser("simulate", help="what changed settings and draft campaigns would have granted")
    simulate_.add_argument("--from", dest="window_from", type=time_argument, required=True, help="RFC 3339 time")
    simulate_.add_argument("--to", dest="window_to", type=time_argument, required=True, help="RFC 3339 time")
    simulate_.add_argument("changes", help='JSON: {"settings": {...}, "campaigns": [campaign bodies]}')


async def simulate(args: argparse.Namespace, settings: Settings) -> int:
    try:
        changes = json_file(args.changes, cmd.SimulationChanges)
        command = cmd.Simulate(from_=args.window_from, to=args.window_to, changes=changes)
    except msgspec.ValidationError as error:
        print(encode_json(problem(422, "validation_failed", str(error))).decode(), file=sys.stderr)
        return 1
    async with database(settings) as (_url, pool, given):
        ledger = Ledger(EventStore(pool), given, system_clock, programme_file_given=settings.programme_path is not None)
        try:
            simulation = await ledger.prepare_simulation(command)
        except Refusal as refusal:
            print(encode_json(problem(refusal.status, refusal.code, refusal.detail, **refusal.extra)).decode(),
                  file=sys.stderr)
            return 1
        total = await ledger.store.count_of_type("purchase_recorded")
        with tqdm(total=total, unit="purchase", desc="simulate", file=sys.stderr) as bar:
            answer = await ledger.run_simulation(simulation, progress=bar.update)
    print(encode_json(answer).decode())
    return 0


COMMANDS = {"simulate": simulate}

"""``loyalty keys create``: an API key, printed once."""

from __future__ import annotations

import argparse

from api.auth import ROLES, KeyRing
from cli.session import database
from events.codec import encode_json
from ledger.clock import system_clock
from ledger.settings import Settings


def add_commands(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="manage API keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser("create", help="create an API key (printed once)")
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--name", required=True)


async def keys(args: argparse.Namespace, settings: Settings) -> int:
    async with database(settings) as (_url, pool, _programme):
        created = await KeyRing(pool, settings, system_clock).create(args.name, args.role, "command line")
    print(encode_json(created).decode())
    return 0


COMMANDS = {"keys": keys}

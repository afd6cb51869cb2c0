"""What every command but ``serve`` starts from: the database and the programme, as ``serve`` gets them."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tomllib
from typing import AsyncIterator

import asyncpg
import msgspec

from cli.usage import UsageError
from ledger.database import open_database
from ledger.programme import Programme, load_programme
from ledger.settings import Settings
from projections.runtime import ensure_tables


@contextlib.asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[tuple[str, asyncpg.Pool, Programme]]:
    """The database URL, a pool with the schema and projection tables in place, and the programme."""
    programme = programme_setting(settings.programme_path)  # first: a mistake in it is told at once
    url, pool = await open_database(settings.database_url)
    try:
        await ensure_tables(pool, programme)
        yield url, pool, programme
    finally:
        await pool.close()


def programme_setting(path: str | None) -> Programme:
    """The programme ``LOYALTY_PROGRAMME`` names (the defaults without it); one that cannot load is a ``UsageError``."""
    try:
        return load_programme(path)
    except OSError as error:
        problem = f"cannot be read ({error.strerror})"
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        problem = f"is not valid TOML ({error})"
    except msgspec.ValidationError as error:
        problem = f"is not a valid programme ({error})"
    raise UsageError(f"LOYALTY_PROGRAMME={path} {problem}; correct the file or unset LOYALTY_PROGRAMME")


def stop_on_signals() -> asyncio.Event:
    """An event SIGTERM or SIGINT sets, for a process that runs until it is stopped.

    The workers take it before they start, so a stop that arrives while they
    open the database still ends in a clean exit once start-up is done,
    rather than the signal's default (killed, exit -15).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop

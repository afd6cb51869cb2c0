"""What every command but ``serve`` starts from: the database and the programme, as ``serve`` gets them."""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

import asyncpg

from ledger.database import open_database
from ledger.programme import Programme, load_programme
from ledger.settings import Settings
from projections.runtime import ensure_tables


@contextlib.asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[tuple[str, asyncpg.Pool, Programme]]:
    """The database URL, a pool with the schema and projection tables in place, and the programme."""
    url, pool = await open_database(settings.database_url)
    programme = load_programme(settings.programme_path)
    try:
        await ensure_tables(pool, programme)
        yield url, pool, programme
    finally:
        await pool.close()

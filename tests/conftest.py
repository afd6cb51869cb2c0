"""Real PostgreSQL for every test: a fresh database per test, cloned from a template.

The server is TEST_DATABASE_URL when set (e.g. the PostgreSQL 15 in CI),
otherwise a throwaway embedded PostgreSQL 18 deleted at the end of the session.
The schema is applied once, to a template database; each test gets
`CREATE DATABASE ... TEMPLATE`, a copy, which is much faster than
applying the schema again.

Session-wide fixtures are synchronous (they run their async work on a loop of
their own), so no event loop or asyncpg connection is shared between tests.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
from pathlib import Path

import asyncpg
import pytest

from ledger.database import (
    apply_schema,
    create_pool,
    database_url_for,
    quote_ident,
    run_blocking,
    start_embedded_server,
)
from tests.nats_server import NatsServer
from tests.service_process import ServiceProcess
from tests.support import running_api

# Database names carry the pid so that two test runs can share one server.
_PID = os.getpid()
_numbers = itertools.count(1)


async def _execute(server_url: str, *statements: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _create_database(server_url: str, name: str, template: str) -> str:
    await _execute(server_url, f"CREATE DATABASE {quote_ident(name)} TEMPLATE {quote_ident(template)}")
    return database_url_for(server_url, name)


async def _drop_database(server_url: str, name: str) -> None:
    # FORCE (PostgreSQL 13+) ends any connection a test left open.
    await _execute(server_url, f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")


@pytest.fixture(scope="session")
def database_server_url():
    """A URL to a PostgreSQL server on which the tests may create databases."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    server = start_embedded_server(Path(tempfile.mkdtemp(prefix="loyalty-test-")), throwaway=True)
    yield server.get_uri()
    server.cleanup()  # stops the server and deletes its data directory


@pytest.fixture(scope="session")
def template_database(database_server_url):
    """The name of a database with schema.sql applied, to clone per test."""
    name = f"loyalty_template_{_PID}"

    async def create():
        await _drop_database(database_server_url, name)  # left over by an earlier run with this pid
        await _execute(database_server_url, f"CREATE DATABASE {quote_ident(name)}")
        conn = await asyncpg.connect(database_url_for(database_server_url, name))
        try:
            await apply_schema(conn)
        finally:
            await conn.close()  # a template must have no connections when cloned

    run_blocking(create)
    yield name
    run_blocking(lambda: _drop_database(database_server_url, name))


@pytest.fixture
async def database_url(database_server_url, template_database):
    """The URL of a fresh database with the schema applied, dropped after the test."""
    name = f"loyalty_t_{_PID}_{next(_numbers)}"
    url = await _create_database(database_server_url, name, template_database)
    yield url
    await _drop_database(database_server_url, name)


@pytest.fixture(scope="module")
def module_database_url(database_server_url, template_database):
    """A fresh database shared by one module's tests (e.g. one service process and browser for all)."""
    name = f"loyalty_m_{_PID}_{next(_numbers)}"
    url = run_blocking(lambda: _create_database(database_server_url, name, template_database))
    yield url
    run_blocking(lambda: _drop_database(database_server_url, name))


@pytest.fixture
async def blank_database_url(database_server_url):
    """The URL of a fresh, empty database (no schema), dropped after the test."""
    name = f"loyalty_blank_{_PID}_{next(_numbers)}"
    url = await _create_database(database_server_url, name, "template0")
    yield url
    await _drop_database(database_server_url, name)


@pytest.fixture
async def pool(database_url):
    """An asyncpg pool (ledger.database.create_pool) on the test's database."""
    pool = await create_pool(database_url, min_size=1, max_size=10)
    yield pool
    try:
        await asyncio.wait_for(pool.close(), timeout=10)
    except asyncio.TimeoutError:
        pool.terminate()  # a connection was still held; the database is dropped anyway


@pytest.fixture
def live_service(database_url):
    """The real service (``python -m service serve``) on the test's database, stopped after the test."""
    service = ServiceProcess(database_url)
    run_blocking(service.start)
    try:
        yield service
    finally:
        service.close()


@pytest.fixture
async def nats_server():
    """A nats-server of the test's own (JetStream, a temporary store, a free port), stopped after it."""
    server = NatsServer()
    try:
        yield await server.start()
    finally:
        server.close()


@pytest.fixture
async def api(pool):
    """The application on the test's database, served on a free port (tests.support.Api).
    A module that needs more (members enrolled, projectors) defines its own."""
    async with running_api(pool) as api:
        yield api

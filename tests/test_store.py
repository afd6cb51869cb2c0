"""Store conformance (CONTRACT §3): run against the embedded PostgreSQL and PostgreSQL 15."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timezone

import asyncpg
import pytest

from events import catalogue as ev
from ledger import store as store_module
from ledger.store import Append, EventStore, IdentityTaken, NewEvent, WrongExpectedVersion

pytestmark = pytest.mark.asyncio

AT = datetime(2025, 1, 7, 2, 0, tzinfo=timezone.utc)


def purchase(n: int) -> NewEvent:
    return NewEvent(AT, ev.PurchaseRecorded(purchase_id=f"p{n}", store_id="s1", amount_cents=100 * n))


@pytest.fixture
def store(pool) -> EventStore:
    return EventStore(pool)


async def test_expected_version_conflict_appends_nothing(store):
    await store.append(Append("m1", 0, [purchase(1)]))
    with pytest.raises(WrongExpectedVersion):
        await store.append(Append("m1", 0, [purchase(2)]))
    assert [e.stream_version for e in await store.read_stream("m1")] == [1]
    assert (await store.head())[0] == 1


async def test_a_stream_loads_as_its_snapshot_and_the_events_after_it(store):
    await store.append(Append("m1", 0, [purchase(n) for n in range(1, 6)]))
    assert await store.load_stream("m1", dict) == (None, await store.read_stream("m1"))  # no snapshot: every event
    await store.save_snapshot("m1", 3, {"version": 3})
    snapshot, envelopes = await store.load_stream("m1", dict)
    assert snapshot == {"version": 3} and envelopes == (await store.read_stream("m1"))[3:]
    await store.save_snapshot("m1", 5, {"version": 5})  # at the head: no event follows it
    assert await store.load_stream("m1", dict) == ({"version": 5}, [])
    assert await store.load_stream("nobody", dict) == (None, [])


async def test_a_stream_is_read_in_pages_to_its_end(store, monkeypatch):
    monkeypatch.setattr(store_module, "MAX_READ_LIMIT", 3)
    await store.append(Append("m1", 0, [purchase(n) for n in range(1, 8)]))
    versions = [[e.stream_version for e in page] async for page in store.stream_pages("m1")]
    assert versions == [[1, 2, 3], [4, 5, 6], [7]]
    versions = [[e.stream_version for e in page] async for page in store.stream_pages("m1", after_version=1)]
    assert versions == [[2, 3, 4], [5, 6, 7]]  # a last page that is full: one more read finds nothing
    assert [page async for page in store.stream_pages("nobody")] == []


async def test_an_unreadable_snapshot_is_passed_over_for_every_event(store, pool):
    await store.append(Append("m1", 0, [purchase(n) for n in range(1, 4)]))
    await store.save_snapshot("m1", 2, {"version": 2})
    await pool.execute("UPDATE member_snapshots SET state = '\\xc1'::bytea")  # 0xc1: never used in msgpack
    assert await store.load_stream("m1", dict) == (None, await store.read_stream("m1"))


async def test_stream_versions_are_contiguous_and_positions_global(store):
    await store.append(Append("m1", 0, [purchase(1), purchase(2)]))
    await store.append(Append("m2", None, [purchase(3)]))
    await store.append(Append("m1", 2, [purchase(4)]))
    assert [e.stream_version for e in await store.read_stream("m1")] == [1, 2, 3]
    assert [e.position for e in await store.read_all(0, 100)] == [1, 2, 3, 4]
    assert [e.position for e in await store.read_all(2, 1)] == [3]


async def test_group_commit_refuses_one_command_and_keeps_the_others(store):
    outcomes = await store.append_many(
        [Append("m1", 0, [purchase(1)]), Append("m1", 0, [purchase(2)]), Append("m2", 0, [purchase(3)])]
    )
    assert isinstance(outcomes[1], WrongExpectedVersion)
    assert [e.position for e in outcomes[0]] == [1] and [e.position for e in outcomes[2]] == [2]
    assert (await store.verify()).ok


async def test_a_command_the_database_refuses_fails_alone_in_a_group_commit(store, pool):
    """One append PostgreSQL refuses (here a trigger; in life a constraint or a value out of range) fails
    its own command only: the commands that shared its transaction are retried alone and commit."""
    await pool.execute("""
        CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'stream poison refused for the test'; END $$;
        CREATE TRIGGER refuse_poison BEFORE INSERT ON events FOR EACH ROW
            WHEN (NEW.stream_id = 'poison' OR NEW.data->>'purchase_id' = 'p666') EXECUTE FUNCTION refuse_poison();
    """)
    store.start_group_commit()
    try:
        appends = [Append(f"g{n}", 0, [purchase(n)]) for n in range(30)]
        appends.insert(15, Append("poison", 0, [purchase(99)]))
        results = await asyncio.gather(*(store.append(a) for a in appends), return_exceptions=True)
        failed = [a.stream_id for a, r in zip(appends, results) if isinstance(r, Exception)]
        assert failed == ["poison"] and isinstance(results[15], asyncpg.RaiseError)
        # A series whose second append is refused: the first commits and is answered as committed;
        # the third expected the second's version and is refused for it.
        series = await store.append_series(
            [Append("s", 0, [purchase(100)]), Append("s", 1, [purchase(666)]), Append("s", 2, [purchase(101)])]
        )
        assert [e.stream_version for e in series[0]] == [1]
        assert isinstance(series[1], asyncpg.RaiseError) and isinstance(series[2], WrongExpectedVersion)
    finally:
        await store.stop_group_commit()
    assert sorted(e.stream_id for e in await store.read_all(0, 1000)) == sorted([f"g{n}" for n in range(30)] + ["s"])
    assert await store.read_stream("poison") == []
    assert (await store.verify()).ok


async def test_a_connection_failure_while_retrying_alone_keeps_what_committed(store, pool):
    """Retried one by one after a refused transaction, the appends before a connection-class failure keep
    their committed outcomes; that one and the ones after it get the failure (not retried one by one)."""
    await pool.execute("""
        CREATE FUNCTION refuse_for_test() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.stream_id = 'cut' THEN RAISE EXCEPTION 'as if cut' USING ERRCODE = 'connection_failure'; END IF;
            RAISE EXCEPTION 'stream poison refused for the test';
        END $$;
        CREATE TRIGGER refuse_for_test BEFORE INSERT ON events FOR EACH ROW
            WHEN (NEW.stream_id IN ('poison', 'cut')) EXECUTE FUNCTION refuse_for_test();
    """)
    store.start_group_commit()
    try:
        appends = [Append("g0", 0, [purchase(1)]), Append("poison", 0, [purchase(2)]),
                   Append("cut", 0, [purchase(3)]), Append("g1", 0, [purchase(4)])]
        results = await asyncio.gather(*(store.append(a) for a in appends), return_exceptions=True)
    finally:
        await store.stop_group_commit()
    assert [e.stream_id for e in results[0]] == ["g0"]
    assert isinstance(results[1], asyncpg.RaiseError)
    assert all(isinstance(r, asyncpg.PostgresConnectionError) for r in results[2:])
    assert [e.stream_id for e in await store.read_all(0, 100)] == ["g0"]
    assert (await store.verify()).ok


async def test_an_identity_belongs_to_one_member(store):
    await store.append(Append("m1", 0, [purchase(1)], identities=[("phone", "1")]))
    with pytest.raises(IdentityTaken):
        await store.append(Append("m2", 0, [purchase(2)], identities=[("phone", "1")]))
    assert await store.read_stream("m2") == []
    assert await store.identity_owner("phone", "1") == "m1"


@pytest.mark.parametrize("statement", ["UPDATE events SET type = 'x'", "DELETE FROM events", "TRUNCATE events"])
async def test_the_database_refuses_changing_events(store, pool, statement):
    await store.append(Append("m1", 0, [purchase(1)]))
    with pytest.raises(asyncpg.PostgresError):
        await pool.execute(statement)
    assert len(await store.read_all()) == 1


async def tamper(pool, statement: str, *args) -> None:
    """Change the log behind the triggers' back, as a superuser could."""
    async with pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute("ALTER TABLE events DISABLE TRIGGER USER")
            await conn.execute(statement, *args)
            await conn.execute("ALTER TABLE events ENABLE TRIGGER USER")


async def test_verify_finds_a_changed_event_at_its_position(store, pool):
    for n in range(1, 6):
        await store.append(Append(f"m{n}", 0, [purchase(n)]))
    assert (await store.verify()).ok
    await tamper(pool, "UPDATE events SET data = jsonb_set(data, '{amount_cents}', '1') WHERE position = 3")
    report = await store.verify()
    assert not report.ok and report.first_bad_position == 3 and report.checked == 5


async def test_verify_finds_a_deleted_event(store, pool):
    for n in range(1, 6):
        await store.append(Append(f"m{n}", 0, [purchase(n)]))
    await tamper(pool, "DELETE FROM events WHERE position = 4")
    report = await store.verify()
    assert not report.ok and report.first_bad_position == 4


async def test_verify_finds_a_removed_tail(store, pool):
    for n in range(1, 4):
        await store.append(Append(f"m{n}", 0, [purchase(n)]))
    await tamper(pool, "DELETE FROM events WHERE position = 3")
    report = await store.verify()
    assert not report.ok and report.first_bad_position == 3


async def test_verify_finds_reordered_events(store, pool):
    for n in range(1, 6):
        await store.append(Append(f"m{n}", 0, [purchase(n)]))
    await tamper(pool, "UPDATE events SET position = -2 WHERE position = 2")
    await tamper(pool, "UPDATE events SET position = 2 WHERE position = 3")
    await tamper(pool, "UPDATE events SET position = 3 WHERE position = -2")
    report = await store.verify()
    assert not report.ok and report.first_bad_position == 2


async def test_concurrent_writers_never_show_a_reader_a_gap_or_a_reordering(pool):
    """8 connections append in parallel while a reader tails the feed; many rounds."""
    store = EventStore(pool)
    writers, rounds = 8, 25
    seen: list[int] = []
    done = asyncio.Event()

    async def write(writer: int) -> None:
        for n in range(rounds):
            events = [purchase(n) for _ in range(random.randint(1, 3))]
            await store.append(Append(f"w{writer}", None, events))

    async def tail() -> None:
        after = 0
        while True:
            finished = done.is_set()
            batch = await store.read_all(after, 7)
            for envelope in batch:
                # Strictly increasing by one: nothing missed, nothing reordered.
                assert envelope.position == after + 1, (after, envelope.position)
                after = envelope.position
                seen.append(after)
            if finished and not batch:
                return
            await asyncio.sleep(0)

    reader = asyncio.create_task(tail())
    await asyncio.gather(*(write(w) for w in range(writers)))
    done.set()
    await reader
    head = (await store.head())[0]
    assert seen == list(range(1, head + 1))
    assert (await store.verify()).ok


async def test_long_poll_wakes_on_append(pool, database_url):
    store = EventStore(pool)
    await store.start_listening(lambda: asyncpg.connect(database_url))
    try:
        waiter = asyncio.create_task(store.wait_for_position(0, 5000))
        await asyncio.sleep(0.05)
        await store.append(Append("m1", 0, [purchase(1)]))
        assert await asyncio.wait_for(waiter, 2) is True
        assert await store.wait_for_position(1, 50) is False
    finally:
        await store.stop_listening()


async def test_group_commit_puts_concurrent_commands_in_few_transactions(store, pool):
    store.start_group_commit()
    try:
        transactions = 0
        original = store.append_many

        async def counting(appends):
            nonlocal transactions
            transactions += 1
            return await original(appends)

        store.append_many = counting
        results = await asyncio.gather(
            *(store.append(Append(f"g{n}", 0, [purchase(n)])) for n in range(200)),
            store.append(Append("g0", 0, [purchase(999)])),
            return_exceptions=True,
        )
        conflicts = [r for r in results if isinstance(r, WrongExpectedVersion)]
        assert len(conflicts) == 1  # g0 twice at version 0: exactly one wins
        assert transactions < 50
        assert [e.position for e in await store.read_all(0, 1000)] == list(range(1, 201))
        assert (await store.verify()).ok
    finally:
        await store.stop_group_commit()


async def test_verify_on_a_busy_log_never_raises_a_false_alarm(pool):
    """Auditors verify a live ledger: 8 writers keep appending while verify runs again and again; every
    report is ok, and covers the head it read (events appended meanwhile lie past it)."""
    store = EventStore(pool)
    writers, rounds = 8, 40
    writing = True

    async def write(writer: int) -> None:
        for n in range(rounds):
            await store.append(Append(f"w{writer}", None, [purchase(n) for _ in range(random.randint(1, 3))]))

    async def audit() -> list:
        reports = []
        while writing or not reports:
            reports.append(await store.verify())
        return reports

    auditor = asyncio.create_task(audit())
    await asyncio.gather(*(write(w) for w in range(writers)))
    writing = False
    reports = await auditor
    assert [r for r in reports if not r.ok] == []
    assert all(r.checked == r.head_position for r in reports)
    assert len(reports) > 1


async def test_a_command_failing_outside_the_database_fails_alone_in_a_group_commit(store):
    """Any failure of one command (here its answer cannot be built, a bug in Python rather than a refusal
    by PostgreSQL) fails that command only; the commands sharing its transaction commit."""

    def broken_answer(_recorded):
        raise ValueError("an answer that cannot be built")

    store.start_group_commit()
    try:
        appends = [Append(f"g{n}", 0, [purchase(n)]) for n in range(20)]
        appends.insert(10, Append("broken", 0, [purchase(99)], respond=broken_answer))
        results = await asyncio.gather(*(store.append(a) for a in appends), return_exceptions=True)
    finally:
        await store.stop_group_commit()
    failed = [a.stream_id for a, r in zip(appends, results) if isinstance(r, Exception)]
    assert failed == ["broken"] and isinstance(results[10], ValueError)
    assert sorted(e.stream_id for e in await store.read_all(0, 100)) == sorted(f"g{n}" for n in range(20))
    assert (await store.verify()).ok


async def test_a_writer_stalled_mid_copy_holding_the_head_lock_is_cut_and_the_others_go_on(store, database_url):
    """A client that stops while PostgreSQL waits for its COPY rows is beyond the server's timeouts (a
    statement blocked reading from its client is not cancelled): the group commit waiting for the head
    lock cuts it."""
    stalled = await asyncpg.connect(database_url)
    never = asyncio.Event()

    async def rows_that_never_come():
        await never.wait()
        yield b""

    store.start_group_commit()
    try:
        await stalled.execute("BEGIN")
        await stalled.execute("SELECT 1 FROM event_head FOR UPDATE")
        copying = asyncio.create_task(stalled.copy_to_table("events", source=rows_that_never_come()))
        recorded = await asyncio.wait_for(store.append(Append("m1", 0, [purchase(1)])), 25)
        assert [e.position for e in recorded] == [1]
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await asyncio.wait_for(copying, 10)
    finally:
        never.set()
        stalled.terminate()
        await store.stop_group_commit()
    assert (await store.verify()).ok

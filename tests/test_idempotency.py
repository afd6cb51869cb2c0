"""One Idempotency-Key, one first answer: under any interleaving of writers, and for as long as it is kept."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from ledger import commands as cmd
from ledger.application import GLOBAL_SCOPE, Ledger
from ledger.clock import ManualClock
from ledger.database import create_pool
from ledger.programme import Programme
from ledger.store import EventStore
from tests.service_process import FaultyProxy, ServiceProcess

pytestmark = pytest.mark.asyncio

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
ROUNDS = 50


@pytest.fixture
async def two_ledgers(database_url):
    """Two ledgers with pools, caches and group commits of their own on one database: two processes,
    the first one far away (3 ms each way), so that its requests span the other's commits."""
    clock = ManualClock(NOW)
    proxy = await FaultyProxy(database_url).start()
    proxy.latency_s = 0.003
    pools = [await create_pool(url, min_size=1, max_size=4) for url in (proxy.proxied_url, database_url)]
    ledgers = [Ledger(EventStore(pool, clock), Programme(), clock) for pool in pools]
    for ledger in ledgers:
        ledger.store.start_group_commit()
    yield ledgers
    for ledger, pool in zip(ledgers, pools):
        await ledger.store.stop_group_commit()
        await pool.close()
    await proxy.close()


async def test_a_key_refused_and_accepted_concurrently_has_one_first_answer(two_ledgers):
    """A redemption beyond the balance is refused on one process while the other credits the points and
    sends the same request with the same key: whichever answer is stored first is the only one any
    sender ever gets, and a later retry gets it too."""
    first, second = two_ledgers
    rng = random.Random(13)
    broken = []
    for n in range(ROUNDS):
        member, key = f"m{n}", f"k{n}"
        await second.execute("enrol", member, cmd.Enrol(member_id=member))
        redeem = cmd.Redeem(redemption_id=f"r{n}", points=10)

        async def send_later(ledger: Ledger):
            # Spread over the time the other process takes to credit and redeem, so that every
            # interleaving of a refusal with that redemption's check and commit comes up.
            await asyncio.sleep(rng.random() * 0.02)
            return await ledger.execute("redemption", member, redeem, idempotency_key=key)

        async def credit_then_redeem():
            await asyncio.sleep(rng.random() * 0.02)
            await second.execute("adjustment", member, cmd.Adjust(adjustment_id=f"a{n}", points=10, reason="race"),
                                 actor="test")
            return await second.execute("redemption", member, redeem, idempotency_key=key)

        answers = await asyncio.gather(credit_then_redeem(), *(send_later(first) for _ in range(8)))
        answers.append(await first.execute("redemption", member, redeem, idempotency_key=key))  # a later retry
        stored = await first.store.stored_result(GLOBAL_SCOPE, f"idem:{key}")
        if any((outcome.status, outcome.body) != (stored.status, stored.body) for outcome in answers):
            broken.append((n, [o.status for o in answers], stored.status))
    assert broken == []


async def test_idempotency_answers_are_pruned_after_their_retention_natural_ids_are_kept(pool):
    """Within the retention a retry with the key gets the first answer; once pruned, the key is
    forgotten but the natural id still answers the first answer (its body is the business's id)."""
    clock = ManualClock(NOW)
    ledger = Ledger(EventStore(pool, clock), Programme(), clock)
    await ledger.execute("enrol", "m1", cmd.Enrol(member_id="m1"), idempotency_key="k-enrol")
    purchase = cmd.RecordPurchase(purchase_id="p1", store_id="s1", amount_cents=25_800)
    first = await ledger.execute("purchase", "m1", purchase, idempotency_key="k-purchase")
    refused = await ledger.execute("redemption", "m1", cmd.Redeem(redemption_id="r1", points=10_000),
                                   idempotency_key="k-refused")
    assert (first.status, refused.status) == (201, 409)

    clock.advance(days=3)
    late = cmd.RecordPurchase(purchase_id="p2", store_id="s1", amount_cents=900)
    assert (await ledger.execute("purchase", "m1", late, idempotency_key="k-late")).status == 201
    assert await ledger.store.prune_answers(GLOBAL_SCOPE, clock() - timedelta(days=7)) == 0
    replay = await ledger.execute("purchase", "m1", purchase, idempotency_key="k-purchase")
    assert (replay.status, replay.body, replay.replayed) == (201, first.body, True)

    clock.advance(days=5)  # 8 days after the first answers, 5 after k-late's
    assert await ledger.store.prune_answers(GLOBAL_SCOPE, clock() - timedelta(days=7), batch_max=1) == 3
    assert await ledger.store.stored_result(GLOBAL_SCOPE, "idem:k-purchase") is None
    assert await ledger.store.stored_result(GLOBAL_SCOPE, "idem:k-late") is not None
    after = await ledger.execute("purchase", "m1", purchase, idempotency_key="k-purchase")
    assert (after.status, after.body, after.replayed) == (201, first.body, True)  # by its natural id
    assert await ledger.store.stored_result("m1", "purchase:p1") is not None


async def test_listing_members_reads_the_index_of_first_events(pool):
    store = EventStore(pool)
    async with pool.acquire() as conn:
        await conn.execute("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in await conn.fetch(
            "EXPLAIN SELECT stream_id FROM events WHERE stream_version = 1 AND stream_id > '' ORDER BY stream_id LIMIT 10"))
    assert "events_stream_starts" in plan, plan
    assert await store.stream_ids() == []


async def test_serve_prunes_idempotency_answers_past_their_retention_in_the_background(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany(
            """INSERT INTO command_results (stream_id, command_key, request_hash, status, body, created_at)
               VALUES ($1, $2, repeat('0', 64), 201, '{}', now() - make_interval(days => $3))""",
            [(GLOBAL_SCOPE, "idem:old", 4), (GLOBAL_SCOPE, "idem:recent", 2),
             ("m1", "purchase:p-old", 400)],
        )
        async with ServiceProcess(database_url, env={"LOYALTY_IDEMPOTENCY_DAYS": "3"}):
            for _ in range(300):
                keys = {r["command_key"] for r in await conn.fetch("SELECT command_key FROM command_results")}
                if "idem:old" not in keys:
                    break
                await asyncio.sleep(0.1)
        assert keys == {"idem:recent", "purchase:p-old"}
    finally:
        await conn.close()


async def test_pruning_neither_takes_nor_waits_for_the_head_lock(pool, database_url):
    """Appends hold the head lock; pruning runs beside them, so it never holds one up nor waits for one."""
    clock = ManualClock(NOW)
    ledger = Ledger(EventStore(pool, clock), Programme(), clock)
    await ledger.execute("enrol", "m1", cmd.Enrol(member_id="m1"), idempotency_key="k-enrol")
    appender = await asyncpg.connect(database_url)
    try:
        async with appender.transaction():
            await appender.execute("SELECT 1 FROM event_head FOR UPDATE")  # an append in progress
            clock.advance(days=8)
            assert await asyncio.wait_for(ledger.prune_idempotency_answers(timedelta(days=7)), 10) == 1
    finally:
        await appender.close()

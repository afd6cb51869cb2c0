"""One Idempotency-Key, one first answer: under any interleaving of writers, and for as long as it is kept."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timedelta, timezone

import pytest

from ledger import commands as cmd
from ledger.application import GLOBAL_SCOPE, Ledger
from ledger.clock import ManualClock
from ledger.database import create_pool
from ledger.programme import Programme
from ledger.store import EventStore
from tests.service_process import FaultyProxy

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

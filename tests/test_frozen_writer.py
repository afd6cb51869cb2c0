"""A writer frozen while it holds the head lock (SIGSTOP, a long GC pause, a frozen VM) stops no other writer.

Two real service processes take purchases from several clients. One is
stopped with SIGSTOP at a moment it holds the head lock every append waits
for, and left stopped for 25 s. The other must keep acknowledging within a
bounded time; the stopped one must recover after SIGCONT; and nothing any
client was told is lost or doubled. This is the suite's only long test.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from dataclasses import dataclass, field

import aiohttp
import asyncpg
import pytest

from tests.service_process import (
    Client,
    ServiceProcess,
    assert_chain_verifies,
    assert_log_is_well_formed,
    create_key,
    enrol_members,
    read_all_events,
)

pytestmark = pytest.mark.asyncio

FROZEN_S = 25
CLIENTS_PER_SERVICE = 3  # each with a member of its own: no version conflicts to muddle the answers
MEMBERS = 2 * CLIENTS_PER_SERVICE
# Generous: the server ends the frozen holder's transaction after 5 s idle
# (or its statement after 5 s); a request's deadline is 10 s.
ACKNOWLEDGED_WITHIN_S = 15
CLIENT_TIMEOUT_S = 60  # the stopped process's clients wait it out


@dataclass
class Sent:
    """One purchase as a client sends it, and what came of each attempt."""

    service: int
    member: str
    purchase_id: str
    attempts: list[tuple[float, float, int]] = field(default_factory=list)  # started, answered (monotonic), status
    answer: tuple[int, dict] | None = None


class Load:
    def __init__(self, clients: list[Client]) -> None:
        self.clients = clients
        self.sent: list[Sent] = []
        self.running = True
        self.numbers = itertools.count()

    async def send(self, sent: Sent) -> None:
        client = self.clients[sent.service]
        body = {"purchase_id": sent.purchase_id, "store_id": "s1", "amount_cents": 25_800}
        for _attempt in range(100):
            started = time.monotonic()
            try:
                status, answer, _ = await client.post(f"/v1/members/{sent.member}/purchases", body,
                                                      **{"Idempotency-Key": f"k-{sent.purchase_id}"})
            except (aiohttp.ClientError, asyncio.TimeoutError):
                sent.attempts.append((started, time.monotonic(), 0))
                continue
            sent.attempts.append((started, time.monotonic(), status))
            assert status != 500, answer
            if status == 503:  # retry with the same key: it runs, or answers what committed
                await asyncio.sleep(0.1)
                continue
            sent.answer = (status, answer)
            return
        raise AssertionError(f"no answer for {sent.purchase_id}")

    async def client(self, service: int, member: str) -> None:
        while self.running:
            sent = Sent(service, member, f"p{next(self.numbers)}")
            self.sent.append(sent)
            await self.send(sent)

    def acknowledged(self, service: int, after: float = 0.0, before: float = float("inf")) -> list[Sent]:
        return [s for s in self.sent if s.service == service and s.answer is not None and s.answer[0] == 201
                and after <= s.attempts[-1][1] <= before]


async def holds_the_head_lock(database_url: str) -> bool:
    """Someone holds the head row's lock for longer than any append takes (probed three times, NOWAIT)."""
    conn = await asyncpg.connect(database_url)
    try:
        for _probe in range(3):
            try:
                async with conn.transaction():
                    await conn.execute("SELECT 1 FROM event_head FOR UPDATE NOWAIT")
                return False
            except asyncpg.LockNotAvailableError:
                await asyncio.sleep(0.1)
        return True
    finally:
        await conn.close()


async def freeze_while_holding_the_head_lock(service: ServiceProcess, database_url: str) -> None:
    for _try in range(100):
        os.kill(service.pid, signal.SIGSTOP)
        if await holds_the_head_lock(database_url):
            return
        os.kill(service.pid, signal.SIGCONT)
        await asyncio.sleep(0.05)
    raise AssertionError("the process never held the head lock when stopped: no load?")


async def test_a_writer_frozen_holding_the_head_lock_stops_no_other_writer(database_url):
    frozen = ServiceProcess(database_url)
    other = ServiceProcess(database_url, admin_key=frozen.admin_key)
    await asyncio.gather(frozen.start(), other.start())
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)) as session:
            admin = Client(session, other.url, other.admin_key)
            key = await create_key(session, other, "checkout", "till-freeze")
            await enrol_members(admin, MEMBERS)
            load = Load([Client(session, s.url, key) for s in (frozen, other)])
            clients = [asyncio.create_task(load.client(m % 2, f"m{m}")) for m in range(MEMBERS)]
            while len(load.acknowledged(0)) < 20 or len(load.acknowledged(1)) < 20:
                await asyncio.sleep(0.05)

            await freeze_while_holding_the_head_lock(frozen, database_url)
            stopped_at = time.monotonic()
            await asyncio.sleep(FROZEN_S)
            os.kill(frozen.pid, signal.SIGCONT)
            continued_at = time.monotonic()
            while len(load.acknowledged(0, after=continued_at)) < 20:
                assert time.monotonic() < continued_at + 60, "the frozen process did not recover"
                await asyncio.sleep(0.05)
            load.running = False
            await asyncio.wait_for(asyncio.gather(*clients), CLIENT_TIMEOUT_S * 2)

            # The other process went on acknowledging, each attempt answered in bounded time, none refused.
            assert len(load.acknowledged(1, after=stopped_at + FROZEN_S / 2, before=continued_at)) > 0
            attempts = [a for s in load.sent if s.service == 1 for a in s.attempts
                        if stopped_at <= a[0] <= continued_at]
            assert all(status == 201 for _, _, status in attempts), [a for a in attempts if a[2] != 201]
            assert max(answered - started for started, answered, _ in attempts) < ACKNOWLEDGED_WITHIN_S

            # Nothing acknowledged lost or doubled: each acknowledged purchase once, at its answered position.
            events = await read_all_events(admin)
            assert_log_is_well_formed(events)
            purchases = {(e["stream_id"], e["data"]["purchase_id"]): e
                         for e in events if e["type"] == "purchase_recorded"}
            for sent in load.sent:
                status, body = sent.answer
                assert status == 201, (sent, body)
                event = purchases[(sent.member, sent.purchase_id)]
                assert event["command_id"] == f"k-{sent.purchase_id}"
                assert event["position"] <= body["position"]
            assert len(purchases) == len(load.sent)
            await assert_chain_verifies(admin)
    finally:
        if frozen.process is not None and frozen.process.poll() is None:
            os.kill(frozen.pid, signal.SIGCONT)  # a stopped process would not die of SIGKILL's reaping wait
        frozen.close()
        other.close()

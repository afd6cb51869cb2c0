"""Read-your-writes across processes: reads served from the member cache are never stale.

Two real service processes on one database. Writers post purchases through
either process; readers read ``/balance``, ``/tier`` and ``/members/{id}``
through either, with and without ``min_position``. A read must show every
purchase answered before the read was sent, whichever process answered it
(CONTRACT §4; README, member state cache: the consistency promise). Each
member's purchases only ever add to ``lifetime_earned``, ``growth_window``
and ``orders_365d``, so the sums of the answers received before a read are
a floor the read must reach.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field

import aiohttp
import pytest

from ledger import application, store
from ledger import commands as cmd
from ledger.application import Ledger, fact_of
from ledger.clock import ManualClock
from ledger.database import create_pool
from ledger.follower import UNREAD_LAG_MAX_EVENTS, LogFollower
from ledger.programme import Programme
from ledger.state import fold
from ledger.store import EventStore
from tests.service_process import Client, ServiceProcess, create_key
from tests.support import TUESDAY

pytestmark = pytest.mark.asyncio

MEMBERS = 3  # few, so writers through both processes keep hitting the same members
WRITERS = 4
READERS = 4
WRITES_PER_WRITER = 40


@pytest.fixture
async def two_services(database_url):
    env = {"LOYALTY_PROJECTORS": "off"}  # the member reads need none; they would only take CPU
    first = ServiceProcess(database_url, env=env)
    second = ServiceProcess(database_url, env=env, admin_key=first.admin_key)
    await asyncio.gather(first.start(), second.start())
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            key = await create_key(session, first, "admin", "read-your-writes")
            yield [Client(session, s.url, key) for s in (first, second)]
    finally:
        first.close()
        second.close()


@dataclass
class Answered:
    """What the purchases answered so far add up to, per member: what any later read must show."""

    points: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    growth: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    orders: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    position: int = 0

    def floor(self, member_id: str) -> tuple[int, int, int]:
        return self.points[member_id], self.growth[member_id], self.orders[member_id]

    def add(self, member_id: str, answer: dict) -> None:
        self.points[member_id] += answer["points"]
        self.growth[member_id] += answer["growth"]
        self.orders[member_id] += 1
        self.position = max(self.position, answer["position"])


async def purchase(client: Client, member_id: str, purchase_id: str, amount_cents: int) -> dict:
    for _attempt in range(50):
        status, answer, _ = await client.post(
            f"/v1/members/{member_id}/purchases",
            {"purchase_id": purchase_id, "store_id": "s1", "amount_cents": amount_cents},
            **{"Idempotency-Key": purchase_id},
        )
        if status != 503:  # contention between the processes: retry with the same key
            assert status == 201, answer
            return answer
        await asyncio.sleep(0.01)
    raise AssertionError(f"purchase {purchase_id} was 503 fifty times")


async def assert_read_shows(client: Client, member_id: str, floor: tuple[int, int, int], endpoint: str,
                            min_position: int | None) -> None:
    """The read through ``client`` shows at least what was answered before it was sent."""
    points, growth, orders = floor
    params = {} if min_position is None else {"min_position": str(min_position)}
    if endpoint == "balance":
        status, body, _ = await client.get(f"/v1/members/{member_id}/balance", **params)
        shown = body["lifetime_earned"], points
    elif endpoint == "tier":
        status, body, _ = await client.get(f"/v1/members/{member_id}/tier", **params)
        shown = body["growth_window"], growth
    else:
        status, body, _ = await client.get(f"/v1/members/{member_id}", **params)
        shown = body["orders_365d"], orders
    assert status == 200, body
    assert shown[0] >= shown[1], f"stale {endpoint} of {member_id} through {client.base_url}: {shown[0]} < {shown[1]}"


async def enrol(client: Client, member_id: str) -> None:
    status, body, _ = await client.post("/v1/members", {"member_id": member_id,
                                                        "identities": [{"type": "email", "value": f"{member_id}@x.test"}]})
    assert status == 201, body


async def test_a_write_answered_by_either_process_is_read_through_the_other(two_services):
    """Concurrent writers through both processes; each writer reads its write back through the other
    process at once, and readers through both read whatever was answered before they asked."""
    clients = two_services
    members = [f"ryw{n}" for n in range(MEMBERS)]
    for member_id in members:
        await enrol(clients[0], member_id)
    answered, writing = Answered(), asyncio.Event()

    async def writer(number: int) -> None:
        rng = random.Random(number)
        for n in range(WRITES_PER_WRITER):
            member_id, through = rng.choice(members), rng.randrange(2)
            answer = await purchase(clients[through], member_id, f"w{number}-{n}", rng.randint(100, 50_000))
            answered.add(member_id, answer)
            # The writer's own read, through the other process: with the position it was given, or without.
            await assert_read_shows(clients[1 - through], member_id, answered.floor(member_id),
                                    rng.choice(["balance", "tier", "member"]),
                                    rng.choice([None, answer["position"]]))

    async def reader(number: int) -> None:
        rng = random.Random(1000 + number)
        while not writing.is_set():
            member_id = rng.choice(members)
            floor, position = answered.floor(member_id), answered.position  # as of before the read is sent
            await assert_read_shows(clients[rng.randrange(2)], member_id, floor,
                                    rng.choice(["balance", "tier", "member"]),
                                    rng.choice([None, None, position or None]))

    readers = [asyncio.create_task(reader(n)) for n in range(READERS)]
    try:
        await asyncio.gather(*(writer(n) for n in range(WRITERS)))
    finally:
        writing.set()
    await asyncio.gather(*readers)
    for member_id in members:  # nothing in flight now: both processes show exactly what was answered
        for client in clients:
            status, body, _ = await client.get(f"/v1/members/{member_id}/balance")
            assert body["lifetime_earned"] == answered.points[member_id]


async def test_a_write_is_read_at_once_through_the_process_that_answered_it(two_services):
    clients = two_services
    await enrol(clients[0], "own")
    answered = Answered()
    for n in range(30):
        client = clients[n % 2]
        answer = await purchase(client, "own", f"own-{n}", 1_000 + n)
        answered.add("own", answer)
        for endpoint in ("balance", "tier", "member"):
            await assert_read_shows(client, "own", answered.floor("own"), endpoint, None)
            await assert_read_shows(client, "own", answered.floor("own"), endpoint, answer["position"])


async def test_a_member_enrolled_through_one_process_is_found_through_the_other(two_services):
    """A member the other process once answered 404 for (nothing cached) is read once enrolled."""
    clients = two_services
    status, body, _ = await clients[1].get("/v1/members/late/balance")
    assert status == 404, body
    await enrol(clients[0], "late")
    status, body, _ = await clients[1].get("/v1/members/late/balance")
    assert status == 200, body


# -- the cache's rules, in-process: two ledgers (two "processes") with their own pools on one database ----


@pytest.fixture
async def two_ledgers(database_url):
    clock = ManualClock(TUESDAY)
    pools = [await create_pool(database_url) for _ in range(2)]
    ledgers = [Ledger(EventStore(pool, clock), Programme(), clock) for pool in pools]
    try:
        await ledgers[0].follow_log()
        yield ledgers
    finally:
        await ledgers[0].stop_following()
        for pool in pools:
            await pool.close()


def stream_version(outcome) -> int:
    return json.loads(outcome.body)["stream_version"]


def bought(number: int) -> cmd.RecordPurchase:
    return cmd.RecordPurchase(purchase_id=f"p{number}", store_id="s", amount_cents=10_000)


async def test_a_member_loaded_from_its_snapshot_and_tail_is_the_member_folded_from_every_event(two_ledgers):
    """The first load of a member with a long history leaves a snapshot; a later process's load starts from it."""
    first, writer = two_ledgers
    await writer.execute("enrol", "m1", cmd.Enrol(member_id="m1"))
    for number in range(60):
        await writer.execute("purchase", "m1", bought(number))
    await first.read("m1")  # not cached here: loaded from every event, and a snapshot saved
    for number in range(60, 65):
        await writer.execute("purchase", "m1", bought(number))
    later = Ledger(EventStore(first.store.pool, writer.clock), Programme(), writer.clock)
    loaded = await later.read("m1")
    every_event = fold(fact_of(envelope) for envelope in await writer.store.read_stream("m1"))
    assert later._snapshot_versions["m1"] < loaded.version  # started from the snapshot, then the tail
    assert loaded == every_event


async def test_a_member_longer_than_a_page_loads_whole(two_ledgers, monkeypatch):
    """A cold load reads the snapshot's first page, then pages on until a short one."""
    first, writer = two_ledgers
    await writer.execute("enrol", "m1", cmd.Enrol(member_id="m1"))
    for number in range(3):
        await writer.execute("purchase", "m1", bought(number))
    every_event = fold(fact_of(envelope) for envelope in await writer.store.read_stream("m1"))
    assert every_event.version > 6  # more than two pages of 3
    for module in (application, store):
        monkeypatch.setattr(module, "MAX_READ_LIMIT", 3)
    assert await first.read("m1") == every_event  # not cached here: loaded page by page


async def test_a_read_shows_an_append_of_another_process_whose_notification_never_came(two_ledgers):
    """The follower here does not LISTEN at all: only the catch-up begun by the read makes it current."""
    reader, writer = two_ledgers
    enrolled = await reader.execute("enrol", "m1", cmd.Enrol(member_id="m1"))
    assert (await reader.read("m1")).version == stream_version(enrolled)  # cached now
    outcome = await writer.execute("purchase", "m1", bought(1))
    assert (await reader.read("m1")).version == stream_version(outcome)
    outcome = await writer.execute("purchase", "m1", bought(2))
    assert (await reader.read("m1", min_position=outcome.position)).version == stream_version(outcome)


async def test_a_state_read_before_another_process_appended_is_not_cached(two_ledgers):
    """The race of a load: its query ran before the other process's append, which the follower applies
    while the load still holds the member's lock. The loaded state answers that load, but is not cached."""
    reader, writer = two_ledgers
    await reader.execute("enrol", "m1", cmd.Enrol(member_id="m1"))
    async with reader._locks.hold("m1"):  # a load under way: its state read from the log before the purchase
        loaded = await reader.store.read_stream("m1")
        outcome = await writer.execute("purchase", "m1", bought(1))
        await reader.follower.current()
        stale = fold(fact_of(envelope) for envelope in loaded)
        reader._remember("m1", stale)
        assert reader._cached("m1") is None
    assert (await reader.read("m1")).version == stream_version(outcome)


async def test_a_member_being_changed_here_is_not_read_from_the_cache(two_ledgers):
    """A command holding the member's lock may have evolved the cached state with events not yet
    committed: a read waits for the lock instead of reading them."""
    reader, _writer = two_ledgers
    enrolled = await reader.execute("enrol", "m1", cmd.Enrol(member_id="m1"))
    async with reader._locks.hold("m1"):
        reading = asyncio.create_task(reader.read("m1"))
        await asyncio.sleep(0)  # the read has started and waits for the catch-up, then the lock
        await reader.follower.current()
        assert not reading.done()
    assert (await reading).version == stream_version(enrolled)


async def test_without_readers_the_follower_stays_within_its_bound_of_the_head():
    """Notifications with nobody reading: no catch-up until the cache is UNREAD_LAG_MAX_EVENTS behind,
    then one, so the first read after a write-only burst never reads the whole burst."""
    queries: list[int] = []

    async def read_after(after: int, limit: int):
        queries.append(after)
        return [(position, "m1", position) for position in range(after + 1, head + 1)][:limit]

    follower = LogFollower(read_after, lambda rows: None, applied=0)
    for head in range(1, UNREAD_LAG_MAX_EVENTS):
        follower.heard(head)
    await asyncio.sleep(0)
    assert queries == [] and follower.applied == 0
    head = UNREAD_LAG_MAX_EVENTS
    follower.heard(head)
    for _ in range(3):
        await asyncio.sleep(0)
    assert queries == [0] and follower.applied == head
    await follower.stop()

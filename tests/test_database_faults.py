"""Database faults: connections cut, the database down or silent; the service says 503 and recovers.

While it cannot write, every answer is a 503 problem+json with Retry-After
(never a 500, never a hang past a bounded time) and /readyz says 503; when the
database is back the service recovers without a restart, and a retry of every
refused request with its Idempotency-Key lands it exactly once.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import datetime, timedelta, timezone

import aiohttp
import pytest

from tests.service_process import (
    Client,
    FaultyProxy,
    ServiceProcess,
    assert_balances_equal_replay,
    assert_chain_verifies,
    assert_log_is_well_formed,
    create_key,
    read_all_events,
    terminate_backends,
)

pytestmark = pytest.mark.asyncio

# A request answers within this even when the database does not: the bound the tests hold the service to
# (the default LOYALTY_REQUEST_DEADLINE_S plus slack); the silent-database test sets a shorter deadline.
ANSWER_WITHIN_S = 12.0
DEADLINE_S = 3.0
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=ANSWER_WITHIN_S + 3)


def assert_unavailable(status: int, body: dict, headers: dict) -> None:
    """The refusal a client can act on: 503, problem+json, a code, Retry-After."""
    assert status == 503, (status, body)
    assert headers.get("Content-Type", "").startswith("application/problem+json"), headers
    assert body["status"] == 503 and body["code"], body
    assert int(headers["Retry-After"]) >= 1, headers


class Retrying:
    """Sends a request until it is answered with something other than 503, checking every answer."""

    def __init__(self, base_url: str, key: str) -> None:
        self.base_url, self.key = base_url, key
        self.unavailable = 0
        self.disconnected = 0
        self.slowest_s = 0.0
        self.answers: dict[str, tuple[int, dict]] = {}

    async def send(self, session: aiohttp.ClientSession, path: str, body: dict, key: str, deadline_s: float = 60) -> tuple[int, dict]:
        give_up = time.monotonic() + deadline_s
        while time.monotonic() < give_up:
            started = time.monotonic()
            try:
                async with session.post(self.base_url + path, json=body,
                                        headers={"Authorization": f"Bearer {self.key}", "Idempotency-Key": key}) as response:
                    status, answer, headers = response.status, await response.json(content_type=None), dict(response.headers)
            except asyncio.TimeoutError:
                raise AssertionError(f"{path} hung for more than {CLIENT_TIMEOUT.total} s") from None
            except aiohttp.ServerDisconnectedError:
                # A kept-alive connection the service closed meanwhile (as after a 503 at its
                # deadline): a client holding an Idempotency-Key sends the request again.
                self.disconnected += 1
                continue
            self.slowest_s = max(self.slowest_s, time.monotonic() - started)
            assert status != 500, answer
            if status == 503:
                assert_unavailable(status, answer, headers)
                self.unavailable += 1
                await asyncio.sleep(0.05)
                continue
            self.answers[key] = (status, answer)
            return status, answer
        raise AssertionError(f"{path} never answered with anything but 503")


def purchase(member: str, n: int, client: int) -> tuple[str, dict, str]:
    return (f"/v1/members/{member}/purchases",
            {"purchase_id": f"p-{client}-{n}", "store_id": "s1", "amount_cents": 1000 + 37 * n},
            f"k-{client}-{n}")


async def assert_everything_once(admin: Client, sent: dict[str, tuple[str, dict]], answers: dict[str, tuple[int, dict]]) -> None:
    events = await read_all_events(admin)
    assert_log_is_well_formed(events)
    recorded = {(e["stream_id"], e["data"]["purchase_id"]): e for e in events if e["type"] == "purchase_recorded"}
    for key, (path, body) in sent.items():
        status, answer = answers[key]
        assert status == 201, answer
        event = recorded[(path.split("/")[3], body["purchase_id"])]
        assert event["command_id"] == key
    assert len(recorded) == len(sent)
    await assert_chain_verifies(admin)
    await assert_balances_equal_replay(admin, events, datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=1))


async def assert_ready_again(admin: Client, within_s: float = 10) -> None:
    """/readyz says 200 again soon (a connection cut just before may still fail one probe)."""
    give_up = time.monotonic() + within_s
    while True:
        status, body, headers = await admin.get("/readyz")
        if status == 200:
            return
        assert_unavailable(status, body, headers)
        assert time.monotonic() < give_up, body
        await asyncio.sleep(0.1)


async def enrol(admin: Client, members: int) -> None:
    for m in range(members):
        status, body, _ = await admin.post("/v1/members", {"member_id": f"m{m}"})
        assert status == 201, body


async def test_connections_terminated_under_load_answer_503_never_500_and_lose_nothing(database_url):
    async with ServiceProcess(database_url) as service, aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        admin = Client(session, service.url, service.admin_key)
        await enrol(admin, 4)
        key = await create_key(session, service, "checkout")
        retrying = Retrying(service.url, key)
        sent = {}
        stop = asyncio.Event()
        terminated = 0

        async def cut_connections():
            nonlocal terminated
            while not stop.is_set():
                await asyncio.sleep(random.uniform(0.02, 0.15))
                terminated += await terminate_backends(database_url)

        async def client(number: int):
            for n in range(40):
                path, body, idem = purchase(f"m{(number + n) % 4}", n, number)
                sent[idem] = (path, body)
                await retrying.send(session, path, body, idem)

        cutter = asyncio.create_task(cut_connections())
        try:
            await asyncio.wait_for(asyncio.gather(*(client(c) for c in range(4))), 90)
        finally:
            stop.set()
            await cutter
        assert terminated > 0
        print(f"{terminated} connections terminated; {retrying.unavailable} answers were 503; "
              f"slowest answer {retrying.slowest_s:.2f} s")
        assert retrying.slowest_s < ANSWER_WITHIN_S

        await assert_ready_again(admin)
        await assert_everything_once(admin, sent, retrying.answers)

        # The LISTEN connection was cut too: a long poll still wakes at once when an event is appended.
        head = (await admin.get("/v1/audit/verify"))[1]["head_position"]
        started = time.monotonic()
        poll = asyncio.create_task(admin.get("/v1/events", after=head, wait_ms=10_000))
        await asyncio.sleep(0.3)
        path, body, idem = purchase("m0", 999, 99)
        await retrying.send(session, path, body, idem)
        status, page, _ = await poll
        assert status == 200 and page["events"], page
        assert time.monotonic() - started < 5, "the long poll did not wake: the listener was not re-established"


async def test_database_down_or_restarted_answers_503_with_retry_after_and_recovers_by_itself(database_url):
    proxy = await FaultyProxy(database_url).start()
    service = ServiceProcess(proxy.proxied_url)
    try:
        await service.start()
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            admin = Client(session, service.url, service.admin_key)
            await enrol(admin, 2)
            key = await create_key(session, service, "checkout")
            checkout = Client(session, service.url, key)
            retrying = Retrying(service.url, key)
            sent = {}
            for n in range(5):
                path, body, idem = purchase("m0", n, 0)
                sent[idem] = (path, body)
                await retrying.send(session, path, body, idem)

            await proxy.refuse()
            refused = []
            for n in range(5, 10):
                path, body, idem = purchase("m1", n, 0)
                started = time.monotonic()
                status, answer, headers = await checkout.post(path, body, **{"Idempotency-Key": idem})
                assert time.monotonic() - started < ANSWER_WITHIN_S
                assert_unavailable(status, answer, headers)
                sent[idem] = (path, body)
                refused.append((path, body, idem))
            status, answer, headers = await admin.get("/v1/members/m0/balance")
            assert_unavailable(status, answer, headers)
            status, answer, headers = await admin.get("/readyz")
            assert status == 503 and headers.get("Retry-After"), answer

            await proxy.heal()
            # No restart: the service finds the database again by itself.
            for path, body, idem in refused:
                await retrying.send(session, path, body, idem, deadline_s=30)

            # A restart under load: writes in flight when the database goes away are retried
            # with their keys until answered, and each lands once.
            async def client(number: int):
                for n in range(25):
                    path, body, idem = purchase(f"m{n % 2}", n, 10 + number)
                    sent[idem] = (path, body)
                    await retrying.send(session, path, body, idem, deadline_s=60)

            load = asyncio.gather(*(client(c) for c in range(4)))
            for _restart in range(2):
                await asyncio.sleep(0.3)
                await proxy.refuse()
                await asyncio.sleep(1.0)
                await proxy.heal()
            await asyncio.wait_for(load, 90)
            status, answer, _ = await admin.get("/readyz")
            assert status == 200, answer
            await assert_everything_once(admin, sent, retrying.answers)
    finally:
        service.close()
        await proxy.close()


async def test_silent_database_answers_503_within_a_bounded_time(database_url):
    proxy = await FaultyProxy(database_url).start()
    service = ServiceProcess(proxy.proxied_url, env={"LOYALTY_REQUEST_DEADLINE_S": str(DEADLINE_S)})
    try:
        await service.start()
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            admin = Client(session, service.url, service.admin_key)
            await enrol(admin, 1)
            key = await create_key(session, service, "checkout")
            checkout = Client(session, service.url, key)
            retrying = Retrying(service.url, key)

            proxy.blackhole()  # a partition: connections open, nothing answers
            path, body, idem = purchase("m0", 1, 0)
            started = time.monotonic()
            status, answer, headers = await checkout.post(path, body, **{"Idempotency-Key": idem})
            elapsed = time.monotonic() - started
            assert_unavailable(status, answer, headers)
            assert elapsed < DEADLINE_S + 1, elapsed
            started = time.monotonic()
            status, answer, headers = await admin.get("/readyz")
            assert status == 503 and time.monotonic() - started < 5, answer

            await proxy.heal()
            await retrying.send(session, path, body, idem, deadline_s=30)
            status, answer, _ = await admin.get("/readyz")
            assert status == 200, answer
            await assert_everything_once(admin, {idem: (path, body)}, retrying.answers)
    except BaseException:
        print(f"--- service log (tail) ---\n{service.output()[-8000:]}")
        raise
    finally:
        service.close()
        await proxy.close()

"""Publication to NATS JetStream through real service processes (CONTRACT §7, issue 16).

Each test runs ``loyalty serve`` (tests/service_process.py) with
``LOYALTY_NATS_URL`` pointing at a nats-server of its own, drives it over
HTTP, and ends by checking the stream against the log: every event once, in
position order, with the feed's body (``assert_published_once_in_order``).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from ledger.settings import Settings
from projections import publisher as pub
from tests.service_process import Client, ServiceProcess, free_port
from tests.support import running_api
from tests.test_publication import (
    assert_published_once_in_order,
    eventually,
    nats_client,
    published_position,
    wait_until_published,
)

pytestmark = pytest.mark.asyncio

MEMBERS = 4
TIMEOUT = aiohttp.ClientTimeout(total=15)


def purchase(member: int, n: int, tag: str) -> tuple[str, dict, str]:
    body = {"purchase_id": f"p-{tag}-{n}", "store_id": "s1", "amount_cents": 10_000 + n}
    return f"/v1/members/m{member}/purchases", body, f"k-{tag}-{n}"


async def enrol_members(client: Client) -> None:
    for member in range(MEMBERS):
        status, body, _ = await client.post("/v1/members", {"member_id": f"m{member}"})
        assert status == 201, body


async def send_until_answered(client: Client, path: str, body: dict, key: str, deadline_s: float = 60) -> int:
    """One command, resent with its Idempotency-Key while the service is down or restarting."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            status, answer, _ = await client.post(path, body, **{"Idempotency-Key": key})
            if status != 503:
                assert status == 201, answer
                return status
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        assert time.monotonic() < deadline, f"no answer for {key}"
        await asyncio.sleep(0.05)


async def load(clients: list[Client], purchases: int, tag: str) -> None:
    """``purchases`` purchases spread over the members, sent round-robin to the clients' services."""
    for n in range(purchases):
        path, body, key = purchase(n % MEMBERS, n, tag)
        await send_until_answered(clients[n % len(clients)], path, body, key)


async def publisher_entry(client: Client) -> dict:
    status, body, _ = await client.get("/v1/projections")
    assert status == 200, body
    entries = [p for p in body["projections"] if p["name"] == "publisher"]
    assert len(entries) == 1, body
    return entries[0]


async def metric(client: Client, name: str) -> float:
    async with client.session.get(client.base_url + "/metrics") as response:
        text = await response.text()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


async def test_a_service_killed_mid_load_and_restarted_publishes_every_event_once_in_order(
    database_url, pool, nats_server
):
    service = ServiceProcess(database_url, env={"LOYALTY_NATS_URL": nats_server.url})
    async with service, aiohttp.ClientSession(timeout=TIMEOUT) as session:
        client = Client(session, service.url, service.admin_key)
        await enrol_members(client)
        loading = asyncio.get_running_loop().create_task(load([client], 120, "kill"))
        await eventually(lambda: published_position(nats_server.url), what="a first message")
        assert not loading.done()
        service.kill()  # mid-load: publisher, projectors and requests in flight die with it
        await service.start()
        await loading
        await wait_until_published(pool, nats_server.url)
        assert (await publisher_entry(client))["lag_events"] == 0
    await assert_published_once_in_order(pool, nats_server.url)


async def test_commands_all_succeed_while_nats_is_down_and_publication_catches_up(database_url, pool, nats_server):
    service = ServiceProcess(database_url, env={"LOYALTY_NATS_URL": nats_server.url})
    async with service, aiohttp.ClientSession(timeout=TIMEOUT) as session:
        client = Client(session, service.url, service.admin_key)
        await enrol_members(client)
        await wait_until_published(pool, nats_server.url)
        nats_server.stop()
        for n in range(40):  # once each: a command never waits for NATS nor fails with it
            path, body, key = purchase(n % MEMBERS, n, "down")
            status, answer, _ = await client.post(path, body, **{"Idempotency-Key": key})
            assert status == 201, answer
        entry = await eventually(lambda: _failed_entry(client), what="the publisher to report NATS down")
        assert entry["lag_events"] > 0 and "NATS" in entry["reason"], entry
        assert await metric(client, "loyalty_publish_lag_events") == entry["lag_events"]
        await nats_server.start()
        await wait_until_published(pool, nats_server.url)
        entry = await publisher_entry(client)
        assert entry["state"] == "live" and entry["lag_events"] == 0 and "reason" not in entry, entry
    await assert_published_once_in_order(pool, nats_server.url)


async def _failed_entry(client: Client) -> dict | None:
    entry = await publisher_entry(client)
    return entry if entry["state"] == "failed" else None


async def test_two_services_and_a_publish_worker_on_one_database_publish_each_event_once(
    database_url, pool, nats_server
):
    env = {"LOYALTY_NATS_URL": nats_server.url}
    first, second = ServiceProcess(database_url, env=env), ServiceProcess(database_url, env=env)
    worker = ServiceProcess(database_url, env=env, command=("publish",))
    async with first, second, aiohttp.ClientSession(timeout=TIMEOUT) as session:
        worker.spawn()
        try:
            await eventually(lambda: _started(worker), what="the publication worker to start")
            clients = [Client(session, s.url, s.admin_key) for s in (first, second)]
            await enrol_members(clients[0])
            loading = asyncio.get_running_loop().create_task(load(clients[1:], 60, "two"))
            await load(clients, 60, "both")
            first.kill()  # whoever led, a standby (the other service or the worker) carries on
            await loading
            await wait_until_published(pool, nats_server.url)
            assert worker.process.poll() is None, worker.output()
            assert await worker.terminate() == 0
        finally:
            worker.close()
    await assert_published_once_in_order(pool, nats_server.url)


async def _started(worker: ServiceProcess) -> bool:
    return "publication worker started" in worker.output()


async def test_bad_configuration_is_a_failed_publisher_with_the_reason_never_a_crash(database_url, nats_server):
    unreachable = f"nats://127.0.0.1:{free_port()}"
    service = ServiceProcess(database_url, env={"LOYALTY_NATS_URL": unreachable})
    async with service, aiohttp.ClientSession(timeout=TIMEOUT) as session:
        client = Client(session, service.url, service.admin_key)
        await enrol_members(client)
        entry = await eventually(lambda: _failed_entry(client), what="the failed state")
        assert entry["reason"].startswith(f"cannot reach NATS at {unreachable}"), entry
        assert "publisher to LOYALTY failed: cannot reach NATS" in service.output()

        async with nats_client(nats_server.url) as (_nc, js):
            await js.add_stream(name=pub.STREAM, subjects=["orders.>"])
        service.kill()
        service.extra_env["LOYALTY_NATS_URL"] = nats_server.url
        await service.start()
        entry = await eventually(
            lambda: _failed_entry_saying(client, "orders.>"), what="the failed state naming the stream's subjects"
        )
        assert "LOYALTY" in entry["reason"], entry
        status, body, _ = await client.post(*purchase(0, 1, "bad")[:2])
        assert status == 201, body
        assert service.process.poll() is None
        status, _, _ = await client.get("/readyz")
        assert status == 200


async def _failed_entry_saying(client: Client, words: str) -> dict | None:
    entry = await _failed_entry(client)
    return entry if entry is not None and words in entry["reason"] else None


async def test_the_publisher_entry_is_listed_only_when_a_nats_url_is_set(pool):
    async with running_api(pool) as api:
        _, body, _ = await api.get("/v1/projections")
        assert "publisher" not in [p["name"] for p in body["projections"]]
    async with running_api(pool, settings=Settings(rate_limit_per_s=None, nats_url="nats://127.0.0.1:1")) as api:
        _, body, _ = await api.get("/v1/projections")
        entry = body["projections"][-1]
        assert entry["name"] == "publisher" and set(entry) >= {
            "name", "position", "head", "lag_events", "lag_seconds", "state"}, entry

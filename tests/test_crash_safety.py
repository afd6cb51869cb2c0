"""Crash safety: a service killed with SIGKILL mid-load loses no acknowledged write and doubles none.

The real service runs as a subprocess on a fresh database. Several clients
post purchases (referees' first purchases among them, which append to the
referrer's stream too) and redemptions with Idempotency-Keys; the service is killed
twice mid-load and restarted; every request that got no answer is sent again
with the same key and body until it gets one. Then the log is checked against
what the clients were told.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import aiohttp
import pytest

from tests.service_process import (
    Client,
    ServiceProcess,
    assert_balances_equal_replay,
    assert_chain_verifies,
    assert_log_is_well_formed,
    create_key,
    enrol_members,
    read_all_events,
    run_cli,
    wait_for_projections,
)

pytestmark = pytest.mark.asyncio

MEMBERS = 6
CLIENTS = 6
COMMANDS_PER_CLIENT = 50
KILLS = 2
REQUEST_TIMEOUT_S = 15
# Referees of m0, m1 and m2 (36 of them: 12 a referrer, past the default monthly cap of 10).
REFEREES = [(f"f{n}", f"m{n % 3}") for n in range(36)]


@dataclass
class Request:
    """One command as a client sends it, and every answer it got."""

    path: str
    body: dict
    key: str
    answers: list[tuple[int, dict, bool]] = field(default_factory=list)  # status, body, replayed
    interrupted: int = 0  # sends cut by the kill

    @property
    def first(self) -> tuple[int, dict, bool]:
        return self.answers[0]


class Load:
    """Clients that keep sending; while the service is down they wait and resend the same request."""

    def __init__(self, service: ServiceProcess, key: str) -> None:
        self.service, self.key = service, key
        self.up = asyncio.Event()
        self.up.set()
        self.acknowledged = 0

    async def send(self, session: aiohttp.ClientSession, request: Request) -> None:
        for _attempt in range(200):
            try:
                async with session.post(
                    self.service.url + request.path,
                    json=request.body,
                    headers={"Authorization": f"Bearer {self.key}", "Idempotency-Key": request.key},
                ) as response:
                    body = await response.json(content_type=None)
                    replayed = response.headers.get("Idempotent-Replayed") == "true"
                    status = response.status
            except (aiohttp.ClientError, asyncio.TimeoutError):
                request.interrupted += 1
                await asyncio.wait_for(self.up.wait(), 60)
                await asyncio.sleep(random.random() * 0.05)
                continue
            assert status != 500, body
            if status == 503:  # the service says retry (a restart in progress)
                await asyncio.sleep(0.1)
                continue
            request.answers.append((status, body, replayed))
            self.acknowledged += 1
            return
        raise AssertionError(f"no answer for {request.key} after 200 attempts")

    async def client(self, requests: list[Request]) -> None:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for request in requests:
                await self.send(session, request)


def workload(rng: random.Random, client_number: int, backdated: str) -> list[Request]:
    requests = [
        Request(f"/v1/members/{referee}/purchases", {"purchase_id": f"first-{referee}", "store_id": "s1",
                                                     "amount_cents": rng.randrange(5_000, 60_000)}, f"k-{referee}")
        for referee, _referrer in REFEREES[client_number::CLIENTS]
    ]
    for n in range(COMMANDS_PER_CLIENT):
        member = f"m{rng.randrange(MEMBERS)}"
        if rng.random() < 0.55:
            # Backdated past the pending days so that the points can be redeemed now.
            body = {"purchase_id": f"p-{client_number}-{n}", "store_id": "s1",
                    "amount_cents": rng.randrange(1_000, 60_000), "occurred_at": backdated}
            requests.append(Request(f"/v1/members/{member}/purchases", body, f"k-{client_number}-{n}"))
        else:
            body = {"redemption_id": f"r-{client_number}-{n}", "points": rng.randrange(1, 12)}
            requests.append(Request(f"/v1/members/{member}/redemptions", body, f"k-{client_number}-{n}"))
    rng.shuffle(requests)
    return requests


def assert_referrals_all_or_nothing(events: list[dict], requests: list[Request]) -> None:
    """Every referee's first purchase has its coupon and (unless its referrer was capped) its reward,
    appended together (one command: the same key, consecutive positions); no reward or coupon without
    the purchase; no referee rewarded twice."""
    bought = {e["stream_id"]: e for e in events if e["type"] == "purchase_recorded"}
    coupons = {e["stream_id"]: e for e in events if e["type"] == "coupon_issued" and e["data"]["coupon_id"] == "referral-1"}
    rewards = [e for e in events if e["type"] == "points_earned" and e["data"].get("referral_of")]
    rewarded = {e["data"]["referral_of"]: e for e in rewards}
    assert len(rewarded) == len(rewards), "a referee rewarded twice"
    answers = {r.path.split("/")[3]: r.first[1] for r in requests if r.body.get("purchase_id", "").startswith("first-")}
    for referee, referrer in REFEREES:
        command = [e for e in events if e["command_id"] == f"k-{referee}"]
        positions = [e["position"] for e in command]
        assert positions == list(range(positions[0], positions[0] + len(positions))), command
        assert coupons[referee] in command and bought[referee] in command
        granted = answers[referee]["referral"]
        assert granted["referrer_id"] == referrer and granted["coupon_id"] == "referral-1"
        if granted["referrer_points"]:
            reward = rewarded[referee]
            assert reward["stream_id"] == referrer and reward == command[-1]
        else:
            assert referee not in rewarded
    assert set(rewarded) <= set(bought) and set(coupons) <= set(bought)
    for referrer in {referrer for _, referrer in REFEREES}:
        count = sum(1 for e in rewards if e["stream_id"] == referrer)
        assert count == 10, (referrer, count)  # 12 referees each, every one bought: the cap, exactly


async def test_sigkill_mid_load_loses_no_acknowledged_command_and_doubles_none(database_url):
    rng = random.Random(7)
    backdated = (datetime.now(timezone.utc) - timedelta(days=10)).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    service = ServiceProcess(database_url)
    await service.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
            admin = Client(session, service.url, service.admin_key)
            checkout_key = await create_key(session, service, "checkout", "till-crash")
            await enrol_members(admin, MEMBERS)
            for referee, referrer in REFEREES:
                status, body, _ = await admin.post("/v1/members", {"member_id": referee, "referred_by": referrer})
                assert status == 201, body

            load = Load(service, checkout_key)
            per_client = [workload(rng, c, backdated) for c in range(CLIENTS)]
            total = CLIENTS * COMMANDS_PER_CLIENT + len(REFEREES)
            clients = asyncio.gather(*(load.client(requests) for requests in per_client))
            for kill in range(1, KILLS + 1):
                # Kill once a share of the load is acknowledged, while the rest is in flight.
                while load.acknowledged < total * kill / (KILLS + 1):
                    await asyncio.sleep(0.005)
                load.up.clear()
                service.kill()
                await service.start()
                load.up.set()
            await asyncio.wait_for(clients, 120)

            requests = [r for requests in per_client for r in requests]
            interrupted = [r for r in requests if r.interrupted]
            print(f"{len(interrupted)} requests cut by {KILLS} kills; "
                  f"{sum(1 for r in interrupted if r.first[2])} of them had committed before the kill")
            assert interrupted, "the kills cut no request: the test proved nothing"

            # Every request got an answer, and asking again gives the very same answer.
            for request in requests:
                status, body, headers = await Client(session, service.url, checkout_key).post(
                    request.path, request.body, **{"Idempotency-Key": request.key})
                first_status, first_body, _ = request.first
                assert (status, body) == (first_status, first_body), request
                assert headers.get("Idempotent-Replayed") == "true"

            events = await read_all_events(admin)
            assert_log_is_well_formed(events)
            by_natural_id = {}
            for event in events:
                data = event["data"]
                if event["type"] == "purchase_recorded":
                    by_natural_id[(event["stream_id"], data["purchase_id"])] = event
                elif event["type"] == "points_redeemed":
                    by_natural_id[(event["stream_id"], data["redemption_id"])] = event
            for request in requests:
                status, body, _ = request.first
                member = request.path.split("/")[3]
                natural = request.body.get("purchase_id") or request.body.get("redemption_id")
                if status == 201:
                    # Acknowledged: in the log exactly once (the log is well formed: no natural id twice),
                    # at the position the answer named, under the key the client sent.
                    event = by_natural_id[(member, natural)]
                    assert event["command_id"] == request.key
                    assert event["position"] <= body["position"]
                else:
                    assert status == 409 and body["code"] == "insufficient_points", body
                    assert (member, natural) not in by_natural_id
            assert sum(1 for r in requests if r.first[0] == 201) > total // 2
            assert_referrals_all_or_nothing(events, requests)

            await assert_chain_verifies(admin)
            as_of = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=1)
            balances = await assert_balances_equal_replay(admin, events, as_of)
            assert all(b["available"] >= 0 for b in balances.values())

            # The service's own projectors were killed with it: they agree with the log once caught up.
            await wait_for_projections(admin)
            replay = await asyncio.to_thread(run_cli, database_url, "replay")
            assert replay.returncode == 0, replay.stdout[-4000:] + replay.stderr[-4000:]
    finally:
        service.close()


async def post_batch(session: aiohttp.ClientSession, service: ServiceProcess, key: str, lines: list[dict]) -> list[dict]:
    body = "".join(json.dumps(line) + "\n" for line in lines)
    async with session.post(f"{service.url}/v1/batch", data=body,
                            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/x-ndjson"}) as response:
        assert response.status == 200, await response.text()
        results = [json.loads(line) for line in (await response.text()).splitlines()]
    assert all(r["status"] == 201 for r in results), [r for r in results if r["status"] != 201][:3]
    return results


def purchases(members: int, per_member: int, tag: str, backdated: str) -> list[dict]:
    return [{"op": "purchase", "member_id": f"m{m}", "idempotency_key": f"{tag}-{m}-{n}",
             "body": {"purchase_id": f"{tag}-{n}", "store_id": "s1", "amount_cents": 1_000 + 7 * n, "occurred_at": backdated}}
            for n in range(per_member) for m in range(members)]


async def test_projector_killed_mid_batch_resumes_and_applies_every_event_exactly_once(database_url):
    backdated = (datetime.now(timezone.utc) - timedelta(days=10)).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    # The service runs no projector of its own: the worker is the only one, and it is the one killed.
    service = ServiceProcess(database_url, env={"LOYALTY_PROJECTORS": "off"})
    worker = ServiceProcess(database_url, command=("project",))
    try:
        await service.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            admin = Client(session, service.url, service.admin_key)
            await post_batch(session, service, service.admin_key,
                             [{"op": "enrol", "member_id": f"m{m}", "body": {}} for m in range(40)])
            await post_batch(session, service, service.admin_key, purchases(40, 60, "a", backdated))

            kills = 0
            worker.spawn()
            while kills < 3:
                # Kill while the projector is behind, so a batch is most likely half applied.
                status, body, _ = await admin.get("/v1/projections")
                positions = [p["position"] for p in body["projections"]]
                head = body["projections"][0]["head"]
                if any(0 < position < head for position in positions):
                    worker.kill()
                    kills += 1
                    if kills == 2:  # more load while no projector runs
                        await post_batch(session, service, service.admin_key, purchases(40, 20, "b", backdated))
                    worker.spawn()
                else:
                    await asyncio.sleep(0.002)
            await wait_for_projections(admin, timeout_s=90)

            replay = await asyncio.to_thread(run_cli, database_url, "replay")
            assert replay.returncode == 0, replay.stdout[-4000:] + replay.stderr[-4000:]
            events = await read_all_events(admin)
            as_of = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=1)
            balances = await assert_balances_equal_replay(admin, events, as_of)
            status, liability, _ = await admin.get("/v1/programme/liability", as_of=as_of.isoformat())
            assert status == 200, liability
            assert liability["earned"] == sum(b["lifetime_earned"] for b in balances.values())
            assert liability["outstanding"] == sum(b["available"] + b["pending"] for b in balances.values())
    finally:
        worker.close()
        service.close()


async def test_export_then_import_into_an_empty_database_reproduces_the_head_hash_and_the_balances(
        database_url, blank_database_url, tmp_path):
    """The recovery drill: the log alone, exported and imported (in two goes), rebuilds the same ledger."""
    backdated = (datetime.now(timezone.utc) - timedelta(days=10)).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    expires = (datetime.now(timezone.utc) + timedelta(days=30)).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    as_of = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(minutes=1)
    members = 12
    history = [{"op": "enrol", "member_id": f"m{m}", "body": {"identities": [{"type": "phone", "value": f"1380000{m:04}"}]}}
               for m in range(members)]
    history += purchases(members, 8, "p", backdated)
    for m in range(members):
        history += [
            {"op": "return", "member_id": f"m{m}", "body": {"return_id": "x1", "purchase_id": "p-1", "amount_cents": 500}},
            {"op": "redemption", "member_id": f"m{m}", "body": {"redemption_id": "r1", "points": 2}},
            {"op": "adjustment", "member_id": f"m{m}", "body": {"adjustment_id": "a1", "points": 5 + m, "reason": "drill"}},
            {"op": "coupon_issue", "member_id": f"m{m}",
             "body": {"coupon_id": "c1", "template": "T", "value_cents": 500, "expires_at": expires}},
            {"op": "coupon_redemption", "member_id": f"m{m}",
             "body": {"coupon_id": "c1", "order_ref": "o1", "order_amount_cents": 900}},
        ]
    export_file = tmp_path / "log.jsonl"
    async with ServiceProcess(database_url) as original, aiohttp.ClientSession() as session:
        await post_batch(session, original, original.admin_key, history)
        source = Client(session, original.url, original.admin_key)
        source_report = await assert_chain_verifies(source)
        source_events = await read_all_events(source)
        source_views = {}
        for m in range(members):
            for view in ("balance", "tier"):
                status, body, _ = await source.get(f"/v1/members/m{m}/{view}", as_of=as_of.isoformat())
                assert status == 200, body
                source_views[(m, view)] = body
        exported = await asyncio.to_thread(run_cli, database_url, "export", "--out", str(export_file))
        assert exported.returncode == 0, exported.stderr[-3000:]

    lines = export_file.read_bytes().splitlines(keepends=True)
    assert len(lines) == source_report["head_position"]
    half = tmp_path / "half.jsonl"
    half.write_bytes(b"".join(lines[: len(lines) // 2]))  # an import interrupted half way...
    for file in (half, export_file):  # ...and run again with the whole file: it resumes
        imported = await asyncio.to_thread(run_cli, blank_database_url, "import", str(file))
        assert imported.returncode == 0, imported.stderr[-3000:]
    verified = await asyncio.to_thread(run_cli, blank_database_url, "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr[-3000:]
    report = json.loads(verified.stdout.strip().splitlines()[-1])
    assert (report["head_position"], report["head_hash"]) == (source_report["head_position"], source_report["head_hash"])

    async with ServiceProcess(blank_database_url) as restored, aiohttp.ClientSession() as session:
        target = Client(session, restored.url, restored.admin_key)
        assert await read_all_events(target) == source_events
        for (m, view), expected in source_views.items():
            status, body, _ = await target.get(f"/v1/members/m{m}/{view}", as_of=as_of.isoformat())
            assert (status, body) == (200, expected), (m, view)
        status, body, _ = await target.get("/v1/identities/phone/13800000003")
        assert body == {"member_id": "m3"}
        # A natural id used before the export still refuses a second effect after it.
        status, body, _ = await target.post("/v1/members/m0/purchases",
                                            {"purchase_id": "p-0", "store_id": "s1", "amount_cents": 99_999})
        assert status == 409 and body["code"] == "duplicate_id", body
        await wait_for_projections(target)
        replay = await asyncio.to_thread(run_cli, blank_database_url, "replay")
        assert replay.returncode == 0, replay.stdout[-4000:]

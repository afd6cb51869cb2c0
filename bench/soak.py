"""`make soak`: mixed load against the real service for SOAK_SECONDS (default 600) with faults injected.

Clients post purchases, redemptions and returns (each with an
Idempotency-Key, retried with the same key and body until answered) and read
balances, while the soak cuts the service's database connections
(pg_terminate_backend) every SOAK_FAULT_EVERY_S, kills the service
(SIGKILL, then a graceful SIGTERM restart) at a third and two thirds of the
run, and freezes it (SIGSTOP, then SIGCONT SOAK_FREEZE_S later, 25 s by
default: a GC pause, a frozen VM, most likely holding the head lock) half
way. The service's RSS is sampled every few seconds.

Then it checks what the issue asks: every acknowledged command's effect is in
the log exactly once (none lost, none doubled), nothing refused left a trace,
the hash chain verifies, balances equal a replay of the log, the projections
agree (`loyalty replay`), and RSS over the last run of the service (after a
warm-up) stays within 10%. Results go to bench/results/soak.json; the exit
code is 0 when every check passed.

    make soak                                    # 10 minutes
    SOAK_SECONDS=60 make soak                    # a quick look
    BENCH_DATABASE_URL=postgresql://... make soak  # on your own PostgreSQL

Not run in CI (it is long on purpose).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import signal
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp

from bench.env import Database
from tests.service_process import (
    Client,
    ServiceProcess,
    assert_balances_equal_replay,
    assert_chain_verifies,
    assert_log_is_well_formed,
    create_key,
    read_all_events,
    run_cli,
    terminate_backends,
    wait_for_projections,
)

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
CLIENTS = int(os.environ.get("SOAK_CLIENTS", "8"))
MEMBERS = int(os.environ.get("SOAK_MEMBERS", "2000"))
FAULT_EVERY_S = float(os.environ.get("SOAK_FAULT_EVERY_S", "20"))
FREEZE_S = float(os.environ.get("SOAK_FREEZE_S", "25"))  # under the clients' 30 s timeout: they wait it out
RSS_EVERY_S = float(os.environ.get("SOAK_RSS_EVERY_S", "1"))
RSS_GROWTH_MAX = 0.10
WARMUP_SHARE = 0.4  # of the last service run (the cache refilling), before RSS is held to the 10%
RETRY_GIVE_UP_S = 120.0  # a request still unanswered this long after the load stopped counts as lost


def say(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Sent:
    """One command and the first answer it got (after any retries)."""

    member_id: str
    kind: str  # purchase | redemption | return
    natural_id: str
    path: str
    body: dict
    key: str
    status: int | None = None
    attempts: int = 0


@dataclass
class Soak:
    service: ServiceProcess
    key: str
    reader_key: str
    started: float = field(default_factory=time.monotonic)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    up: asyncio.Event = field(default_factory=asyncio.Event)
    sent: list[Sent] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    reads: int = 0
    cut_off: int = 0  # sends cut by a fault (connection error or timeout)
    purchases: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # acknowledged, per member
    rss: list[tuple[float, float, int]] = field(default_factory=list)  # seconds, MiB, service run
    runs: int = 1
    faults: list[dict] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    # -- load ------------------------------------------------------------------

    async def send(self, session: aiohttp.ClientSession, sent: Sent) -> None:
        give_up = None
        while True:
            sent.attempts += 1
            try:
                async with session.post(self.service.url + sent.path, json=sent.body,
                                        headers={"Authorization": f"Bearer {self.key}",
                                                 "Idempotency-Key": sent.key}) as response:
                    status = response.status
                    await response.read()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                self.cut_off += 1
                status = None
            if status is not None:
                self.statuses[status] += 1
            if status is not None and status < 500:
                sent.status = status
                return
            if self.stop.is_set():
                give_up = give_up or time.monotonic() + RETRY_GIVE_UP_S
                if time.monotonic() > give_up:
                    return  # unanswered: counted as lost if its effect is missing
            try:
                await asyncio.wait_for(self.up.wait(), 60)
            except asyncio.TimeoutError:
                pass
            await asyncio.sleep(random.uniform(0.02, 0.2))

    async def client(self, number: int) -> None:
        rng = random.Random(number)
        backdated = (datetime.now(timezone.utc) - timedelta(days=10)).replace(microsecond=0)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            n = 0
            while not self.stop.is_set():
                n += 1
                member = f"m{rng.randrange(MEMBERS)}"
                roll = rng.random()
                key = f"c{number}-{n}"
                if roll < 0.1:
                    try:
                        async with session.get(f"{self.service.url}/v1/members/{member}/balance",
                                               headers={"Authorization": f"Bearer {self.reader_key}"}) as response:
                            await response.read()
                            self.statuses[response.status] += 1
                            self.reads += 1
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        await asyncio.sleep(0.1)
                    continue
                if roll < 0.2 and self.purchases.get(member):
                    purchase_id, amount = rng.choice(self.purchases[member])
                    sent = Sent(member, "return", f"x-{number}-{n}", f"/v1/members/{member}/returns",
                                {"return_id": f"x-{number}-{n}", "purchase_id": purchase_id,
                                 "amount_cents": max(1, amount // 3)}, key)
                elif roll < 0.4:
                    sent = Sent(member, "redemption", f"r-{number}-{n}", f"/v1/members/{member}/redemptions",
                                {"redemption_id": f"r-{number}-{n}", "points": rng.randrange(1, 8)}, key)
                else:
                    amount = rng.randrange(1_000, 80_000)
                    occurred = backdated + timedelta(seconds=self.elapsed())
                    sent = Sent(member, "purchase", f"p-{number}-{n}", f"/v1/members/{member}/purchases",
                                {"purchase_id": f"p-{number}-{n}", "store_id": "s1", "amount_cents": amount,
                                 "occurred_at": occurred.isoformat().replace("+00:00", "Z")}, key)
                self.sent.append(sent)
                await self.send(session, sent)
                if sent.kind == "purchase" and sent.status == 201:
                    self.purchases.setdefault(member, []).append((sent.natural_id, sent.body["amount_cents"]))

    # -- faults and samples ----------------------------------------------------

    async def inject_faults(self) -> None:
        restarts = {SECONDS / 3: "sigkill", SECONDS / 2: "sigstop", 2 * SECONDS / 3: "sigterm"}
        next_cut = FAULT_EVERY_S
        while not self.stop.is_set():
            await asyncio.sleep(0.5)
            now = self.elapsed()
            for at, how in list(restarts.items()):
                if now >= at:
                    del restarts[at]
                    await (self.freeze() if how == "sigstop" else self.restart(how))
            if now >= next_cut:
                next_cut += FAULT_EVERY_S
                cut = await terminate_backends(self.service.database_url)
                self.faults.append({"at_s": round(now, 1), "kind": "connections_terminated", "connections": cut})
                say(f"terminated {cut} database connections")

    async def restart(self, how: str) -> None:
        started = time.monotonic()
        self.up.clear()
        if how == "sigkill":
            self.service.kill()
        else:
            await self.service.terminate()
        await self.service.start(timeout_s=120)
        self.runs += 1
        self.up.set()
        down_s = time.monotonic() - started
        self.faults.append({"at_s": round(self.elapsed(), 1), "kind": f"service_{how}_restart", "down_s": round(down_s, 2)})
        say(f"service restarted after {how} ({down_s:.1f} s down)")

    async def freeze(self) -> None:
        """SIGSTOP the service for FREEZE_S, then SIGCONT: it must come back by itself, losing nothing."""
        os.kill(self.service.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(FREEZE_S)
        finally:
            os.kill(self.service.pid, signal.SIGCONT)
        self.faults.append({"at_s": round(self.elapsed(), 1), "kind": "service_sigstop", "frozen_s": FREEZE_S})
        say(f"service continued after {FREEZE_S:.0f} s stopped")

    async def sample_rss(self) -> None:
        while not self.stop.is_set():
            try:
                self.rss.append((round(self.elapsed(), 1), round(self.service.rss_bytes() / 2**20, 1), self.runs))
            except (FileNotFoundError, ProcessLookupError, AssertionError):
                pass  # between a kill and the restart
            await asyncio.sleep(RSS_EVERY_S)


def memory_verdict(samples: list[tuple[float, float, int]]) -> dict:
    """RSS of the last service run, after a warm-up: the last quarter against the first."""
    if not samples:
        return {"flat": False, "reason": "no samples"}
    last_run = samples[-1][2]
    run = [mib for _t, mib, r in samples if r == last_run]
    steady = run[int(len(run) * WARMUP_SHARE):]
    if len(steady) < 8:
        return {"flat": False, "reason": f"too few samples of the last run ({len(steady)})"}
    quarter = max(2, len(steady) // 4)
    first, last = statistics.mean(steady[:quarter]), statistics.mean(steady[-quarter:])
    growth = (last - first) / first
    return {"flat": growth <= RSS_GROWTH_MAX, "first_quarter_mib": round(first, 1), "last_quarter_mib": round(last, 1),
            "growth_pct": round(100 * growth, 2), "limit_pct": 100 * RSS_GROWTH_MAX, "max_mib": max(run),
            "samples_in_last_run": len(run)}


async def retrying(make_check, attempts: int = 20):
    """A check through the API, retried while the last fault's 503s are still being answered."""
    for attempt in range(attempts):
        try:
            return await make_check()
        except AssertionError as failure:
            if "503" not in str(failure) or attempt == attempts - 1:
                raise
            await asyncio.sleep(0.5)


async def verify(soak: Soak, session: aiohttp.ClientSession) -> dict:
    admin = Client(session, soak.service.url, soak.service.admin_key)
    checks: dict = {}
    events = await retrying(lambda: read_all_events(admin))
    checks["events"] = len(events)
    try:
        assert_log_is_well_formed(events)
        checks["log_well_formed"] = True
    except AssertionError as failure:
        checks["log_well_formed"] = f"FAILED: {failure}"
    effects = Counter()
    field_of = {"purchase_recorded": "purchase_id", "purchase_returned": "return_id", "points_redeemed": "redemption_id"}
    for event in events:
        if event["type"] in field_of:
            effects[(event["stream_id"], event["data"][field_of[event["type"]]])] += 1
    lost = [s.key for s in soak.sent if s.status == 201 and effects[(s.member_id, s.natural_id)] == 0]
    doubled = [s.key for s in soak.sent if effects[(s.member_id, s.natural_id)] > 1]
    phantom = [s.key for s in soak.sent if s.status not in (None, 201) and effects[(s.member_id, s.natural_id)] > 0]
    unanswered = [s.key for s in soak.sent if s.status is None]
    checks.update(acknowledged=sum(1 for s in soak.sent if s.status == 201),
                  refused=sum(1 for s in soak.sent if s.status not in (None, 201)),
                  unanswered=len(unanswered), lost=len(lost), doubled=len(doubled), refused_but_applied=len(phantom),
                  examples={"lost": lost[:5], "doubled": doubled[:5], "refused_but_applied": phantom[:5]})
    as_of = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=1)
    for name, check in (
        ("chain_verifies", lambda: assert_chain_verifies(admin)),
        ("balances_equal_replay", lambda: assert_balances_equal_replay(admin, events, as_of)),
        ("projections_caught_up", lambda: wait_for_projections(admin, timeout_s=300)),
    ):
        try:
            await retrying(check)
            checks[name] = True
        except AssertionError as failure:
            checks[name] = f"FAILED: {str(failure)[:500]}"
    replay = await asyncio.to_thread(run_cli, soak.service.database_url, "replay", timeout_s=1800)
    checks["projections_equal_replay"] = replay.returncode == 0 or f"FAILED: {replay.stdout[-500:]}"
    return checks


async def soak_run() -> dict:
    db = Database()
    try:
        url = await db.fresh("loyalty_soak")
        # A member's cached state grows with its history, and the cache is bounded by events
        # (ledger/application.py): a small bound is reached in the first minutes, so the RSS
        # measured after it shows whatever else would grow.
        service = ServiceProcess(url, env={"LOYALTY_CACHE_EVENTS": os.environ.get("SOAK_CACHE_EVENTS", "20000")})
        await service.start(timeout_s=120)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                key = await create_key(session, service, "checkout", "soak")
                reader_key = await create_key(session, service, "reader", "soak-reader")
                enrolments = "".join(json.dumps({"op": "enrol", "member_id": f"m{m}", "body": {}}) + "\n"
                                     for m in range(MEMBERS))
                async with session.post(f"{service.url}/v1/batch", data=enrolments, headers={
                        "Authorization": f"Bearer {service.admin_key}", "Content-Type": "application/x-ndjson"}) as response:
                    assert response.status == 200 and '"status":201' in await response.text()
                soak = Soak(service, key, reader_key)
                soak.up.set()
                say(f"{SECONDS:.0f} s, {CLIENTS} clients, {MEMBERS} members, a fault every {FAULT_EVERY_S:.0f} s")
                tasks = [asyncio.create_task(soak.client(n)) for n in range(CLIENTS)]
                helpers = [asyncio.create_task(soak.inject_faults()), asyncio.create_task(soak.sample_rss())]
                while soak.elapsed() < SECONDS:
                    await asyncio.sleep(min(30, SECONDS - soak.elapsed()))
                    say(f"{soak.elapsed():.0f} s: {len(soak.sent)} commands, {soak.reads} reads, "
                        f"RSS {soak.rss[-1][1] if soak.rss else '?'} MiB")
                soak.stop.set()
                await asyncio.gather(*helpers)
                await asyncio.gather(*tasks)
                duration_s = soak.elapsed()
                say("load stopped; checking the log")
                checks = await verify(soak, session)
        finally:
            service.close()
    finally:
        await db.drop_all()
        db.close()

    memory = memory_verdict(soak.rss)
    checks["server_errors"] = sum(n for status, n in soak.statuses.items() if status >= 500 and status != 503)
    ok = (checks["lost"] == 0 and checks["doubled"] == 0 and checks["refused_but_applied"] == 0
          and checks["server_errors"] == 0
          and all(checks[name] is True for name in ("log_well_formed", "chain_verifies", "balances_equal_replay",
                                                    "projections_caught_up", "projections_equal_replay"))
          and memory["flat"])
    return {
        "name": "soak",
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "database": db.kind},
        "plan": {"seconds": SECONDS, "clients": CLIENTS, "members": MEMBERS, "fault_every_s": FAULT_EVERY_S,
                 "restarts": ["sigkill at 1/3", f"sigstop for {FREEZE_S:.0f} s at 1/2", "sigterm at 2/3"], "rss_every_s": RSS_EVERY_S},
        "duration_s": round(duration_s, 1),
        "requests": {"commands": len(soak.sent), "reads": soak.reads, "by_status": dict(sorted(soak.statuses.items())),
                     "cut_off_by_faults": soak.cut_off, "retried": sum(1 for s in soak.sent if s.attempts > 1),
                     "commands_per_s": round(len(soak.sent) / duration_s, 1)},
        "faults": soak.faults,
        "memory": memory,
        "rss_mib": [[t, mib, run] for t, mib, run in soak.rss],
        "checks": checks,
        "ok": ok,
    }


def main() -> int:
    result = asyncio.run(soak_run())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    checks, memory = result["checks"], result["memory"]
    say(f"{result['requests']['commands']} commands ({result['requests']['commands_per_s']}/s), "
        f"{len(result['faults'])} faults; lost {checks['lost']}, doubled {checks['doubled']}, "
        f"RSS growth {memory.get('growth_pct')}% (limit {100 * RSS_GROWTH_MAX:.0f}%)")
    say(f"{'OK' if result['ok'] else 'FAILED'}: results in {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""``make bench`` / ``make bench-quick``: every figure next to a baseline measured in the same run.

    python -m bench.run [--quick] [--name NAME] [--only ingest,stored,...] [--profile]

Starts its own PostgreSQL (a throwaway embedded one under a temp dir, or
BENCH_DATABASE_URL) and its own service processes, drives them with wrk
(Debian's package) and Lua scripts (bench/lua/), and writes
bench/results/<name>.json, bench/results/bench.png and the table between the
bench markers in README.md. See bench/README.md for the sums behind it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import NamedTuple

import aiohttp
import msgspec
import psutil

from bench import env, filler, growth, report
from bench.env import ADMIN_KEY, Database, RssSampler, lean_process, noop_process, service_process, wrk
from bench.profile import render, summarize

RESULTS = Path(__file__).resolve().parent / "results"
TEN_MILLION_RUN = "stored-10m"  # `make bench-10m` writes bench/results/stored-10m.json
SIMULATION_RUN = "simulation"  # `make bench-simulation` writes bench/results/simulation.json
CONNECTIONS = 64
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
BATCH_LINES_PER_REQUEST = 5000
HEAVY_PURCHASES = 2497  # enrolment (5 events) + 2,497 purchases (2 each) + 2 tier changes = 5,001 events
FILLER_PURCHASES = 24  # 54 events per filler member
GROWTH_MEMBERS = 1000  # the growth runs' members with purchases and activities, and the referees' referrers
# First purchases enrolled per second of a run: above what the service answers (a member not enrolled
# would be a 404 and fail the run), few enough that enrolling them stays quick.
FRESH_MEMBERS_PER_S = 3500


@dataclass(frozen=True)
class Plan:
    name: str
    quick: bool
    members: int  # enrolled members the load picks from at random
    duration_s: float  # each measured wrk run
    warmup_s: float
    stored_events: int  # history under the "stored" ingest run
    import_lines: int  # purchases posted through /v1/batch
    heavy_members: int  # ~5,000 events each
    light_members: int  # 5 events each
    paced_s: float
    paced_rate: int
    es_seconds: float
    check_members: int
    profile: bool
    rounds: int = 1  # ours and its baseline alternate this many times; the median ratio counts
    fill_cache: bool = False  # fill the member cache to its bound before the measured ingest rounds
    simulated_purchases: int = 20_000  # stored purchases under POST /v1/simulations


def plan_for(quick: bool, name: str | None, profile: bool) -> Plan:
    if quick:
        return Plan(name or "quick", True, members=1000, duration_s=4, warmup_s=1,
                    stored_events=int(os.environ.get("BENCH_STORED_EVENTS", 60_000)),
                    import_lines=int(os.environ.get("BENCH_IMPORT_LINES", 6_000)), heavy_members=6, light_members=300, paced_s=3, paced_rate=1000,
                    es_seconds=3, check_members=100, profile=profile, rounds=1,
                    simulated_purchases=int(os.environ.get("BENCH_SIMULATION_PURCHASES", 20_000)))
    return Plan(name or "full", False, members=20_000, duration_s=20, warmup_s=3,
                stored_events=int(os.environ.get("BENCH_STORED_EVENTS", 1_000_000)),
                import_lines=100_000, heavy_members=20, light_members=2000, paced_s=15, paced_rate=1000,
                es_seconds=15, check_members=300, profile=True, rounds=3, fill_cache=True,
                simulated_purchases=int(os.environ.get("BENCH_SIMULATION_PURCHASES", 1_000_000)))


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- measuring helpers ---------------------------------------------------------------


class CpuMeter:
    """CPU seconds used by the service, PostgreSQL's processes and wrk over a span."""

    def __init__(self, service_pid: int, postmaster_pid: int | None) -> None:
        self.service = psutil.Process(service_pid)
        self.postmaster = psutil.Process(postmaster_pid) if postmaster_pid else None

    def _postgres_s(self) -> float:
        if self.postmaster is None:
            return float("nan")
        total = 0.0
        for proc in [self.postmaster, *self.postmaster.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        return total

    def read(self) -> tuple[float, float, float]:
        service = self.service.cpu_times()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once it has exited
        return service.user + service.system, self._postgres_s(), children.ru_utime + children.ru_stime


def postmaster_pid(db: Database) -> int | None:
    if db.server is None:
        return None
    pid_file = Path(db.tempdir) / "pgdata" / "postmaster.pid"
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


async def head_position(url: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("SELECT position FROM event_head")
    finally:
        await conn.close()


async def post_batch(session: aiohttp.ClientSession, base: str, lines: list[dict]) -> list[dict]:
    body = b"".join(msgspec.json.encode(line) + b"\n" for line in lines)
    async with session.post(f"{base}/v1/batch", data=body,
                            headers={**AUTH, "Content-Type": "application/x-ndjson"}) as answer:
        text = await answer.read()
        assert answer.status == 200, text[:500]
    return [msgspec.json.decode(line) for line in text.splitlines() if line.strip()]


async def enrol(base: str, prefix: str, count: int, referrers: int = 0) -> float:
    """Enrol ``prefix``0..count-1 through /v1/batch, member n referred by m<n % referrers> when ``referrers``;
    returns the seconds it took."""
    def body(n: int) -> dict:
        card = {"identities": [{"type": "card", "value": f"card-{prefix}{n}"}]}
        return {**card, "referred_by": f"m{n % referrers}"} if referrers else card

    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for first in range(0, count, BATCH_LINES_PER_REQUEST):
            lines = [{"op": "enrol", "member_id": f"{prefix}{n}", "body": body(n)}
                     for n in range(first, min(first + BATCH_LINES_PER_REQUEST, count))]
            results = await post_batch(session, base, lines)
            bad = [r for r in results if r["status"] != 201]
            assert not bad, bad[:3]
    return time.perf_counter() - started


async def member_cache(base: str) -> dict[str, float]:
    """The service's member-cache gauges (members, events), from /metrics."""
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as answer:
        text = await answer.text()
    return {line.split()[0].removeprefix("loyalty_member_cache_"): float(line.split()[1])
            for line in text.splitlines() if line.startswith("loyalty_member_cache_")}


async def fill_member_cache(base: str, prefix: str = "c", members: int = 10_000) -> dict:
    """Other members' purchases through /v1/batch until the member cache holds CACHE_EVENTS_MAX events.

    A long-running service's cache is at its bound; a fresh one grows towards
    it, and that growth would read as a leak in the RSS figure. So the
    measured rounds start with the cache full, evicting as they go.
    """
    from ledger.application import CACHE_EVENTS_MAX

    say(f"ingest: filling the member cache to its bound ({CACHE_EVENTS_MAX:,} events) with {members:,} other members")
    started = time.perf_counter()
    await enrol(base, prefix, members)
    rng, posted = random.Random(11), 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        # Each purchase adds at least one event: the bound caps the posting if the gauge never gets there.
        while (await member_cache(base))["events"] < CACHE_EVENTS_MAX * 0.99 and posted < CACHE_EVENTS_MAX:
            lines = [{"op": "purchase", "member_id": f"{prefix}{rng.randrange(members)}",
                      "body": {"purchase_id": f"fill-{posted + n}", "store_id": "s1", "amount_cents": rng.randint(100, 200_000)}}
                     for n in range(BATCH_LINES_PER_REQUEST)]
            results = await post_batch(session, base, lines)
            assert all(r["status"] == 201 for r in results), [r for r in results if r["status"] != 201][:3]
            posted += len(lines)
    return {"purchases": posted, "seconds": round(time.perf_counter() - started, 1), "bound_events": CACHE_EVENTS_MAX,
            **await member_cache(base)}


def purchase_load(port: int, prefix: str, count: int, run: str, seconds: float, connections: int = CONNECTIONS):
    return wrk(f"http://127.0.0.1:{port}", "purchase.lua", [prefix, str(count), run, ADMIN_KEY],
               connections=connections, duration_s=seconds)


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def alternating_rounds(plan: Plan, label: str, what: str, baseline: env.Process, ours: env.Process) -> dict:
    """``plan.rounds`` rounds of the same purchase ingest, the baseline's then ours; the median round by ratio."""
    return alternating_rounds_of_many(plan, label, what, baseline, {"ours": ours})["ours"]


def alternating_rounds_of_many(plan: Plan, label: str, what: str, baseline: env.Process,
                               services: dict[str, env.Process]) -> dict[str, dict]:
    """``plan.rounds`` rounds of the same purchase ingest, in each the baseline's, then each service's in
    turn, so every one is compared with the baseline of its own round (the baseline's database grows
    round after round, as theirs do); for each, the median round by ratio."""
    rounds: list[dict[str, env.WrkResult]] = []
    for number in range(plan.rounds):
        say(f"{label} round {number + 1}/{plan.rounds}: {what}; {plan.duration_s:g} s each")
        loads = {"baseline": purchase_load(baseline.port, "m", plan.members, f"run{number}", plan.duration_s)}
        for name, service in services.items():
            loads[name] = purchase_load(service.port, "m", plan.members, f"run{number}", plan.duration_s)
        rounds.append(loads)
    measured = {}
    for name in services:
        pairs = [(loads["baseline"], loads[name]) for loads in rounds]
        ratios = sorted(o.rps / b.rps for b, o in pairs)
        median_base, median_ours = sorted(pairs, key=lambda pair: pair[1].rps / pair[0].rps)[len(pairs) // 2]
        measured[name] = {"ours": median_ours.as_dict(), "baseline": median_base.as_dict(),
                          "rounds_rps": [(b.rps, o.rps) for b, o in pairs],
                          "ratio_median": round(ratios[len(ratios) // 2], 3)}
    return measured


# -- scenarios ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def beside_the_noop(db: Database, name: str):
    """A fresh database ``name``, the service on it and the no-op baseline server; both stopped after."""
    url = await db.fresh(name)
    noop = noop_process(RESULTS / "logs").start()
    service = service_process(url, RESULTS / "logs").start()
    try:
        yield url, noop, service
    finally:
        service.stop()
        noop.stop()


async def scenario_ingest(plan: Plan, db: Database, out: dict) -> None:
    """HTTP purchase ingest vs the no-op server and the lean purchase (bench/lean.py); RSS; CPU per command;
    reads at a fixed rate; the answer check."""
    log_dir = RESULTS / "logs"
    async with beside_the_noop(db, "bench_ingest") as (url, noop, service):
        base = f"http://127.0.0.1:{service.port}"
        say(f"ingest: enrolling {plan.members} members through /v1/batch, and in the lean purchase's own database")
        lean = lean_process(await db.fresh("bench_lean"), log_dir, "m", plan.members)
        with env.running(lean):  # stopped after the rounds: the two cores are the service's for the rest
            enrol_s = await enrol(base, "m", plan.members)
            cache_fill = await fill_member_cache(base) if plan.fill_cache else None
            await wait_caught_up(url, 300)  # the projectors' backlog from the fill is not the rounds' work
            for warmed in (noop, lean, service):
                purchase_load(warmed.port, "m", plan.members, "warm", plan.warmup_s)
            meter = CpuMeter(service.pid, postmaster_pid(db))
            rounds, leans, cpu, events = [], [], [0.0, 0.0, 0.0], 0
            with RssSampler(service.pid) as rss:
                for number in range(plan.rounds):
                    say(f"ingest round {number + 1}/{plan.rounds}: the no-op baseline, the lean purchase, then the "
                        f"service; {CONNECTIONS} connections, {plan.duration_s:g} s each")
                    baseline = purchase_load(noop.port, "m", plan.members, f"base{number}", plan.duration_s)
                    leans.append(purchase_load(lean.port, "m", plan.members, f"lean{number}", plan.duration_s))
                    head_before, cpu_before = await head_position(url), meter.read()
                    ours = purchase_load(service.port, "m", plan.members, f"run{number}", plan.duration_s)
                    cpu_after, head_after = meter.read(), await head_position(url)
                    cpu = [total + after - before for total, before, after in zip(cpu, cpu_before, cpu_after)]
                    events += head_after - head_before
                    rounds.append((baseline, ours))
        lean_ratios = [o.rps / lean_run.rps for (_b, o), lean_run in zip(rounds, leans)]
        median_lean = sorted(zip(lean_ratios, leans), key=lambda pair: pair[0])[len(leans) // 2][1]
        ratios = [o.rps / b.rps for b, o in rounds]
        baseline, ours = sorted(rounds, key=lambda pair: pair[1].rps / pair[0].rps)[len(rounds) // 2]
        commands = sum(o.requests for _b, o in rounds)
        seconds = sum(o.duration_s for _b, o in rounds)
        out["ingest"] = {
            "baseline": baseline.as_dict(),
            "ours": ours.as_dict(),
            "rounds_rps": [(b.rps, o.rps) for b, o in rounds],
            "ratio_median": round(sorted(ratios)[len(ratios) // 2], 3),
            "lean": median_lean.as_dict(),
            "lean_rounds_rps": [lean_run.rps for lean_run in leans],
            "ratio_to_lean_median": round(sorted(lean_ratios)[len(lean_ratios) // 2], 3),
            "events": events,
            "events_per_s": round(events / seconds, 1),
            "enrol_members_per_s": round(plan.members / enrol_s, 1),
            "cpu_us_per_command": {
                "service": round(1e6 * cpu[0] / commands, 1),
                "postgres": round(1e6 * cpu[1] / commands, 1) if cpu[1] == cpu[1] else None,
                "wrk": round(1e6 * cpu[2] / commands, 1),
            },
            "rss_mb": rss.samples,
            "cache_fill": cache_fill,
            "cache_after": await member_cache(base),
        }
        out["row_sizes"] = await row_sizes(url)
        if plan.profile and py_spy():
            say("ingest: profiling the service under the same load (py-spy)")
            out["profile"] = profile_service(service, plan)
        await wait_caught_up(url, 60)  # reads in steady state, not while the projector drains the burst above
        say(f"reads: balance at {plan.paced_rate} req/s for {plan.paced_s:g} s, the no-op GET then the service")
        paced_base = wrk(f"http://127.0.0.1:{noop.port}", "member_read_paced.lua",
                         ["m", str(plan.members), str(plan.paced_rate), "1", ADMIN_KEY],
                         connections=16, duration_s=plan.paced_s)
        paced = wrk(base, "member_read_paced.lua", ["m", str(plan.members), str(plan.paced_rate), "1", ADMIN_KEY],
                    connections=16, duration_s=plan.paced_s)
        out["reads"] = {"baseline": paced_base.as_dict(), "ours": paced.as_dict()}
        rate = max(50, int(ours.rps / 2))
        say(f"projections: lag while purchases arrive at {rate} req/s (half the ingest above), {plan.paced_s:g} s")
        out["lag"] = await projection_lag(url, service.port, plan, rate)
        say(f"check: {plan.check_members} balances against a replay of the log; the hash chain")
        out["check"] = await check_answers(url, base, [f"m{n}" for n in random.sample(range(plan.members), plan.check_members)])
    # The write path alone: the same service with its projectors off (nothing else projects).
    service = service_process(url, log_dir, {"LOYALTY_PROJECTORS": "off"}).start()
    try:
        purchase_load(service.port, "m", plan.members, "alone-warm", plan.warmup_s)
        say(f"ingest: the service with LOYALTY_PROJECTORS=off (the write path alone), {plan.duration_s:g} s")
        out["ingest_no_projectors"] = {"ours": purchase_load(service.port, "m", plan.members, "alone", plan.duration_s).as_dict()}
    finally:
        service.stop()


async def live_checkpoint(conn) -> int | None:
    """The lowest checkpoint of the live projections (None until all have one)."""
    from projections.runtime import PROJECTIONS

    row = await conn.fetchrow(
        "SELECT count(*) AS n, min(position) AS low FROM projection_checkpoints WHERE name = ANY($1::text[])",
        list(PROJECTIONS),
    )
    return row["low"] if row["n"] == len(PROJECTIONS) else None


async def wait_caught_up(url: str, timeout_s: float) -> bool:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            head = await conn.fetchval("SELECT position FROM event_head")
            low = await live_checkpoint(conn)
            if low is not None and low >= head:
                return True
            await asyncio.sleep(0.1)
        return False
    finally:
        await conn.close()


async def projection_lag(url: str, port: int, plan: Plan, rate: int) -> dict:
    """Seconds from an event's append to every live projection having applied it, sampled at 20 Hz.

    For each sample of the log's head (t, h), the lag is the time of the first
    later sample whose lowest projection checkpoint is at or past h, minus t.
    """
    import asyncpg

    conn = await asyncpg.connect(url)
    heads: list[tuple[float, int]] = []
    checkpoints: list[tuple[float, int]] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            t = time.monotonic()
            heads.append((t, await conn.fetchval("SELECT position FROM event_head")))
            low = await live_checkpoint(conn)
            if low is not None:
                checkpoints.append((time.monotonic(), low))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    try:
        load = await asyncio.to_thread(
            wrk, f"http://127.0.0.1:{port}", "purchase_paced.lua",
            ["m", str(plan.members), "lag", ADMIN_KEY, str(rate), "1"], connections=16, duration_s=plan.paced_s)
        final_head = heads[-1][1]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not checkpoints or checkpoints[-1][1] < final_head):
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await sampler
        await conn.close()
    lags_ms = []
    for t, h in heads:
        reached = next((tc for tc, low in checkpoints if tc >= t and low >= h), None)
        if reached is not None:
            lags_ms.append(1000 * (reached - t))
    return {"rate": rate, "load": load.as_dict(), "samples": len(lags_ms), "unresolved": len(heads) - len(lags_ms),
            "lag_ms": percentiles_ms(lags_ms)}


def percentiles_ms(lags_ms: list[float]) -> dict:
    ordered = sorted(lags_ms)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1) if ordered else None
    return {"p50": pick(0.5), "p99": pick(0.99), "max": pick(1.0)}


def start_py_spy(service: env.Process, raw: Path, seconds: float | None = None) -> subprocess.Popen:
    """py-spy recording the service into ``raw`` (its raw format) for ``seconds``, or until sent SIGINT."""
    duration = ["--duration", f"{seconds:g}"] if seconds is not None else []
    return subprocess.Popen([py_spy(), "record", "--pid", str(service.pid), *duration,
                             "--rate", "200", "--format", "raw", "--nonblocking", "--output", str(raw)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def profile_service(service: env.Process, plan: Plan) -> dict:
    raw = RESULTS / f"profile-{plan.name}.raw"
    seconds = max(5.0, plan.duration_s / 2)
    spy = start_py_spy(service, raw, seconds)
    try:
        load = purchase_load(service.port, "m", plan.members, "prof", seconds + 1)
    finally:
        spy.wait(timeout=seconds + 60)
    if not raw.exists():
        return {"error": "py-spy wrote nothing (ptrace not permitted?)"}
    summary = summarize(raw.read_text(), 30)
    (RESULTS / f"profile-{plan.name}.txt").write_text(render(summary, 30) + "\n")
    raw.unlink()
    return {"rps_while_profiled": load.rps, "samples": summary["samples"], "self": summary["self"][:15],
            "total": summary["total"][:25]}


async def row_sizes(url: str) -> dict:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            """SELECT count(*) AS events, avg(pg_column_size(e.*))::int AS tuple_bytes,
                      avg(pg_column_size(e.data))::int AS data_bytes,
                      pg_total_relation_size('events') AS events_total_bytes,
                      pg_total_relation_size('command_results') AS results_total_bytes,
                      (SELECT count(*) FROM command_results) AS results
               FROM events e"""
        )
        return {
            "events": row["events"],
            "tuple_bytes_per_event": row["tuple_bytes"],
            "data_bytes_per_event": row["data_bytes"],
            "events_bytes_per_event_with_indexes": round(row["events_total_bytes"] / max(row["events"], 1)),
            "command_results_bytes_per_command": round(row["results_total_bytes"] / max(row["results"], 1)),
        }
    finally:
        await conn.close()


async def check_answers(url: str, base: str, members: list[str]) -> dict:
    """GET /balance for each member equals a fold of its events read straight from the table."""
    from ledger.application import fact_of
    from ledger.database import create_pool
    from ledger.state import fold
    from ledger.store import EventStore
    from ledger.views import balance

    at = datetime.now(timezone.utc).replace(microsecond=0)
    pool = await create_pool(url)
    store = EventStore(pool)
    mismatches = []
    try:
        async with aiohttp.ClientSession(headers=AUTH) as session:
            for member in members:
                envelopes, after = [], 0
                while True:
                    page = await store.read_stream(member, after_version=after)
                    envelopes += page
                    if len(page) < 10_000:
                        break
                    after = page[-1].stream_version
                # CONTRACT §2: balance as of T folds the events with occurred_at <= T, in log order.
                replayed = msgspec.to_builtins(balance(fold(fact_of(e) for e in envelopes if e.occurred_at <= at), at))
                async with session.get(f"{base}/v1/members/{member}/balance",
                                       params={"as_of": at.isoformat().replace("+00:00", "Z")}) as answer:
                    served = await answer.json()
                if served != replayed:
                    mismatches.append({"member": member, "served": served, "replayed": replayed})
        verify = await store.verify()
    finally:
        await pool.close()
    return {"members": len(members), "mismatches": len(mismatches), "first_mismatch": mismatches[:1],
            "chain_ok": verify.ok, "chain_checked": verify.checked}


async def scenario_stored(plan: Plan, db: Database, out: dict) -> None:
    """The same ingest with ``stored_events`` already in the log (the empty-store run is the baseline)."""
    log_dir = RESULTS / "logs"
    url = await db.fresh("bench_stored")
    from ledger.programme import Programme

    members = plan.stored_events // 54
    say(f"stored: writing {members * 54:,} events of history by COPY (real events, hash-chained)")
    fill = await filler.append_members(url, "f", members, FILLER_PURCHASES, Programme())
    out["catch_up"] = await projection_catch_up(url, log_dir, fill["events"], plan.rounds)
    empty_url = await db.fresh("bench_empty")
    stored, empty = service_process(url, log_dir).start(), service_process(empty_url, log_dir).start()
    try:
        for service in (stored, empty):
            await enrol(f"http://127.0.0.1:{service.port}", "m", plan.members)
            purchase_load(service.port, "m", plan.members, "warm", plan.warmup_s)
        with RssSampler(stored.pid) as rss:
            measured = alternating_rounds(plan, "stored", f"the empty store, then {fill['events']:,} stored events",
                                          empty, stored)
        empty_run = measured.pop("baseline")
        out["stored"] = {"filler": fill, **measured, "empty": empty_run, "rss_mb": rss.samples}
    finally:
        stored.stop()
        empty.stop()


CAMPAIGNS = 20  # running in the campaigns scenario


async def create_campaigns(base: str, matching: int) -> None:
    """``CAMPAIGNS`` running campaigns: ``matching`` of them grant every purchase a 1-point bonus, the rest
    none (another store's)."""
    now = datetime.now(timezone.utc)
    window = {"starts_at": now.isoformat(), "ends_at": (now + timedelta(days=30)).isoformat()}
    async with aiohttp.ClientSession(headers=AUTH) as session:
        for n in range(CAMPAIGNS):
            conditions = {} if n < matching else {"store_ids": ["s-none"]}
            body = {"campaign_id": f"bench-{n:02d}", "name": f"bench {n}", **window, "conditions": conditions,
                    "reward": {"kind": "bonus", "points": 1}}
            async with session.post(f"{base}/v1/campaigns", json=body) as answer:
                assert answer.status == 201, await answer.text()


async def scenario_campaigns(plan: Plan, db: Database, out: dict) -> None:
    """The same ingest with 20 running campaigns (10 granting a reward to every purchase, 10 to none), against
    the same service without campaigns; beside it 20 of which one grants every purchase a reward, and 20
    matching none: what one reward event costs, and what judging campaigns costs apart from the reward
    events. Each round runs the four services in turn."""
    log_dir = RESULTS / "logs"
    services = {}
    try:
        for name, matching in (("none", None), ("half", CAMPAIGNS // 2), ("one", 1), ("unmatched", 0)):
            url = await db.fresh(f"bench_campaigns_{name}")
            service = services[name] = service_process(url, log_dir).start()
            if matching is not None:
                await create_campaigns(f"http://127.0.0.1:{service.port}", matching)
            await enrol(f"http://127.0.0.1:{service.port}", "m", plan.members)
            purchase_load(service.port, "m", plan.members, "warm", plan.warmup_s)
        measured = alternating_rounds_of_many(
            plan, "campaigns", f"no campaigns; {CAMPAIGNS} running of which 10, 1, 0 reward every purchase",
            services["none"], {name: services[name] for name in ("half", "one", "unmatched")},
        )
        half = measured["half"]
        none = half.pop("baseline")
        out["campaigns"] = {"campaigns": CAMPAIGNS, "matching": CAMPAIGNS // 2, **half, "none": none,
                            "one_matching": measured["one"], "unmatched": measured["unmatched"]}
    finally:
        for service in services.values():
            service.stop()


SIMULATED_TYPES = ("purchase_recorded", "points_earned", "coupon_issued")  # ledger.simulation reads these


async def raw_read_of_types(url: str, types: tuple[str, ...], page: int = 10_000) -> dict:
    """The events a simulation reads, read as it reads them (same query, same pages), and nothing else."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        after, count, purchases = 0, 0, 0
        while True:
            rows = await conn.fetch(
                """SELECT position, stream_id, stream_version, type, schema_version, occurred_at, recorded_at,
                          command_id, actor, programme_version, data::text AS data, hash
                   FROM events WHERE position > $1 AND type = ANY($3::text[]) ORDER BY position LIMIT $2""",
                after, page, list(types))
            if not rows:
                break
            count += len(rows)
            purchases += sum(1 for row in rows if row["type"] == "purchase_recorded")
            after = rows[-1]["position"]
        seconds = time.perf_counter() - started
    finally:
        await conn.close()
    return {"events": count, "purchases": purchases, "seconds": round(seconds, 2),
            "purchases_per_s": round(purchases / seconds, 1)}


async def scenario_simulation(plan: Plan, db: Database, out: dict) -> None:
    """``POST /v1/simulations`` over ``simulated_purchases`` stored purchases (a settings change and a draft
    campaign matching half of them), against the raw read of the same events, rounds alternating."""
    log_dir = RESULTS / "logs"
    url = await db.fresh("bench_simulation")
    from ledger.programme import Programme

    members = max(1, plan.simulated_purchases // FILLER_PURCHASES)
    say(f"simulation: writing {members * FILLER_PURCHASES:,} purchases of history by COPY")
    fill = await filler.append_members(url, "s", members, FILLER_PURCHASES, Programme())
    service = service_process(url, log_dir, {"LOYALTY_PROJECTORS": "off"}).start()
    now = datetime.now(timezone.utc)
    draft = {"campaign_id": "draft-half", "name": "half the stores", "starts_at": (now - timedelta(days=40)).isoformat(),
             "ends_at": (now + timedelta(days=1)).isoformat(), "reward": {"kind": "multiplier", "multiplier_pct": 200},
             "conditions": {"store_ids": [f"s{n}" for n in range(25)]}, "budget_points": 10**9}
    body = {"from": (now - timedelta(days=30)).isoformat(), "to": (now + timedelta(days=1)).isoformat(),
            "changes": {"settings": {"earn_cents_per_point": 500}, "campaigns": [draft]}}
    try:
        rounds = []
        async with aiohttp.ClientSession(headers=AUTH, timeout=aiohttp.ClientTimeout(total=3600)) as session:
            for number in range(plan.rounds):
                say(f"simulation round {number + 1}/{plan.rounds}: the raw read, then the simulation")
                raw = await raw_read_of_types(url, SIMULATED_TYPES)
                started = time.perf_counter()
                async with session.post(f"http://127.0.0.1:{service.port}/v1/simulations", json=body) as answer:
                    simulated = await answer.json()
                    assert answer.status == 200, simulated
                seconds = time.perf_counter() - started
                ours = {"purchases": simulated["purchases"], "seconds": round(seconds, 2),
                        "purchases_per_s": round(simulated["purchases"] / seconds, 1),
                        "delta_points": simulated["delta_points"]}
                rounds.append((raw, ours))
        ratios = sorted(o["purchases_per_s"] / r["purchases_per_s"] for r, o in rounds)
        raw, ours = sorted(rounds, key=lambda pair: pair[1]["purchases_per_s"] / pair[0]["purchases_per_s"])[len(rounds) // 2]
        out["simulation"] = {"filler": fill, "ours": ours, "raw": raw, "ratio_median": round(ratios[len(ratios) // 2], 3),
                             "rounds_rps": [(r["purchases_per_s"], o["purchases_per_s"]) for r, o in rounds]}
    finally:
        service.stop()


# `loyalty project --only` groups for the two-worker catch-up, balanced by the CPU each projection took
# caught up alone over 300k stored events (its worker's, then its PostgreSQL backend's, seconds, each
# worker's start of 0.4 s included): members 1.73 + 1.21, points 1.21 + 1.51, liability 1.04 + 0.76,
# campaigns 0.78 + 0.41, coupons 0.44 + 0.34; so 4.74 s and 4.69 s a group.
TWO_WORKERS = (("members", "liability"), ("points", "coupons", "campaigns"))


async def projection_catch_up(url: str, log_dir: Path, events: int, rounds: int = 1) -> dict:
    """`loyalty project` from nothing to the head; a raw sequential read of the same events; one worker
    against two splitting the projections (`--only`), alternating; a rebuild."""
    head = await head_position(url)
    say(f"projections: catch-up over {events:,} events with `loyalty project` (a process of its own)")
    result = {"events": head, **await catch_up_with_workers(url, log_dir, head, [()])}
    say("projections: the raw sequential read of the same events (pages of 1,000, as the projector reads)")
    result["raw_read"] = await raw_read(url)
    result["workers"] = await one_worker_against_two(url, log_dir, head, rounds, result["seconds"])
    say("projections: `loyalty rebuild members` over the same events")
    started = time.perf_counter()
    done = subprocess.run([*env.LOYALTY, "rebuild", "members"], cwd=env.ROOT, capture_output=True, text=True,
                          env={**os.environ, "DATABASE_URL": url, "LOYALTY_LOG_LEVEL": "WARNING"}, timeout=1800)
    seconds = time.perf_counter() - started
    result["rebuild_members"] = ({"seconds": round(seconds, 2), "events_per_s": round(head / seconds, 1)}
                                 if done.returncode == 0 else {"error": (done.stderr or done.stdout)[-500:]})
    return result


async def catch_up_with_workers(url: str, log_dir: Path, head: int, groups: list[tuple[str, ...]]) -> dict:
    """Wall time for `loyalty project` workers, one per group of ``--only`` names (``()``: all projections),
    started together, to bring every projection from nothing to ``head``."""
    import asyncpg

    workers = [env.projector_process(url, log_dir, only) for only in groups]
    conn = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        first_progress = None
        for worker in workers:
            worker.start(None)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            low = await live_checkpoint(conn)
            if low and first_progress is None:
                first_progress = time.perf_counter()
            if low is not None and low >= head:
                break
            await asyncio.sleep(0.1)
        finished = time.perf_counter()
        caught_up = (await live_checkpoint(conn) or 0) >= head
    finally:
        for worker in workers:
            worker.stop()
        await conn.close()
    seconds = finished - started
    return {"caught_up": caught_up, "seconds": round(seconds, 2), "events_per_s": round(head / seconds, 1),
            "seconds_from_first_batch": round(finished - first_progress, 2) if first_progress else None}


async def one_worker_against_two(url: str, log_dir: Path, head: int, rounds: int, first_one_s: float) -> dict:
    """Two workers (``TWO_WORKERS``) against one, from nothing each time, alternating ``rounds`` times;
    the one-worker catch-up already measured is the first round's."""
    one_s, two_s = [first_one_s], []
    for n in range(rounds):
        if n:
            await drop_projections(url)
            one_s.append((await catch_up_with_workers(url, log_dir, head, [()]))["seconds"])
        say(f"projections: catch-up with two `loyalty project --only` workers {TWO_WORKERS} ({n + 1}/{rounds})")
        await drop_projections(url)
        two = await catch_up_with_workers(url, log_dir, head, list(TWO_WORKERS))
        if not two["caught_up"]:
            return {"groups": TWO_WORKERS, "error": "two workers did not catch up within 900 s"}
        two_s.append(two["seconds"])
    speedups = sorted(one / two for one, two in zip(one_s, two_s))
    return {"groups": TWO_WORKERS, "one_worker_s": one_s, "two_workers_s": two_s,
            "speedup_median": round(speedups[len(speedups) // 2], 3), "cpus": os.cpu_count()}


async def drop_projections(url: str) -> None:
    """Every projection back to nothing: no tables, no checkpoints (`loyalty project` creates them)."""
    import asyncpg

    from projections.runtime import PROJECTIONS

    conn = await asyncpg.connect(url)
    try:
        for module in PROJECTIONS.values():
            for table in module.TABLES:
                await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute("DELETE FROM projection_checkpoints")
        await conn.execute("VACUUM projection_checkpoints")
    finally:
        await conn.close()


async def raw_read(url: str) -> dict:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        after, count = 0, 0
        while True:
            rows = await conn.fetch(
                """SELECT position, stream_id, stream_version, type, schema_version, occurred_at, recorded_at,
                          command_id, actor, programme_version, data::text AS data, hash
                   FROM events WHERE position > $1 ORDER BY position LIMIT 1000""", after)
            if not rows:
                break
            count += len(rows)
            after = rows[-1]["position"]
        seconds = time.perf_counter() - started
    finally:
        await conn.close()
    return {"events": count, "seconds": round(seconds, 2), "events_per_s": round(count / seconds, 1)}


async def scenario_heavy(plan: Plan, db: Database, out: dict) -> None:
    """Purchases on members with ~5,000 events vs members with 5, one connection, warm and cold."""
    log_dir = RESULTS / "logs"
    url = await db.fresh("bench_heavy")
    from ledger.programme import Programme

    say(f"heavy: {plan.heavy_members} members of ~5,000 events and {plan.light_members} of 5, by COPY")
    heavy = await filler.append_members(url, "h", plan.heavy_members, HEAVY_PURCHASES, Programme())
    light = await filler.append_members(url, "l", plan.light_members, 0, Programme())
    service = service_process(url, log_dir).start()
    try:
        base = f"http://127.0.0.1:{service.port}"
        cold = {"h": [], "l": []}
        async with aiohttp.ClientSession(headers=AUTH) as session:
            # Cold: the first command after a start folds the stream (no snapshot yet) and writes one.
            for n in range(min(5, plan.heavy_members)):
                for prefix in ("h", "l"):
                    started = time.perf_counter()
                    async with session.post(f"{base}/v1/members/{prefix}{n}/purchases",
                                            json={"purchase_id": f"cold-{n}", "store_id": "s1", "amount_cents": 5000}) as answer:
                        assert answer.status == 201, await answer.text()
                    cold[prefix].append(round(1000 * (time.perf_counter() - started), 2))
            for prefix, count in (("h", plan.heavy_members), ("l", plan.light_members)):
                for n in range(count):  # warm every member's cached state
                    async with session.get(f"{base}/v1/members/{prefix}{n}/balance") as answer:
                        assert answer.status == 200
        seconds = max(2.0, plan.duration_s / 2)
        say(f"heavy: one connection, {seconds:g} s each on the light and the heavy members")
        # light, heavy, light, heavy, ..., light: each heavy run against the mean of its two neighbours.
        lights = [purchase_load(service.port, "l", plan.light_members, "seql0", seconds, connections=1)]
        heavies, ratios = [], []
        for number in range(plan.rounds):
            heavies.append(purchase_load(service.port, "h", plan.heavy_members, f"seqh{number}", seconds, connections=1))
            lights.append(purchase_load(service.port, "l", plan.light_members, f"seql{number + 1}", seconds, connections=1))
            neighbours = (lights[-2].latency_ms["p50"] + lights[-1].latency_ms["p50"]) / 2
            ratios.append(heavies[-1].latency_ms["p50"] / neighbours)
        middle = sorted(range(len(ratios)), key=lambda i: ratios[i])[len(ratios) // 2]
        out["heavy"] = {"events_per_heavy_member": heavy["events_per_member"],
                        "events_per_light_member": light["events_per_member"],
                        "cold_first_purchase_ms": cold, "light": lights[middle].as_dict(), "heavy": heavies[middle].as_dict(),
                        "light_again": lights[middle + 1].as_dict(), "ratios_p50": [round(r, 3) for r in ratios],
                        "ratio_median": round(ratios[middle], 3)}
    finally:
        service.stop()


async def scenario_import(plan: Plan, db: Database, out: dict) -> None:
    """/v1/batch purchases vs COPY and multi-row INSERT of the very rows it appended; then the same lines
    on a service with LOYALTY_PROJECTORS=off (the write path alone, as the COPY baseline is the rows alone)."""
    run = await batch_import(plan, db, "bench_import", {}, profile=plan.profile)
    say("import: COPY and multi-row INSERT of the same rows into an equivalent table")
    raw = await filler.copy_baseline(run.url, run.head_before)
    out["import"] = {
        "lines": plan.import_lines, "events": run.events, "seconds": round(run.seconds, 2),
        "events_per_s": round(run.events / run.seconds, 1), "commands_per_s": round(plan.import_lines / run.seconds, 1),
        "enrol_events_per_s": round(run.head_before / run.enrol_s, 1), "raw": raw,
        "loyalty_import": await loyalty_import(run.url, db) if has_command("import") else None,
    }
    alone = await batch_import(plan, db, "bench_import_alone", {"LOYALTY_PROJECTORS": "off"})
    out["import"]["write_path_alone"] = {"events": alone.events, "seconds": round(alone.seconds, 2),
                                         "events_per_s": round(alone.events / alone.seconds, 1)}


class BatchRun(NamedTuple):
    url: str
    head_before: int  # after the enrolments
    events: int  # appended by the purchases
    seconds: float  # the purchases'
    enrol_s: float


async def batch_import(plan: Plan, db: Database, name: str, extra_env: dict[str, str], profile: bool = False) -> BatchRun:
    """Members enrolled, then ``plan.import_lines`` purchases through /v1/batch, on a fresh database; with
    ``profile``, py-spy records the service during the purchases (``results/profile-<name>-import.txt``)."""
    url = await db.fresh(name)
    service = service_process(url, RESULTS / "logs", extra_env).start()
    members = max(1000, plan.import_lines // 10)
    try:
        base = f"http://127.0.0.1:{service.port}"
        say(f"import: enrolling {members} members, then {plan.import_lines:,} purchases through /v1/batch"
            + "".join(f", {k}={v}" for k, v in extra_env.items()))
        enrol_s = await enrol(base, "m", members)
        rng = random.Random(7)
        lines = [{"op": "purchase", "member_id": f"m{rng.randrange(members)}",
                  "body": {"purchase_id": f"imp-{n}", "store_id": f"s{n % 50}", "amount_cents": rng.randint(100, 200_000)}}
                 for n in range(plan.import_lines)]
        chunks = [lines[i:i + BATCH_LINES_PER_REQUEST] for i in range(0, len(lines), BATCH_LINES_PER_REQUEST)]
        head_before = await head_position(url)
        spy = start_py_spy(service, raw_profile := RESULTS / f"profile-{plan.name}-import.raw") if profile else None
        started = time.perf_counter()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
            queue = list(chunks)

            async def sender() -> None:
                while queue:
                    results = await post_batch(session, base, queue.pop())
                    bad = [r for r in results if r["status"] != 201]
                    assert not bad, bad[:3]

            await asyncio.gather(sender(), sender())  # two requests in flight
        seconds = time.perf_counter() - started
        events = await head_position(url) - head_before
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it has recorded and exits
            spy.wait(timeout=60)
            if raw_profile.exists():
                (RESULTS / f"profile-{plan.name}-import.txt").write_text(
                    render(summarize(raw_profile.read_text(), 30), 30) + "\n")
                raw_profile.unlink()
    finally:
        service.stop()
    return BatchRun(url, head_before, events, seconds, enrol_s)


def has_command(name: str) -> bool:
    probe = subprocess.run([*env.LOYALTY, name, "--help"], cwd=env.ROOT,
                           capture_output=True, text=True)
    return probe.returncode == 0


async def loyalty_import(source_url: str, db: Database) -> dict:
    """`loyalty export` of the batch-imported log, then `loyalty import` of that file into a fresh database."""
    path = RESULTS / "logs" / "export.jsonl"
    cli_env = {**os.environ, "LOYALTY_LOG_LEVEL": "WARNING"}
    done = subprocess.run([*env.LOYALTY, "export", "--format", "jsonl", "--out", str(path)], cwd=env.ROOT,
                          env={**cli_env, "DATABASE_URL": source_url}, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": "export: " + (done.stderr or done.stdout)[-600:]}
    url = await db.fresh("bench_import_cli")
    say("import: `loyalty import` of the same events, exported, into a fresh database")
    started = time.perf_counter()
    done = subprocess.run([*env.LOYALTY, "import", str(path)], cwd=env.ROOT, env={**cli_env, "DATABASE_URL": url},
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    size = path.stat().st_size
    path.unlink()
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout)[-600:]}
    events = await head_position(url)
    return {"events": events, "file_bytes": size, "seconds": round(seconds, 2), "events_per_s": round(events / seconds, 1),
            "note": "process start and the hash chain's verification included"}


async def scenario_eventsourcing(plan: Plan, db: Database, out: dict) -> None:
    results = {}
    for which in ("eventsourcing", "ours"):
        url = await db.fresh(f"bench_es_{which}", schema=which == "ours")
        say(f"eventsourcing comparison: {which}, in-process, {CONNECTIONS} concurrent callers, {plan.es_seconds:g} s")
        done = subprocess.run(
            [sys.executable, "-m", "bench.compare_es", which, url, str(plan.es_seconds), str(CONNECTIONS), "1000"],
            cwd=env.ROOT, capture_output=True, text=True, timeout=plan.es_seconds + 300,
        )
        line = [l for l in done.stdout.splitlines() if l.startswith("BENCH_JSON ")]
        results[which] = json.loads(line[0][len("BENCH_JSON "):]) if line else {"error": done.stderr[-800:]}
    out["eventsourcing"] = results


async def scenario_publish(plan: Plan, db: Database, out: dict) -> None:
    """`loyalty publish` over a backlog beside the raw read of the same events; the publish lag at half the
    maximum ingest, append to message on the stream, as a NATS subscriber sees it."""
    from ledger.programme import Programme
    from tests.nats_server import NatsServer

    events = int(os.environ.get("BENCH_PUBLISH_EVENTS", plan.stored_events))
    url = await db.fresh("bench_publish")
    say(f"publish: writing {events // 54 * 54:,} events of history by COPY")
    await filler.append_members(url, "f", events // 54, FILLER_PURCHASES, Programme())
    say("publish: the raw sequential read of those events (pages of 1,000)")
    raw = await raw_read(url)
    nats_server = await NatsServer().start()
    try:
        backlog = await publish_backlog(url, nats_server.url, nats_server.process.pid)
        lag = await publish_lag(plan, db, nats_server.url, out)
    finally:
        nats_server.close()
    out["publish"] = {"backlog": backlog, "raw_read": raw, "lag": lag}


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def publish_backlog(url: str, nats_url: str, nats_pid: int) -> dict:
    """Seconds from starting `loyalty publish` until the stream holds the whole log (process start included).

    Also the CPU the worker (its start included) and nats-server spent meanwhile: per event, those
    hardly move with the load of the machine's other tenants, when the rate does."""
    import nats as nats_client

    head = await head_position(url)
    say(f"publish: `loyalty publish` of {head:,} events into a new stream")
    worker = env.Process([*env.LOYALTY, "publish"], {**os.environ, "DATABASE_URL": url, "LOYALTY_NATS_URL": nats_url,
                         "LOYALTY_LOG_LEVEL": "WARNING"}, 0, RESULTS / "logs" / "publish.log")
    nc = await nats_client.connect(nats_url)
    js = nc.jetstream()
    published, first_message = 0, None
    nats_server = psutil.Process(nats_pid)
    try:
        nats_cpu_before_s = cpu_s(nats_server)
        started = time.perf_counter()
        worker.start(None)
        deadline = time.monotonic() + 1800
        while published < head and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            try:
                published = (await js.stream_info("LOYALTY")).state.messages
            except Exception:  # the stream does not exist yet
                continue
            if published and first_message is None:
                first_message = time.perf_counter()
        seconds = time.perf_counter() - started
        worker_cpu_s, nats_cpu_s = cpu_s(psutil.Process(worker.pid)), cpu_s(nats_server) - nats_cpu_before_s
        await js.delete_stream("LOYALTY")  # the lag run's database is another log
    finally:
        worker.stop()
        await nc.close()
    return {"events": head, "published": published, "seconds": round(seconds, 2),
            "events_per_s": round(published / seconds, 1),
            "seconds_from_first_message": round(seconds - (first_message - started), 2) if first_message else None,
            "worker_cpu_us_per_event": round(1e6 * worker_cpu_s / max(published, 1), 1),
            "nats_cpu_us_per_event": round(1e6 * nats_cpu_s / max(published, 1), 1),
            "load_average_1m": round(os.getloadavg()[0], 2)}


async def publish_lag(plan: Plan, db: Database, nats_url: str, out: dict) -> dict:
    """Each message's arrival at a subscriber minus its event's recorded_at, purchases paced at half the maximum."""
    import nats as nats_client

    url = await db.fresh("bench_publish_lag")
    service = service_process(url, RESULTS / "logs", {"LOYALTY_NATS_URL": nats_url}).start()
    nc = await nats_client.connect(nats_url)
    lags_ms: list[float] = []
    measuring = False

    async def arrived(msg) -> None:
        if measuring:
            recorded_at = datetime.fromisoformat(msgspec.json.decode(msg.data)["recorded_at"])
            lags_ms.append(1000 * (time.time() - recorded_at.timestamp()))

    try:
        base = f"http://127.0.0.1:{service.port}"
        await enrol(base, "m", plan.members)
        if "ingest" in out:
            max_rps, measured_here = out["ingest"]["ours"]["rps"], False
        else:
            say(f"publish: the maximum ingest of this service (publishing), {plan.duration_s:g} s")
            max_rps, measured_here = purchase_load(service.port, "m", plan.members, "pubmax", plan.duration_s).rps, True
        rate = max(50, int(max_rps / 2))
        await nc.subscribe("loyalty.events.>", cb=arrived)
        await asyncio.sleep(2)  # the backlog of the enrolment and the maximum run drains first
        measuring = True
        say(f"publish: lag while purchases arrive at {rate} req/s (half the maximum), {plan.paced_s:g} s")
        load = await asyncio.to_thread(
            wrk, base, "purchase_paced.lua", ["m", str(plan.members), "publag", ADMIN_KEY, str(rate), "1"],
            connections=16, duration_s=plan.paced_s)
        await asyncio.sleep(1)
        measuring = False
    finally:
        await nc.close()
        service.stop()
    return {"rate": rate, "max_rps": max_rps, "max_measured_here": measured_here, "load": load.as_dict(),
            "messages": len(lags_ms), "lag_ms": percentiles_ms(lags_ms)}


READ_CONNECTIONS = 8  # as the issue measured: a handful of internal callers reading as fast as answered


async def scenario_reads(plan: Plan, db: Database, out: dict) -> None:
    """GET /balance, /tier and the profile of random (cached) members as fast as answered vs the no-op GET,
    alternating rounds; then each paced at half the rate the service reached, for the p99."""
    async with beside_the_noop(db, "bench_reads") as (url, noop, service):
        base = f"http://127.0.0.1:{service.port}"
        say(f"reads: enrolling {plan.members} members through /v1/batch")
        await enrol(base, "r", plan.members)
        await wait_caught_up(url, 300)
        for read, key in report.MEMBER_READS.items():
            out[key] = member_read(plan, f"http://127.0.0.1:{noop.port}", base, read)
        out["reads_max"]["cache_after"] = await member_cache(base)


def member_read(plan: Plan, noop: str, base: str, read: str) -> dict:
    """One member read as fast as answered, without and with an applied ``min_position``, in rounds that
    alternate with the no-op; then paced (without) at half the rate reached, beside the no-op at that rate."""
    args = ["r", str(plan.members), ADMIN_KEY, read]
    for url in (noop, base):  # warm: every member in the cache
        wrk(url, "member_read.lua", args, connections=READ_CONNECTIONS, duration_s=plan.warmup_s)
    rounds = []
    for number in range(plan.rounds):
        say(f"reads round {number + 1}/{plan.rounds}: {read} GETs as fast as answered, {READ_CONNECTIONS} "
            f"connections, {plan.duration_s:g} s, the no-op, the service, the service with min_position")
        baseline = wrk(noop, "member_read.lua", args, connections=READ_CONNECTIONS, duration_s=plan.duration_s)
        ours = wrk(base, "member_read.lua", args, connections=READ_CONNECTIONS, duration_s=plan.duration_s)
        # Naming a position the process has applied (as a till passing its purchase's ``position``
        # does): served from memory without waiting for a catch-up.
        named = wrk(base, "member_read.lua", [*args, "min_position=1"], connections=READ_CONNECTIONS,
                    duration_s=plan.duration_s)
        rounds.append((baseline, ours, named))
    ratios = [o.rps / b.rps for b, o, _n in rounds]
    named_ratios = [n.rps / b.rps for b, _o, n in rounds]
    baseline, ours, named = sorted(rounds, key=lambda measured: measured[1].rps / measured[0].rps)[len(rounds) // 2]
    rate = max(50, int(ours.rps / 2))
    say(f"reads: {read} paced at {rate} req/s (half the service's maximum), {plan.paced_s:g} s, no-op then service")
    paced_args = ["r", str(plan.members), str(rate), "1", ADMIN_KEY, read]
    paced_base = wrk(noop, "member_read_paced.lua", paced_args, connections=16, duration_s=plan.paced_s)
    paced = wrk(base, "member_read_paced.lua", paced_args, connections=16, duration_s=plan.paced_s)
    return {
        "baseline": baseline.as_dict(),
        "ours": ours.as_dict(),
        "rounds_rps": [(b.rps, o.rps) for b, o, _n in rounds],
        "ratio_median": round(sorted(ratios)[len(ratios) // 2], 3),
        "with_min_position": named.as_dict(),
        "with_min_position_rounds_rps": [(b.rps, n.rps) for b, _o, n in rounds],
        "with_min_position_ratio_median": round(sorted(named_ratios)[len(named_ratios) // 2], 3),
        "paced": {"rate": rate, "baseline": paced_base.as_dict(), "ours": paced.as_dict()},
    }


async def scenario_growth(plan: Plan, db: Database, out: dict) -> None:
    """Activities beside purchases, referral first purchases beside plain ones: over HTTP as a till posts
    them (wrk), and in-process, the ledger alone (bench/growth.py)."""
    seconds, rounds = plan.es_seconds / 3, 1 if plan.quick else plan.rounds
    try:
        out["growth_http"] = await growth_over_http(plan, db, seconds, rounds)
    except RuntimeError as failed:  # a wrk run with errors: kept in the results, as the in-process part's are
        say(f"growth over HTTP failed: {failed}")
        out["growth_http"] = {"error": str(failed)}
    url = await db.fresh("bench_growth")
    say(f"growth: purchase, activity, first purchase, referral; in-process, {CONNECTIONS} callers, "
        f"{rounds} round(s) of {seconds:g} s each")
    done = subprocess.run(
        [sys.executable, "-m", "bench.growth", url, str(seconds), str(CONNECTIONS), str(GROWTH_MEMBERS), str(rounds)],
        cwd=env.ROOT, capture_output=True, text=True, timeout=rounds * (4 * seconds + 300),
    )
    line = [l for l in done.stdout.splitlines() if l.startswith("BENCH_JSON ")]
    out["growth"] = json.loads(line[0][len("BENCH_JSON "):]) if line else {"error": done.stderr[-800:]}


async def growth_over_http(plan: Plan, db: Database, seconds: float, rounds: int) -> dict:
    """The four kinds of bench/growth.py through the service (what a till sees: HTTP, the answer, the
    projectors working beside), rounds alternating; each fresh side's members enrolled right before its run."""
    url = await db.fresh("bench_growth_http")
    service = service_process(url, RESULTS / "logs").start()
    try:
        base = f"http://127.0.0.1:{service.port}"
        await growth_programme(base)
        await enrol(base, "m", GROWTH_MEMBERS)
        purchase_load(service.port, "m", GROWTH_MEMBERS, "warm", plan.warmup_s)
        rates: dict[str, list[float]] = {kind: [] for kind in growth.KINDS}
        for number in range(rounds):
            say(f"growth round {number + 1}/{rounds}: purchase, activity, first purchase, referral over HTTP; "
                f"{CONNECTIONS} connections, {seconds:g} s each")
            for kind in growth.KINDS:
                measured = await growth_load(url, service.port, kind, f"{kind[0]}{number}-", seconds)
                if measured.non_2xx or any(measured.errors.values()):
                    raise RuntimeError(f"growth over HTTP, {kind}: {measured.errors} (too few fresh members? "
                                       f"FRESH_MEMBERS_PER_S is {FRESH_MEMBERS_PER_S})")
                rates[kind].append(measured.rps)
        return growth.summary(rates, CONNECTIONS, seconds)
    finally:
        service.stop()


async def growth_programme(base: str) -> None:
    """The programme of bench/growth.py: an uncapped activity type, and no monthly cap on referrals."""
    async with aiohttp.ClientSession(headers=AUTH) as session:
        async with session.get(f"{base}/v1/programme") as answer:
            settings = (await answer.json())["settings"]
        changed = {"activities": [*settings["activities"], growth.VISIT],
                   "referral": {**settings["referral"], "monthly_cap": 0}}
        async with session.put(f"{base}/v1/programme", json={"settings": changed}) as answer:
            assert answer.status == 201, await answer.text()


async def growth_load(database_url: str, port: int, kind: str, run: str, seconds: float) -> env.WrkResult:
    """One kind's wrk run; a first purchase's members (``run``0, 1, ...) enrolled for it first. Each starts
    with the projectors caught up: no run pays for the backlog of the one before."""
    base = f"http://127.0.0.1:{port}"
    if kind in ("first_purchase", "referral"):
        await enrol(base, run, int(FRESH_MEMBERS_PER_S * seconds), GROWTH_MEMBERS if kind == "referral" else 0)
    await wait_caught_up(database_url, 300)
    if kind == "purchase":
        return purchase_load(port, "m", GROWTH_MEMBERS, run, seconds)
    if kind == "activity":
        return wrk(base, "activity.lua", ["m", str(GROWTH_MEMBERS), run, ADMIN_KEY],
                   connections=CONNECTIONS, duration_s=seconds)
    return wrk(base, "first_purchase.lua", [run, ADMIN_KEY], connections=CONNECTIONS, duration_s=seconds)


SCENARIOS = {
    "ingest": scenario_ingest,
    "reads": scenario_reads,
    "stored": scenario_stored,
    "campaigns": scenario_campaigns,
    "simulation": scenario_simulation,
    "heavy": scenario_heavy,
    "import": scenario_import,
    "eventsourcing": scenario_eventsourcing,
    "publish": scenario_publish,
    "growth": scenario_growth,
}


async def run(plan: Plan, only: list[str]) -> dict:
    env.require_wrk()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "logs").mkdir(exist_ok=True)
    started = time.monotonic()
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    out: dict = {
        "name": plan.name,
        "mode": "quick" if plan.quick else "full",
        "plan": plan.__dict__,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_generator": wrk_version.split(" Copyright")[0].strip()},
    }
    db = Database()
    say(f"database: {db.kind}")
    try:
        for name, scenario in SCENARIOS.items():
            if not only or name in only:
                await scenario(plan, db, out)
        out["machine"]["postgres"] = getattr(db, "server_version", None)
        await db.drop_all()
    finally:
        db.close()
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


def attach_ten_million(out: dict) -> None:
    """The 10M-stored figure, from its own run (`make bench-10m`, half an hour): it has its own empty-store
    baseline, measured in that run; the full run's table shows it beside the 1M figure."""
    path = RESULTS / f"{TEN_MILLION_RUN}.json"
    if path.exists():
        separate = json.loads(path.read_text())
        if "stored" in separate:
            out["stored_10m"] = {**separate["stored"], "run": separate["name"], "started_at": separate["started_at"],
                                 "catch_up": separate.get("catch_up")}


def attach_simulation(out: dict) -> None:
    """The simulation figure from its own run (`make bench-simulation`) when this run has none: its raw-read
    baseline is measured in that run."""
    path = RESULTS / f"{SIMULATION_RUN}.json"
    if "simulation" not in out and path.exists():
        separate = json.loads(path.read_text())
        if "simulation" in separate:
            out["simulation"] = {**separate["simulation"], "run": separate["name"], "started_at": separate["started_at"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller and shorter (under 2 minutes)")
    parser.add_argument("--name", help="results file name (default: quick or full)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--profile", action="store_true", help="py-spy the service in quick mode too")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    args = parser.parse_args(argv)
    plan = plan_for(args.quick, args.name, args.profile)
    only = [s for s in args.only.split(",") if s]
    out = asyncio.run(run(plan, only))
    if not plan.quick and not only:
        attach_ten_million(out)
    if not only:
        attach_simulation(out)
    out["figures"] = report.figures(out)
    (RESULTS / f"{plan.name}.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(report.table(out))
    if not only:  # the chart is the whole run's; a partial run keeps its numbers in its .json only
        report.chart(out, RESULTS / "bench.png")
    if not args.no_readme and not only:
        report.update_readme(out, env.ROOT / "README.md")
    say(f"done in {out['seconds']:g} s: {RESULTS / (plan.name + '.json')}, {RESULTS / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

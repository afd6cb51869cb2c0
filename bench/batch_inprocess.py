"""``/v1/batch`` in-process, without HTTP: the import scenario's lines through ``answer_batch``.

    python -m bench.batch_inprocess DATABASE_URL [LINES] [--profile FILE]

Creates a fresh database next to DATABASE_URL's (``bench_batch_inprocess``),
enrols 1,000 members, then answers LINES purchase lines (default 30,000) in
requests of 5,000 lines, 2 in flight, as ``scenario_import`` in bench/run.py
sends them, with the service's garbage-collector tuning. Prints wall and CPU
time per line and how much of it the collector took; ``--profile`` writes a
cProfile of the measured part. The projectors do not run: this is the write
path alone, to see where a line's CPU goes without the network's noise.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import random
import time

import msgspec
import psutil
from aiohttp import web

from api.app import create_app
from api.auth import Principal
from api.batch import answer_batch
from api.context import LEDGER
from bench.env import Database
from bench.run import BATCH_LINES_PER_REQUEST
from ledger import commands as cmd
from ledger.database import create_pool
from ledger.programme import Programme
from service import tune_garbage_collector

MEMBERS = 1000
REQUESTS_IN_FLIGHT = 2


class CollectorClock:
    """CPU seconds spent in the cyclic garbage collector, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, _info: dict) -> None:
        if phase == "start":
            self._started = time.thread_time()
        else:
            self.seconds += time.thread_time() - self._started


async def database_backends(pool) -> list[psutil.Process]:
    """The server processes of the pool's connections (the server runs on this machine)."""
    pids = await pool.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
    return [psutil.Process(row["pid"]) for row in pids]


def cpu_s_of(processes: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def request_bodies(lines_total: int) -> list[bytes]:
    rng = random.Random(7)
    lines = [msgspec.json.encode({"op": "purchase", "member_id": f"m{rng.randrange(MEMBERS)}",
                                  "body": {"purchase_id": f"imp-{n}", "store_id": f"s{n % 50}",
                                           "amount_cents": rng.randint(100, 200_000)}})
             for n in range(lines_total)]
    return [b"\n".join(lines[first:first + BATCH_LINES_PER_REQUEST])
            for first in range(0, lines_total, BATCH_LINES_PER_REQUEST)]


async def measure(url: str, lines_total: int, profile_path: str | None) -> None:
    database = Database() if url == "embedded" else None
    server_url = database.server_url if database else url
    bench_db = _ServerDatabase(server_url)
    db_url = await bench_db.fresh("bench_batch_inprocess")
    pool = await create_pool(db_url)
    app = create_app(pool, Programme())
    runner = web.AppRunner(app)
    await runner.setup()  # on_startup: group commit, programme, log follower
    try:
        ledger = app[LEDGER]
        for first in range(0, MEMBERS, 500):
            await asyncio.gather(*(ledger.execute("enrol", f"m{n}", cmd.Enrol(member_id=f"m{n}", identities=[]))
                                   for n in range(first, first + 500)))
        principal = Principal("bench", "bench", "admin")
        bodies = request_bodies(lines_total)
        tune_garbage_collector()
        collector = CollectorClock()
        gc.callbacks.append(collector)
        profiler = cProfile.Profile() if profile_path else None
        queue = list(bodies)

        async def sender() -> None:
            while queue:
                answer = await answer_batch(app, principal, queue.pop())
                assert answer.count(b'"status":201') == answer.count(b"\n"), answer[:300]

        if profiler:
            profiler.enable()
        backends = await database_backends(pool)
        wall_started, cpu_started, database_cpu_started = time.perf_counter(), time.process_time(), cpu_s_of(backends)
        await asyncio.gather(*(sender() for _ in range(REQUESTS_IN_FLIGHT)))
        wall_s, cpu_s = time.perf_counter() - wall_started, time.process_time() - cpu_started
        database_cpu_s = cpu_s_of(backends) - database_cpu_started
        if profiler:
            profiler.disable()
            profiler.dump_stats(profile_path)
        gc.callbacks.remove(collector)
        print(f"{lines_total} lines in {wall_s:.2f} s ({lines_total / wall_s:,.0f} lines/s); "
              f"CPU {1e6 * cpu_s / lines_total:.0f} us a line, of which the collector {1e6 * collector.seconds / lines_total:.0f};"
              f" PostgreSQL (this pool's backends) {1e6 * database_cpu_s / lines_total:.0f} us a line")
    finally:
        await runner.cleanup()
        await pool.close()
        await bench_db.drop_all()
        if database:
            database.close()


class _ServerDatabase(Database):
    """``bench.env.Database`` on a given server (no embedded one started)."""

    def __init__(self, server_url: str) -> None:
        self.server = None
        self.created = []
        self.server_url = server_url
        self.kind = "given"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.batch_inprocess", description=__doc__.splitlines()[0])
    parser.add_argument("url", help="a PostgreSQL server URL, or 'embedded'")
    parser.add_argument("lines", nargs="?", type=int, default=30_000)
    parser.add_argument("--profile", help="write a cProfile of the measured part here")
    args = parser.parse_args()
    asyncio.run(measure(args.url, args.lines, args.profile))


if __name__ == "__main__":
    main()

"""One change at a time: HTTP purchase ingest of the shipped service vs one variant, interleaved.

    python -m bench.experiments [--rounds N] [--seconds S] [VARIANT ...]

Each round runs ``default`` then the variant (bench/variant.py), each on a
fresh database with the same members, the same wrk load (64 connections) and
the projectors off (the write path alone, so the projector's share does not
blur the difference; BENCH_PROJECTORS=on to keep them). The machine is shared and noisy, so rounds are
interleaved and the median ratio is what counts. ``workers2`` is two
``reuse_port`` processes on one port. Writes bench/results/experiments.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys

from bench import env
from bench.env import Database, Process, free_port, service_process
from bench.run import RESULTS, enrol, purchase_load, say

MEMBERS = 2000


PROJECTORS = os.environ.get("BENCH_PROJECTORS", "off")


def variant_processes(variant: str, url: str, log_dir) -> list[Process]:
    extra = {"LOYALTY_PROJECTORS": PROJECTORS}
    if variant == "workers2":
        port = free_port()
        processes = [service_process(url, log_dir, extra, port=port) for _ in range(2)]
        for process in processes:
            process.argv = [sys.executable, "-m", "bench.variant", "reuse_port"]
        return processes
    process = service_process(url, log_dir, extra)
    process.argv = [sys.executable, "-m", "bench.variant", variant]
    return [process]


async def measure(db: Database, variant: str, number: int, seconds: float) -> float:
    url = await db.fresh(f"bench_x_{variant}_{number}")
    processes = variant_processes(variant, url, RESULTS / "logs")
    try:
        for process in processes:
            process.start()
        port = processes[0].port
        await enrol(f"http://127.0.0.1:{port}", "m", MEMBERS)
        purchase_load(port, "m", MEMBERS, "warm", 2)
        result = purchase_load(port, "m", MEMBERS, "run", seconds)
        assert result.non_2xx == 0, result
        return result.rps
    finally:
        for process in processes:
            process.stop()


async def run(variants: list[str], rounds: int, seconds: float) -> dict:
    env.require_wrk()
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    db = Database()
    out: dict = {}
    try:
        for variant in variants:
            pairs = []
            for number in range(rounds):
                base = await measure(db, "default", number, seconds)
                other = await measure(db, variant, number, seconds)
                pairs.append((base, other))
                say(f"{variant} round {number + 1}: default {base:,.0f} req/s, {variant} {other:,.0f} req/s")
            ratios = [other / base for base, other in pairs]
            out[variant] = {"pairs_rps": pairs, "median_ratio": round(statistics.median(ratios), 3)}
            say(f"{variant}: median ratio {out[variant]['median_ratio']:g} over {rounds} rounds")
        await db.drop_all()
    finally:
        db.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*",
                        default=["asyncio", "no_statement_cache", "light_reset", "workers2"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    out = asyncio.run(run(args.variants, args.rounds, args.seconds))
    path = RESULTS / "experiments.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous.update(out)
    path.write_text(json.dumps(previous, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

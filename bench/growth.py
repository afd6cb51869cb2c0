"""Growth tasks and referrals (CONTRACT §6.3, §6.4) beside the purchase, in-process, in one run.

    python -m bench.growth DATABASE_URL SECONDS CONCURRENCY MEMBERS ROUNDS

On one fresh database, ``Ledger.execute`` as the HTTP handler calls it (the
member cache, the rules, the hash chain, the exactly-once answer, group
commit; the garbage collector tuned as ``loyalty serve`` tunes it),
CONCURRENCY callers at once, rounds alternating so that the machine's drift
hits both sides alike:

- ``purchase`` vs ``activity``: a purchase, or an activity of an uncapped
  type, on a random one of MEMBERS members;
- ``first_purchase`` vs ``referral``: the first purchase of a member enrolled
  for it, plain, or of a referee (the referrer's reward appended to a second
  stream in the same transaction; referrers are the MEMBERS, no monthly cap).
  Each side's members are enrolled right before its round, so both find them
  in the member cache alike (enrolled together, the referees would wait
  through the plain round's appends and be evicted first).

Prints one JSON line (``BENCH_JSON``): commands per second of each kind per
round, the medians, and the medians of the per-round ratios (activity /
purchase, referral / first purchase, and referral / purchase).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

import msgspec

ENROL_CHUNK = 500
# In each round, in this order: each pair's sides run one after the other.
KINDS = ("purchase", "activity", "first_purchase", "referral")
# The activity type the runs record: uncapped, 1 point, 5 growth.
VISIT = {"type": "visit", "points": 1, "growth": 5, "daily_cap": 0, "total_cap": 0}
# A first purchase consumes a member: each round enrols this many per caller and second (should they
# run out, the round ends early).
FIRST_PURCHASES_PER_CALLER_S = 40


async def _enrol(ledger, members: list[tuple[str, str | None]]) -> None:
    from ledger import commands as cmd

    for first in range(0, len(members), ENROL_CHUNK):
        outcomes = await asyncio.gather(*(
            ledger.execute("enrol", member_id, cmd.Enrol(member_id=member_id, referred_by=referrer))
            for member_id, referrer in members[first:first + ENROL_CHUNK]
        ))
        assert all(o.status == 201 for o in outcomes), [o for o in outcomes if o.status != 201][:3]


async def _round(ledger, kind: str, seconds: float, concurrency: int, members: int, fresh: list[str]) -> float:
    """Commands per second of one kind for ``seconds``."""
    from ledger import commands as cmd

    deadline = time.monotonic() + seconds
    done = 0
    fresh_left = iter(fresh)

    def command(rng: random.Random, tag: str):
        if kind == "activity":
            return f"m{rng.randrange(members)}", cmd.RecordActivity(activity_id=tag, type="visit")
        member_id = f"m{rng.randrange(members)}" if kind == "purchase" else next(fresh_left, None)
        return member_id, cmd.RecordPurchase(purchase_id=tag, store_id="s1", amount_cents=rng.randint(5_000, 200_000))

    async def caller(number: int) -> None:
        nonlocal done
        rng = random.Random(f"{kind}-{number}")
        n = 0
        while time.monotonic() < deadline:
            n += 1
            member_id, body = command(rng, f"{kind}-{number}-{n}-{time.monotonic_ns()}")
            if member_id is None:  # every fresh member has bought: the round ends early, its rate still holds
                return
            operation = "activity" if kind == "activity" else "purchase"
            outcome = await ledger.execute(operation, member_id, body)
            assert outcome.status == 201, outcome
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(caller(n) for n in range(concurrency)))
    return done / (time.monotonic() - started)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _median_ratio(ours: list[float], baseline: list[float]) -> float:
    """The median of the rounds' ratios, as the other scenarios of bench/run.py report theirs."""
    return round(_median([o / b for o, b in zip(ours, baseline)]), 3)


def summary(rates: dict[str, list[float]], concurrency: int, seconds: float) -> dict:
    """Each kind's rounds and median, and the medians of the rounds' ratios (in-process here, and over
    HTTP in bench/run.py)."""
    return {
        "rounds_per_s": rates,
        "median_per_s": {kind: _median(values) for kind, values in rates.items()},
        "activity_over_purchase": _median_ratio(rates["activity"], rates["purchase"]),
        "referral_over_first_purchase": _median_ratio(rates["referral"], rates["first_purchase"]),
        "referral_over_purchase": _median_ratio(rates["referral"], rates["purchase"]),
        "concurrency": concurrency,
        "seconds_per_round": seconds,
    }


async def run(url: str, seconds: float, concurrency: int, members: int, rounds: int) -> dict:
    from ledger.application import Ledger
    from ledger.database import create_pool
    from ledger.programme import Activity, Programme, ReferralRule
    from ledger.store import EventStore

    programme = Programme(
        activities=[*Programme().activities, msgspec.convert(VISIT, Activity)],
        referral=ReferralRule(monthly_cap=0),
    )
    pool = await create_pool(url)
    ledger = Ledger(EventStore(pool), programme)
    ledger.store.start_group_commit()
    try:
        await _enrol(ledger, [(f"m{n}", None) for n in range(members)])
        per_round = int(FIRST_PURCHASES_PER_CALLER_S * concurrency * seconds)
        rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for number in range(rounds):
            fresh_members = {
                "first_purchase": [(f"g{number}-{n}", None) for n in range(per_round)],
                "referral": [(f"f{number}-{n}", f"m{n % members}") for n in range(per_round)],
            }
            for kind in rates:
                fresh = fresh_members.get(kind, [])
                await _enrol(ledger, fresh)
                rate = await _round(ledger, kind, seconds, concurrency, members, [member_id for member_id, _ in fresh])
                rates[kind].append(round(rate, 1))
        return summary(rates, concurrency, seconds)
    finally:
        await ledger.store.stop_group_commit()
        await pool.close()


def main(argv: list[str]) -> int:
    from service import tune_garbage_collector

    url, seconds, concurrency, members, rounds = argv[0], float(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    # The collector as ``loyalty serve`` runs it. With Python's defaults every full collection walks the
    # whole member cache (about 0.3-1.1 s each at 300,000-860,000 cached events), and a referral round
    # set off up to five of them: a cost of this process that the service does not pay.
    tune_garbage_collector()
    result = asyncio.run(run(url, seconds, concurrency, members, rounds))
    print("BENCH_JSON " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

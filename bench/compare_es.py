"""The same purchase command, in-process, in our ledger and in the ``eventsourcing`` library.

Both run on the same PostgreSQL, against a fresh database each, with the same
number of concurrent callers (asyncio tasks for ours, threads for theirs: the
library is synchronous), on members enrolled beforehand. Each caller loops:
pick a random member, record a purchase with a new id, until the time is up.

- ours: ``Ledger.execute("purchase", ...)`` as the HTTP handler calls it
  (member-state cache, rules, hash chain, exactly-once answer, group commit);
- eventsourcing: an ``Aggregate`` with a ``record_purchase`` event that adds
  points and growth, ``repository.get`` (load) then ``app.save`` (append) with
  its optimistic concurrency; a version conflict is retried as ours retries.

    python -m bench.compare_es {ours|eventsourcing} DATABASE_URL SECONDS CONCURRENCY MEMBERS

prints one JSON line: commands, seconds, commands_per_s, conflicts.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import threading
import time
from urllib.parse import parse_qs, unquote, urlsplit
from uuid import NAMESPACE_URL, UUID, uuid5

ENROL_CHUNK = 500


async def run_ours(url: str, seconds: float, concurrency: int, members: int) -> dict:
    from ledger import commands as cmd
    from ledger.application import Ledger
    from ledger.database import create_pool
    from ledger.programme import Programme
    from ledger.store import EventStore

    pool = await create_pool(url)
    ledger = Ledger(EventStore(pool), Programme())
    ledger.store.start_group_commit()
    try:
        for first in range(0, members, ENROL_CHUNK):
            await asyncio.gather(*(
                ledger.execute("enrol", f"m{n}", cmd.Enrol(member_id=f"m{n}", identities=[]))
                for n in range(first, min(first + ENROL_CHUNK, members))
            ))
        done = 0
        deadline = time.monotonic() + seconds

        async def caller(number: int) -> None:
            nonlocal done
            rng = random.Random(number)
            n = 0
            while time.monotonic() < deadline:
                n += 1
                command = cmd.RecordPurchase(purchase_id=f"c{number}-{n}", store_id="s1",
                                             amount_cents=rng.randint(100, 200_000))
                outcome = await ledger.execute("purchase", f"m{rng.randrange(members)}", command)
                assert outcome.status == 201, outcome
                done += 1

        started = time.monotonic()
        await asyncio.gather(*(caller(n) for n in range(concurrency)))
        elapsed = time.monotonic() - started
        return {"commands": done, "seconds": round(elapsed, 3), "commands_per_s": round(done / elapsed, 1), "conflicts": 0}
    finally:
        await ledger.store.stop_group_commit()
        await pool.close()


def run_eventsourcing(url: str, seconds: float, concurrency: int, members: int) -> dict:
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event
    from eventsourcing.persistence import IntegrityError

    class Member(Aggregate):
        @event("Enrolled")
        def __init__(self, member_id: str) -> None:
            self.member_id = member_id
            self.points = 0
            self.growth = 0
            self.purchases: dict[str, int] = {}

        @staticmethod
        def create_id(member_id: str) -> UUID:
            return uuid5(NAMESPACE_URL, f"member/{member_id}")

        @event("PurchaseRecorded")
        def record_purchase(self, purchase_id: str, store_id: str, amount_cents: int) -> None:
            self.points += amount_cents // 1000
            self.growth += amount_cents // 100
            self.purchases[purchase_id] = amount_cents

    parts = urlsplit(url)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "127.0.0.1"])[0]
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": unquote(parts.path.lstrip("/")),
        "POSTGRES_HOST": host,
        "POSTGRES_PORT": str(parts.port or query.get("port", ["5432"])[0]),
        "POSTGRES_USER": unquote(parts.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(parts.password or ""),
        # One connection per caller, as asyncpg's pool gives ours up to 10.
        "POSTGRES_POOL_SIZE": str(min(concurrency, 20)),
        "POSTGRES_MAX_OVERFLOW": "0",
        "POSTGRES_MAX_WAITING": "0",
        "CREATE_TABLE": "y",
    }
    app = Application(env=env)
    ids = [Member.create_id(f"m{n}") for n in range(members)]
    for n in range(members):
        app.save(Member(f"m{n}"))
    done = conflicts = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def caller(number: int) -> None:
        nonlocal done, conflicts
        rng = random.Random(number)
        n = 0
        while time.monotonic() < deadline:
            n += 1
            member_id = ids[rng.randrange(members)]
            while True:
                member = app.repository.get(member_id)
                member.record_purchase(f"c{number}-{n}", "s1", rng.randint(100, 200_000))
                try:
                    app.save(member)
                    break
                except IntegrityError:  # another caller appended first: load again
                    with lock:
                        conflicts += 1
            with lock:
                done += 1

    started = time.monotonic()
    threads = [threading.Thread(target=caller, args=(n,)) for n in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    app.close()
    return {"commands": done, "seconds": round(elapsed, 3), "commands_per_s": round(done / elapsed, 1), "conflicts": conflicts}


def main(argv: list[str]) -> None:
    which, url, seconds, concurrency, members = argv[0], argv[1], float(argv[2]), int(argv[3]), int(argv[4])
    if which == "ours":
        import uvloop

        result = uvloop.run(run_ours(url, seconds, concurrency, members))
    else:
        result = run_eventsourcing(url, seconds, concurrency, members)
    print("BENCH_JSON " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])

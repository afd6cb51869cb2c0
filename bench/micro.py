"""The Python of one purchase, step by step, without I/O: the measured side of the budget.

    python -m bench.micro [N]

Times each step the service runs for ``POST /purchases`` outside the
database and aiohttp (those are measured by the bench against its
baselines), on a member with a few purchases, and prints microseconds per
command. The steps are the ones in ledger/application.py and ledger/store.py.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timedelta, timezone

import msgspec

from events.catalogue import event_type
from events.codec import encode_json, to_data
from events.envelope import Envelope
from events.upcasting import current_version
from ledger import commands as cmd
from ledger.answers import answer, with_position
from ledger.application import request_hash
from ledger.decide import decide
from ledger.programme import Programme
from ledger.state import Fact, MemberState, evolve
from ledger.store import envelope_hash


def member(programme: Programme, now: datetime, purchases: int) -> MemberState:
    state = MemberState()
    for command in [cmd.Enrol(member_id="m1", identities=[], enrolled_at=now - timedelta(days=10))] + [
        cmd.RecordPurchase(purchase_id=f"p{n}", store_id="s1", amount_cents=25_800, occurred_at=now - timedelta(days=5))
        for n in range(purchases)
    ]:
        for decided in decide(state, command, programme, now):
            evolve(state, Fact(decided.event, decided.occurred_at, state.version + 1))
    return state


def steps(n: int, purchases: int = 5) -> dict[str, float]:
    programme = Programme()
    now = datetime.now(timezone.utc)
    state = member(programme, now, purchases)
    bodies = [msgspec.json.encode({"purchase_id": f"x{i}", "store_id": "s1", "amount_cents": 25_800}) for i in range(n)]
    timings: dict[str, float] = {}

    def timed(name: str, function) -> list:
        started = time.perf_counter()
        results = [function(i) for i in range(n)]
        timings[name] = 1e6 * (time.perf_counter() - started) / n
        return results

    commands = timed("decode the body (msgspec, strict types)",
                     lambda i: msgspec.json.decode(bodies[i], type=cmd.RecordPurchase))
    timed("request fingerprint (canonical JSON + SHA-256)", lambda i: request_hash("purchase", "m1", commands[i]))
    decided = timed("decide (rules, tier, member day)", lambda i: decide(state, commands[i], programme, now))

    def seal(i: int) -> list[Envelope]:
        previous, out = "0" * 64, []
        for k, d in enumerate(decided[i]):
            name = event_type(d.event)
            unsealed = Envelope(position=1000 + k, stream_id="m1", stream_version=state.version + 1 + k, type=name,
                                schema_version=current_version(name), occurred_at=d.occurred_at, recorded_at=now,
                                command_id=None, actor="till", programme_version=1, data=to_data(d.event), hash="")
            previous = envelope_hash(unsealed, previous)
            out.append(msgspec.structs.replace(unsealed, hash=previous))
        return out

    sealed = timed("seal: envelopes, canonical bytes, hash chain (2 events)", seal)
    timed("rows for the INSERT (data to JSON text)", lambda i: [encode_json(e.data).decode() for e in sealed[i]])

    copies = [state.copy() for _ in range(n)]  # evolve works in place; each command starts from the same member

    def respond(i: int) -> bytes:
        for offset, d in enumerate(decided[i], start=1):
            evolve(copies[i], Fact(d.event, d.occurred_at, state.version + offset))
        body = answer(commands[i], copies[i], decided[i], programme)
        return with_position(body, sealed[i][-1].position, sealed[i][-1].stream_version)

    timed("answer: evolve the decided events, build and encode the answer", respond)
    timings["total"] = sum(timings.values())
    return timings


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    for name, us in steps(n).items():
        print(f"{us:8.1f} µs  {name}")


if __name__ == "__main__":
    main()

"""The ingest's second baseline: the least a purchase costs here, served as the service serves it.

aiohttp on uvloop, as the service. POST /v1/members/{member_id}/purchases
decodes the body into the same ``RecordPurchase`` struct, decides with the
real ``decide`` on the member's state held in memory, and appends through the
real store's group commit: the purchase's natural id checked against the
stored answers under the head lock, the two events sealed into the hash chain
(the real envelope and hash) and COPY'd into ``events``, the answer stored.
It answers the real answer. Nothing else: no API key, no Idempotency-Key, no
metrics, no projectors, no cache validation (this process is the members'
only writer), no snapshots. So the ingest row can show how far the service
is from what a purchase must cost, as well as from an empty handler.

The members (``PREFIX0`` .. ``PREFIX<COUNT - 1>``, as the bench's wrk scripts
pick them) are enrolled at start, through the same path; /healthz answers
once they are.

    python -m bench.lean PORT DATABASE_URL PREFIX COUNT
"""

from __future__ import annotations

import asyncio
import sys

import msgspec
import uvloop
from aiohttp import web

from bench.noop import healthz, serve
from ledger.answers import answer, with_position
from ledger.application import fact_of, request_hash
from ledger.clock import system_clock
from ledger.commands import Enrol, RecordPurchase
from ledger.database import create_pool
from ledger.decide import Decided, decide
from ledger.programme import Programme
from ledger.state import Fact, MemberState, evolve
from ledger.store import Append, EventStore, NewEvent, ResultKey

PROGRAMME = Programme()


class Members:
    """The members' states, one writer at a time per member (as the service's member locks)."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.states: dict[str, MemberState] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    async def enrol(self, member_ids: list[str]) -> None:
        appends = []
        for member_id in member_ids:
            state = self.states[member_id] = MemberState()
            self.locks[member_id] = asyncio.Lock()
            command = Enrol(member_id=member_id, identities=[], enrolled_at=system_clock())
            appends.append(self.append(member_id, state, command, decide(state, command, PROGRAMME, system_clock())))
        for outcome in await self.store.append_series(appends):
            if isinstance(outcome, Exception):
                raise outcome

    async def purchase(self, member_id: str, command: RecordPurchase) -> bytes:
        async with self.locks[member_id]:
            state = self.states.get(member_id) or await self.load(member_id)
            append = self.append(member_id, state, command, decide(state, command, PROGRAMME, system_clock()))
            try:
                await self.store.append(append)
            except BaseException:
                del self.states[member_id]  # evolved with events that did not commit: read it again
                raise
            return append.answer[1]

    def append(self, member_id: str, state: MemberState, command: Enrol | RecordPurchase,
               decided: list[Decided]) -> Append:
        """The command's append; evolves ``state`` with its events (before the commit, as the service does)."""
        expected_version = state.version
        for offset, new in enumerate(decided, start=1):
            evolve(state, Fact(new.event, new.occurred_at, expected_version + offset))
        body = answer(command, state, decided, PROGRAMME)
        natural_key = f"purchase:{command.purchase_id}" if isinstance(command, RecordPurchase) else "enrol"
        return Append(
            stream_id=member_id,
            expected_version=expected_version,
            events=[NewEvent(d.occurred_at, d.event) for d in decided],
            programme_version=PROGRAMME.version,
            result_keys=[ResultKey(member_id, natural_key, request_hash("purchase", member_id, command))],
            respond=lambda recorded: (201, with_position(body, recorded[-1].position, recorded[-1].stream_version)),
        )

    async def load(self, member_id: str) -> MemberState:
        state = self.states[member_id] = MemberState()
        for envelope in await self.store.read_stream(member_id):
            evolve(state, fact_of(envelope))
        return state


def routes(members: Members) -> list[web.RouteDef]:
    async def purchase(request: web.Request) -> web.Response:
        command = msgspec.json.decode(await request.read(), type=RecordPurchase)
        body = await members.purchase(request.match_info["member_id"], command)
        return web.Response(status=201, body=body, content_type="application/json")

    return [web.post("/v1/members/{member_id}/purchases", purchase), web.get("/healthz", healthz)]


async def main(port: int, database_url: str, prefix: str, count: int) -> None:
    pool = await create_pool(database_url)
    store = EventStore(pool)
    store.start_group_commit()
    members = Members(store)
    await members.enrol([f"{prefix}{n}" for n in range(count)])
    app = web.Application()
    app.add_routes(routes(members))
    await serve(app, port)
    await store.stop_group_commit()
    await pool.close()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])))

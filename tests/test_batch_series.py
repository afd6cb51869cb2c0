"""A member's batch lines run as one series (``Ledger.execute_series``): same answers as one by one.

The series decides each line on the state its predecessors leave and hands
them to group commit together; the first line that does not simply append
(a refusal, a replay, a reused key, a failed append) and the rest fall back
to ``Ledger.execute``. Whatever the mix, every line must get the answer it
gets when the lines run one at a time through ``execute``, and the member's
log must hold the same events.
"""

from __future__ import annotations

import itertools
import os
from datetime import datetime, timezone

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.application import Ledger
from ledger.clock import ManualClock
from ledger.programme import Programme
from ledger.store import EventStore
from api.app import create_app
from api.auth import Principal
from api.batch import BatchLine, prepare_batch_line, run_batch_lines
from api.context import LEDGER
from ledger.settings import Settings
from tests.support import OwnDatabase

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
ADMIN = Principal("k", "till-042", "admin")
_examples = itertools.count(1)


def _line(op: str, member: str, body: dict, key: str | None = None) -> dict:
    return {"op": op, "member_id": member, "body": body, "idempotency_key": key}


def _lines_for(member: str):
    """One member's lines: enrolment, then purchases, returns, redemptions and adjustments.

    Ids come from small pools, so duplicates (replays and 409s), returns of
    unknown or fully returned purchases and redemptions beyond the balance
    (refusals) are common; so are keys reused with another body (422).
    """
    purchase_ids = st.sampled_from(["p0", "p1", "p2", "p3"])
    # Keys are global: one reused across members makes the answer depend on which member's
    # line the concurrent batch reaches first, so each member has keys of its own.
    key = st.none() | st.sampled_from([f"{member}-k0", f"{member}-k1", f"{member}-k2"])
    purchase = st.builds(
        lambda pid, cents, k: _line("purchase", member, {"purchase_id": pid, "store_id": "s1", "amount_cents": cents}, k),
        purchase_ids, st.sampled_from([900, 25_800, 120_000]), key,
    )
    refund = st.builds(
        lambda rid, pid, cents, k: _line(
            "return", member, {"return_id": rid, "purchase_id": pid, "amount_cents": cents}, k),
        st.sampled_from(["r0", "r1", "r2"]), purchase_ids, st.sampled_from([500, 25_800, 130_000]), key,
    )
    redeem = st.builds(
        lambda rid, points, k: _line("redemption", member, {"redemption_id": rid, "points": points}, k),
        st.sampled_from(["d0", "d1"]), st.sampled_from([10, 200, 100_000]), key,
    )
    adjust = st.builds(
        lambda aid, points, k: _line("adjustment", member, {"adjustment_id": aid, "points": points, "reason": "goodwill"}, k),
        st.sampled_from(["a0", "a1"]), st.sampled_from([-50, 300, 5_000]), key,
    )
    enrol = st.just(_line("enrol", member, {}))
    return st.tuples(enrol, st.lists(st.one_of(purchase, refund, redeem, adjust), max_size=10)).map(
        lambda parts: [parts[0], *parts[1]]
    )


@st.composite
def interleaved_lines(draw) -> list[dict]:
    """Two members' lines, interleaved as a till's day file would have them."""
    first, second = draw(_lines_for("A")), draw(_lines_for("B"))
    order = draw(st.permutations([0] * len(first) + [1] * len(second)))
    queues = [iter(first), iter(second)]
    return [next(queues[which]) for which in order]


def _renamed(line: dict, prefix: str) -> BatchLine:
    key = line["idempotency_key"]
    encoded = msgspec.json.encode({**line, "member_id": prefix + line["member_id"],
                                   "idempotency_key": prefix + key if key else None})
    return msgspec.json.decode(encoded, type=BatchLine)


def _comparable(status: int, body: bytes, prefix: str) -> tuple[int, dict]:
    answer = msgspec.json.decode(body.replace(prefix.encode(), b"<member>"))
    answer.pop("position", None)  # the two runs interleave differently in the log
    return status, answer


class Harness:
    """An app with a manual clock on a database of its own, driven from a loop of its own."""

    def __init__(self, server_url: str, template: str) -> None:
        self.clock = ManualClock(NOW)
        self.database = OwnDatabase(server_url, template, f"loyalty_series_{os.getpid()}")
        self.run, self.pool = self.database.run, self.database.pool
        self.app = create_app(self.pool, Programme(), self.clock, Settings(rate_limit_per_s=None, scheduler=False))
        self.ledger: Ledger = self.app[LEDGER]
        self.database.start_group_commit(self.ledger.store)

    async def one_by_one(self, lines: list[BatchLine]) -> list[tuple[int, bytes]]:
        answers = []
        for line in lines:
            member_id, request = prepare_batch_line(ADMIN, line)
            outcome = await self.ledger.execute(
                request.operation, member_id, request.command, actor=request.actor,
                idempotency_key=request.idempotency_key, fingerprint=request.fingerprint,
            )
            answers.append((outcome.status, outcome.body))
        return answers

    async def stream(self, prefix: str, member: str) -> list[tuple[str, dict]]:
        """The member's events, its id written ``<member>``."""
        envelopes = await self.ledger.store.read_stream(prefix + member)
        return [(e.type, msgspec.json.decode(msgspec.json.encode(e.data).replace(prefix.encode(), b"<member>")))
                for e in envelopes]

    def close(self) -> None:
        self.database.close(self.ledger.store)


@pytest.fixture(scope="module")
def harness(database_server_url, template_database):
    opened = Harness(database_server_url, template_database)
    yield opened
    opened.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=interleaved_lines())
def test_a_batch_answers_every_line_as_running_it_alone_would(harness, lines):
    example = next(_examples)
    series, alone = f"s{example}-", f"o{example}-"
    batched = harness.run(run_batch_lines(harness.app, ADMIN, [_renamed(line, series) for line in lines]))
    single = harness.run(harness.one_by_one([_renamed(line, alone) for line in lines]))
    for number, (got, expected) in enumerate(zip(batched, single, strict=True), start=1):
        assert _comparable(*got, series) == _comparable(*expected, alone), f"line {number}: {lines[number - 1]}"
    for member in ("A", "B"):
        assert harness.run(harness.stream(series, member)) == harness.run(harness.stream(alone, member))


def test_a_series_on_a_stale_cache_falls_back_and_answers_from_the_log(harness):
    """Another process appended to the member after this one cached it: the series' first append
    fails its expected version, and the lines run again on the state read from the log."""
    other = Ledger(EventStore(harness.pool, harness.clock), Programme(), harness.clock)
    lines = [_renamed(_line("enrol", "C", {}), "stale-")] + [
        _renamed(_line("purchase", "C", {"purchase_id": f"p{n}", "store_id": "s1", "amount_cents": 25_800}), "stale-")
        for n in range(3)
    ]
    assert [status for status, _ in harness.run(run_batch_lines(harness.app, ADMIN, lines[:2]))] == [201, 201]

    async def elsewhere() -> bytes:
        _member, request = prepare_batch_line(ADMIN, lines[2])
        outcome = await other.execute(request.operation, "stale-C", request.command, fingerprint=request.fingerprint)
        assert outcome.status == 201
        return outcome.body

    first_answer = harness.run(elsewhere())
    answers = harness.run(run_batch_lines(harness.app, ADMIN, lines[2:]))
    assert answers[0] == (201, first_answer)  # p1: the other process's answer, replayed
    versions = [row["stream_version"] for row in harness.run(harness.pool.fetch(
        "SELECT stream_version FROM events WHERE stream_id = 'stale-C' ORDER BY position"))]
    assert versions == list(range(1, len(versions) + 1))
    assert answers[1][0] == 201 and msgspec.json.decode(answers[1][1])["stream_version"] == versions[-1]  # p2: new

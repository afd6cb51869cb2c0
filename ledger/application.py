"""The application layer: load a member, decide, append, answer; exactly once.

For each command: check the Idempotency-Key's stored answer; take the
member's state (an in-process cache; a member not cached, or a decision that
appends nothing, is read from the log: only events newer than the cached
version); decide; append with the version the decision saw; store the answer
with the events. The append's version check under the head lock is what
validates a cached state: a conflict (another process appended) reloads and
decides again; within one process a per-member lock serializes commands so
they do not conflict at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple, Sequence
import msgspec

from events.codec import encode_json, from_data
from events.envelope import Envelope
from ledger import commands as cmd
from ledger import settings
from ledger.answers import JobAnswer, answer, with_position
from ledger.clock import Clock, system_clock
from ledger.decide import Decided, decide
from ledger.errors import DuplicateCommand, Refusal, problem
from ledger.programme import Programme
from ledger.state import Fact, MemberState, evolve, fold
from ledger.store import (
    AlreadyAnswered,
    Append,
    EventStore,
    IdentityTaken,
    NewEvent,
    ResultKey,
    StoredResult,
    WrongExpectedVersion,
)

log = logging.getLogger("loyalty.application")

MAX_CONFLICT_RETRIES = 20
CACHE_MEMBERS_MAX = 100_000
# The cache is bounded by its members' events too: a state grows with its
# history, so a member count alone does not bound memory. The service's RSS
# grows about 0.5 KB per cached event: `make bench` measured 292 MB, flat, with
# the cache full at 500,000 events, so the default leaves room under 300 MB.
# LOYALTY_CACHE_EVENTS (Settings.cache_events_max) sets it; the soak sets it low to reach it.
CACHE_EVENTS_MAX = settings.CACHE_EVENTS_MAX
# A snapshot is written when a member has this many events past the last one,
# or a quarter of its history if that is more: a cold load folds at most that
# many events, and since a snapshot's size grows with the history (~175 bytes
# an event), writing one every 100 events would cost a 5,000-event member
# ~9 KB of snapshot per event; every quarter of the history it is ~700 bytes.
SNAPSHOT_EVERY_EVENTS = 100
SNAPSHOT_EVERY_FRACTION = 4
GLOBAL_SCOPE = "*"  # command_results.stream_id of Idempotency-Keys

_sorted_encoder = msgspec.json.Encoder(order="sorted")


class Request(NamedTuple):
    """One command of a member's series (``Ledger.execute_series``)."""

    operation: str
    command: cmd.Command
    fingerprint: str
    actor: str | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Outcome:
    status: int
    body: bytes
    replayed: bool = False
    position: int | None = None

    @property
    def is_problem(self) -> bool:
        return self.status >= 400


def fact_of(envelope: Envelope) -> Fact:
    event = from_data(envelope.type, envelope.schema_version, envelope.data)
    return Fact(event, envelope.occurred_at, envelope.stream_version)


def request_hash(operation: str, stream_id: str, command: cmd.Command) -> str:
    """The fingerprint that tells a retry (same body) from a reuse (other body)."""
    canonical = _sorted_encoder.encode({"op": operation, "member": stream_id, "body": command})
    return hashlib.sha256(canonical).hexdigest()


def _refusal_outcome(refusal: Refusal) -> Outcome:
    return Outcome(refusal.status, encode_json(problem(refusal.status, refusal.code, refusal.detail, **refusal.extra)))


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class Ledger:
    def __init__(
        self, store: EventStore, programme: Programme, clock: Clock = system_clock,
        cache_events_max: int = CACHE_EVENTS_MAX,
    ) -> None:
        self.store = store
        self.cache_events_max = cache_events_max
        self.programme = programme
        self.clock = clock
        self._states: OrderedDict[str, MemberState] = OrderedDict()
        self._cached_events: dict[str, int] = {}  # each cached state's version when last remembered
        self._cached_events_total = 0
        self._snapshot_versions: dict[str, int] = {}
        self._locks = KeyedLocks()

    # -- member state ----------------------------------------------------------

    @property
    def cached_members(self) -> int:
        return len(self._states)

    @property
    def cached_events(self) -> int:
        """The cached states' events: what bounds the cache's memory (``cache_events_max``)."""
        return self._cached_events_total

    async def load(self, stream_id: str) -> MemberState:
        """The member's current state, for reading without an await in between."""
        async with self._locks.hold(stream_id):
            return await self._load_locked(stream_id)

    async def _load_locked(self, stream_id: str) -> MemberState:
        """Cached state plus any events appended since (by this or another process).

        Not cached: the latest snapshot plus the events after it. Either way
        only the events past a known version are read, so deciding costs the
        same for a member with 5 events and one with 5,000.
        """
        state = self._states.pop(stream_id, None)
        self._cached_events_total -= self._cached_events.pop(stream_id, 0)
        if state is None:
            state = await self.store.load_snapshot(stream_id, MemberState) or MemberState()
            if state.version:
                self._snapshot_versions[stream_id] = state.version
        while True:
            envelopes = await self.store.read_stream(stream_id, after_version=state.version)
            for envelope in envelopes:
                evolve(state, fact_of(envelope))
            if len(envelopes) < 10_000:
                break
        await self._maybe_snapshot(stream_id, state)
        if state.enrolled:
            self._remember(stream_id, state)
        return state

    async def _maybe_snapshot(self, stream_id: str, state: MemberState) -> None:
        last = self._snapshot_versions.get(stream_id, 0)
        due = max(SNAPSHOT_EVERY_EVENTS, last // SNAPSHOT_EVERY_FRACTION)
        if state.enrolled and state.version - last >= due:
            await self.store.save_snapshot(stream_id, state.version, state)
            self._snapshot_versions[stream_id] = state.version

    def _cached(self, stream_id: str) -> MemberState | None:
        """The cached state as it is (not checked against the log), or None."""
        state = self._states.get(stream_id)
        if state is not None:
            self._states.move_to_end(stream_id)
        return state

    def _remember(self, stream_id: str, state: MemberState) -> None:
        """Cache (or re-cache, after it grew) a state; evict the least recently used beyond the bounds."""
        self._states[stream_id] = state
        self._states.move_to_end(stream_id)
        self._cached_events_total += state.version - self._cached_events.get(stream_id, 0)
        self._cached_events[stream_id] = state.version
        while len(self._states) > CACHE_MEMBERS_MAX or (
            self._cached_events_total > self.cache_events_max and len(self._states) > 1
        ):
            evicted, _state = self._states.popitem(last=False)
            self._cached_events_total -= self._cached_events.pop(evicted, 0)
            self._snapshot_versions.pop(evicted, None)

    def forget(self, stream_id: str) -> None:
        self._states.pop(stream_id, None)
        self._cached_events_total -= self._cached_events.pop(stream_id, 0)
        self._snapshot_versions.pop(stream_id, None)

    async def state_as_of(self, stream_id: str, at: datetime) -> MemberState:
        """The member as the events with occurred_at <= ``at`` make it (log order)."""
        state = await self.load(stream_id)
        if state.latest_occurred_at is None or state.latest_occurred_at <= at:
            return state
        facts, after = [], 0
        while True:
            envelopes = await self.store.read_stream(stream_id, after_version=after)
            facts += [fact_of(e) for e in envelopes if e.occurred_at <= at]
            if len(envelopes) < 10_000:
                break
            after = envelopes[-1].stream_version
        return fold(facts)

    # -- commands --------------------------------------------------------------

    async def execute(
        self,
        operation: str,
        stream_id: str,
        command: cmd.Command,
        *,
        actor: str | None = None,
        idempotency_key: str | None = None,
        expected_version: int | None = None,
        fingerprint: str | None = None,
    ) -> Outcome:
        """Run one command exactly once; ``fingerprint`` defaults to the command's request hash."""
        fingerprint = fingerprint or request_hash(operation, stream_id, command)
        if idempotency_key is not None:
            stored = await self.store.stored_result(GLOBAL_SCOPE, f"idem:{idempotency_key}")
            if stored is not None:
                return self._replay_or_reuse(stored, fingerprint, "idempotency_key_reused", 422)
        async with self._locks.hold(stream_id):
            outcome = await self._decide_and_append(
                operation, stream_id, command, fingerprint, actor, idempotency_key, expected_version
            )
        if idempotency_key is not None and outcome.status < 500 and outcome.position is None and not outcome.replayed:
            return await self._keep_refusal(stream_id, idempotency_key, fingerprint, outcome)
        return outcome

    async def _keep_refusal(self, stream_id: str, idempotency_key: str, fingerprint: str, outcome: Outcome) -> Outcome:
        """Store a refusal under its Idempotency-Key, unless the key got its first answer meanwhile: then that one.

        A refusal is an answer too: the retry gets it again. It is stored
        through the append path (an append of no events), under the head lock
        where every answer is checked and stored, so a concurrent request with
        the same key either commits first (and this caller gets its answer) or
        finds this refusal.
        """
        keep = Append(
            stream_id=stream_id,
            expected_version=None,
            events=[],
            result_keys=[ResultKey(GLOBAL_SCOPE, f"idem:{idempotency_key}", fingerprint)],
            respond=lambda _recorded: (outcome.status, outcome.body),
        )
        try:
            await self.store.append(keep)
        except AlreadyAnswered as answered:
            stored = await self.store.stored_result(answered.stream_id, answered.command_key)
            assert stored is not None
            return self._replay_or_reuse(stored, fingerprint, "idempotency_key_reused", 422)
        return outcome

    async def execute_series(self, stream_id: str, requests: Sequence[Request]) -> list[Outcome]:
        """One member's commands in order, each answered as ``execute`` answers it.

        A bulk import's common case is that every command appends. Each is
        then decided on the state its predecessors leave and handed to the
        store at once, so the member's commands share group-commit
        transactions instead of waiting for one commit each. The series stops
        at the first command that would not simply append (a refusal, a
        replay, nothing to append) or whose append fails; that command and
        the rest run one by one through ``execute``, which answers those cases.
        """
        async with self._locks.hold(stream_id):
            outcomes = await self._append_series(stream_id, requests)
        for request in requests[len(outcomes):]:
            outcomes.append(
                await self.execute(
                    request.operation, stream_id, request.command, actor=request.actor,
                    idempotency_key=request.idempotency_key, fingerprint=request.fingerprint,
                )
            )
        return outcomes

    async def _append_series(self, stream_id: str, requests: Sequence[Request]) -> list[Outcome]:
        """The leading commands that append, appended together; their outcomes."""
        state = self._cached(stream_id)
        if state is None:
            state = await self._load_locked(stream_id)
        appends: list[Append] = []
        try:
            for request in requests:
                try:
                    decided = decide(state, request.command, self.programme, self.clock())
                except (Refusal, DuplicateCommand):
                    break
                if not decided:
                    break
                appends.append(self._prepare_append(
                    stream_id, state, request.command, decided, request.fingerprint, request.actor,
                    request.idempotency_key,
                ))
            results = await self.store.append_series(appends) if appends else []
        except BaseException:
            self.forget(stream_id)  # the in-place evolve has run
            raise
        outcomes = []
        for append, recorded in zip(appends, results):
            if isinstance(recorded, Exception):
                # A failed append ends the series (the ones after it expected
                # its version, so they failed too); the state holds their events.
                self.forget(stream_id)
                return outcomes
            outcomes.append(Outcome(*append.answer, position=recorded[-1].position))
        if appends:
            self._remember(stream_id, state)
            try:
                await self._maybe_snapshot(stream_id, state)
            except Exception:  # a snapshot is only a cache; the commands have succeeded
                log.warning("snapshot of %s not written; the next cold load folds further", stream_id, exc_info=True)
        return outcomes

    async def prune_idempotency_answers(self, retention: timedelta) -> int:
        """Forget the Idempotency-Key answers first given more than ``retention`` ago; how many.

        Natural-id answers are kept: they are the business's ids, and a
        command with one still replays by it after its key is forgotten.
        """
        return await self.store.prune_answers(GLOBAL_SCOPE, self.clock() - retention)

    def _replay_or_reuse(self, stored: StoredResult, fingerprint: str, code: str, status: int) -> Outcome:
        if stored.request_hash == fingerprint:
            return Outcome(stored.status, stored.body, replayed=True)
        detail = (
            "this Idempotency-Key was used with another request; use a new key for a new request"
            if code == "idempotency_key_reused"
            else f"{stored.command_key} was already used on this member with another body"
        )
        return _refusal_outcome(Refusal(status, code, detail))

    async def _decide_and_append(
        self, operation, stream_id, command, fingerprint, actor, idempotency_key, expected_version
    ) -> Outcome:
        for attempt in range(MAX_CONFLICT_RETRIES):
            # First try: decide on the cached state without reading the log.
            # An append is safe on it, since the store checks its version under
            # the head lock (a stale cache is a conflict: reload, decide again);
            # anything else (a refusal, a replay, 412, nothing to append) is
            # answered only from a state just read, so another process's
            # appends can never show through as a wrong refusal.
            state = self._cached(stream_id) if attempt == 0 else None
            checked = state is None
            if state is None:
                state = await self._load_locked(stream_id)
            if expected_version is not None and expected_version != state.version:
                if not checked:
                    continue
                return _refusal_outcome(
                    Refusal(412, "version_mismatch", f"the member is at version {state.version}, not {expected_version}",
                            stream_version=state.version)
                )
            try:
                decided = decide(state, command, self.programme, self.clock())
            except Refusal as refusal:
                if not checked:
                    continue
                return _refusal_outcome(refusal)
            except DuplicateCommand as duplicate:
                if not checked:
                    continue
                return await self._natural_replay(stream_id, duplicate.natural_key, fingerprint)
            if not decided:
                if not checked:
                    continue
                return Outcome(200, encode_json(JobAnswer(appended=0)))
            try:
                append = self._prepare_append(stream_id, state, command, decided, fingerprint, actor, idempotency_key)
                recorded = await self.store.append(append)
            except WrongExpectedVersion:
                self.forget(stream_id)
                continue
            except IdentityTaken as taken:
                self.forget(stream_id)
                return _refusal_outcome(
                    Refusal(409, "identity_taken", f"{taken.identity_type} {taken.value} belongs to another member")
                )
            except AlreadyAnswered as answered:
                self.forget(stream_id)
                stored = await self.store.stored_result(answered.stream_id, answered.command_key)
                assert stored is not None
                if answered.stream_id == GLOBAL_SCOPE:
                    return self._replay_or_reuse(stored, fingerprint, "idempotency_key_reused", 422)
                return self._replay_or_reuse(stored, fingerprint, "duplicate_id", 409)
            except BaseException:
                self.forget(stream_id)  # the in-place evolve may have run
                raise
            status, body = append.answer
            self._remember(stream_id, state)  # it grew: count its new events against the cache's bound
            try:  # the state now includes the events just appended
                await self._maybe_snapshot(stream_id, state)
            except Exception:  # a snapshot is only a cache; the command has succeeded
                log.warning("snapshot of %s not written; the next cold load folds further", stream_id, exc_info=True)
            return Outcome(status, body, position=recorded[-1].position)
        return _refusal_outcome(Refusal(503, "contention", "the member is being changed by many writers; retry"))

    def _prepare_append(
        self, stream_id: str, state: MemberState, command: cmd.Command, decided: list[Decided], fingerprint: str,
        actor: str | None, idempotency_key: str | None,
    ) -> Append:
        """The append of a decided command; evolves ``state`` with its events and builds its answer.

        In place and before the commit: the caller holds the member's lock, and
        forgets the cached state if the append fails.
        """
        expected_version = state.version
        for offset, new in enumerate(decided, start=1):
            evolve(state, Fact(new.event, new.occurred_at, expected_version + offset))
        body = answer(command, state, decided, self.programme)
        keys = [ResultKey(stream_id, natural_key, fingerprint) for natural_key in _natural_keys(command)]
        if idempotency_key is not None:
            keys.append(ResultKey(GLOBAL_SCOPE, f"idem:{idempotency_key}", fingerprint))
        return Append(
            stream_id=stream_id,
            expected_version=expected_version,
            events=[NewEvent(d.occurred_at, d.event) for d in decided],
            command_id=idempotency_key,
            actor=actor,
            programme_version=self.programme.version,
            identities=[(i.type, i.value) for i in command.identities] if isinstance(command, cmd.Enrol) else (),
            result_keys=keys,
            respond=lambda recorded: (201, with_position(body, recorded[-1].position, recorded[-1].stream_version)),
        )

    async def _natural_replay(self, stream_id: str, natural_key: str, fingerprint: str) -> Outcome:
        stored = await self.store.stored_result(stream_id, natural_key)
        if stored is None:
            return _refusal_outcome(Refusal(409, "duplicate_id", f"{natural_key} was already used on this member"))
        return self._replay_or_reuse(stored, fingerprint, "duplicate_id", 409)


class KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str):
        lock, users = self._locks.get(key, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


def _natural_keys(command: cmd.Command) -> list[str]:
    """The natural ids a command's first answer is stored under (per member)."""
    match command:
        case cmd.RecordPurchase():
            return [f"purchase:{command.purchase_id}"]
        case cmd.RecordReturn():
            return [f"return:{command.return_id}"]
        case cmd.Redeem():
            return [f"redemption:{command.redemption_id}"]
        case cmd.ReverseRedemption():
            return [f"redemption_reversal:{command.redemption_id}"]
        case cmd.IssueCoupon():
            return [f"coupon:{command.coupon_id}"]
        case cmd.Adjust():
            return [f"adjustment:{command.adjustment_id}"]
        case cmd.RecordActivity():
            return [f"activity:{command.activity_id}"]
    return []

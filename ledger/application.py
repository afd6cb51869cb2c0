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
import dataclasses
import hashlib
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Awaitable, Callable, NamedTuple, Sequence
import msgspec

from events.codec import encode_json, from_data
from events.envelope import Envelope
from events import catalogue as ev
from ledger import commands as cmd
from ledger import referrals, settings
from ledger.answers import JobAnswer, ReferralAnswer, answer, with_position
from ledger.campaigns import CAMPAIGNS_STREAM, CampaignBook, Spend, add_spend, decide_create, decide_end, grants_in
from ledger.clock import Clock, system_clock
from ledger.decide import CampaignContext, Decided, command_time, decide
from ledger.errors import DuplicateCommand, Refusal, problem
from ledger.follower import LogFollower
from ledger.programme import PROGRAMME_STREAM, Programme, ProgrammeHistory, decide_change, decide_seed
from ledger.simulation import SIMULATION_EVENT_TYPES, Simulation, SimulationAnswer
from ledger.state import Fact, MemberState, evolve, fold
from ledger.store import (
    MAX_READ_LIMIT,
    AlreadyAnswered,
    Append,
    EventStore,
    IdentityTaken,
    NewEvent,
    ResultKey,
    RulesChanged,
    RulesSeen,
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
SIMULATION_PAGE_EVENTS = 10_000  # a simulation reads the log in pages of this many events
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
    return _fingerprint(operation, stream_id, body=command)


def body_hash(operation: str, stream_id: str, body: bytes) -> str:
    """The fingerprint of a body refused before it became a command (it did not decode)."""
    return _fingerprint(operation, stream_id, raw=body)


def _fingerprint(operation: str, stream_id: str, **request: object) -> str:
    return hashlib.sha256(_sorted_encoder.encode({"op": operation, "member": stream_id, **request})).hexdigest()


def _refusal_outcome(refusal: Refusal) -> Outcome:
    return Outcome(refusal.status, encode_json(problem(refusal.status, refusal.code, refusal.detail, **refusal.extra)))


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


@dataclass
class Rules:
    """What decides a member's command besides its state: the programme's versions, the
    campaigns, and what each campaign has spent, as this process last read them. An append
    says which versions it saw (``RulesSeen``); the store refuses it if they moved."""

    programmes: ProgrammeHistory = field(default_factory=ProgrammeHistory)
    campaigns: CampaignBook = field(default_factory=CampaignBook)
    spend: dict[str, Spend] = field(default_factory=dict)

    def seen(self) -> RulesSeen:
        return RulesSeen(self.programmes.stream_version, self.campaigns.stream_version)


class Ledger:
    def __init__(
        self, store: EventStore, programme: Programme, clock: Clock = system_clock,
        cache_events_max: int = CACHE_EVENTS_MAX, *, programme_file_given: bool = True,
    ) -> None:
        self.store = store
        self.cache_events_max = cache_events_max
        # LOYALTY_PROGRAMME's (or the defaults): version 1 of an empty log. Only a file actually
        # given replaces the version in force when it differs (CONTRACT §6.1): without one, a
        # restart keeps the versions PUT /v1/programme made.
        self.given_programme = programme
        self.programme_file_given = programme_file_given
        self._started = False
        self.rules = Rules()
        self._rules_lock = asyncio.Lock()
        self.clock = clock
        self._states: OrderedDict[str, MemberState] = OrderedDict()
        self._cached_events: dict[str, int] = {}  # each cached state's version when last remembered
        self._cached_events_total = 0
        self._snapshot_versions: dict[str, int] = {}
        self._locks = KeyedLocks(on_idle=self._idle)
        # Members being loaded or changed here (their lock held): the highest stream_version the
        # log follower saw of each meanwhile, so a state read before it is not cached (``_remember``).
        self._log_versions: dict[str, int] = {}
        self.follower: LogFollower | None = None  # None: reads take the round trip (``read``)

    # -- the rules: programme versions and campaigns ------------------------------

    @property
    def programme(self) -> Programme:
        """The version in force now (the given programme until the log has been read)."""
        if not self.rules.programmes.versions:
            return self.given_programme
        return self.rules.programmes.in_force(self.clock())

    def programme_at(self, at: datetime) -> Programme:
        return self.rules.programmes.in_force(at)

    async def refresh_rules(self) -> bool:
        """Read what the $programme and $campaigns streams and the campaign counters hold now;
        on an empty log, seed the programme first. Whether the streams moved."""
        async with self._rules_lock:
            before = self.rules.seen()
            await self._read_rules()
            while not self._started and (seed := self._seed()) is not None:
                try:  # at start: version 1, or the given file as the next version when it differs
                    await self.store.append(self._rules_append(PROGRAMME_STREAM, [seed], None, "seed"))
                except WrongExpectedVersion:
                    pass  # another process seeded meanwhile: read it and look again
                await self._read_rules()
            self._started = True  # the file is compared once, at start
            self.rules.spend = await self.store.read_campaign_spend()
            return self.rules.seen() != before

    def _seed(self) -> ev.ProgrammeChanged | None:
        if self.rules.programmes.versions and not self.programme_file_given:
            return None
        return decide_seed(self.rules.programmes, self.given_programme, self.clock())

    async def _ensure_rules(self) -> None:
        if not self.rules.programmes.versions:
            await self.refresh_rules()

    async def _read_rules(self) -> None:
        rules = self.rules
        for envelope in await self._read_all_of(PROGRAMME_STREAM, rules.programmes.stream_version):
            rules.programmes.evolve(fact_of(envelope).event, envelope.recorded_at, envelope.actor)
        for envelope in await self._read_all_of(CAMPAIGNS_STREAM, rules.campaigns.stream_version):
            rules.campaigns.evolve(fact_of(envelope).event)

    async def _read_all_of(self, stream_id: str, after_version: int) -> list[Envelope]:
        return [envelope async for page in self.store.stream_pages(stream_id, after_version) for envelope in page]

    def _rules_append(self, stream_id: str, events: list[ev.Event], actor: str | None, command_id: str | None,
                      result_keys=(), respond=None) -> Append:
        """An append to a rules stream, at the version this process last read."""
        known = self.rules.programmes if stream_id == PROGRAMME_STREAM else self.rules.campaigns
        now = self.clock()
        return Append(
            stream_id=stream_id,
            expected_version=known.stream_version,
            events=[NewEvent(now, event) for event in events],
            command_id=command_id,
            actor=actor,
            programme_version=self.programme.version if self.rules.programmes.versions else None,
            result_keys=result_keys,
            respond=respond,
        )

    async def execute_rules(
        self, operation: str, command: cmd.Command, *, actor: str | None = None, idempotency_key: str | None = None,
        dry_run: bool = False,
    ) -> Outcome:
        """A change of the programme or of a campaign, exactly once (Idempotency-Key as for members);
        a dry run decides and answers on the rules as they are now, and appends and stores nothing."""
        stream_id = PROGRAMME_STREAM if isinstance(command, cmd.ChangeProgramme) else CAMPAIGNS_STREAM
        fingerprint = request_hash(operation, stream_id, command)
        if idempotency_key is not None:
            stored = await self.store.stored_result(GLOBAL_SCOPE, f"idem:{idempotency_key}")
            if stored is not None:
                return self._replay_or_reuse(stored, fingerprint, "idempotency_key_reused", 422)
        keys = [ResultKey(GLOBAL_SCOPE, f"idem:{idempotency_key}", fingerprint)] if idempotency_key else []
        outcome = None
        for _attempt in range(MAX_CONFLICT_RETRIES):
            await self.refresh_rules()
            try:
                event = self._decide_rules(command)
            except Refusal as refusal:
                outcome = _refusal_outcome(refusal)
                break
            body = self._rules_answer(event)
            if dry_run:
                return dry_run_outcome(Outcome(201, encode_json(body)))
            append = self._rules_append(
                stream_id, [event], actor, idempotency_key, keys,
                respond=lambda recorded, body=body: (201, encode_json({**body, "position": recorded[-1].position})),
            )
            try:
                recorded = await self.store.append(append)
            except WrongExpectedVersion:
                continue  # the stream moved: read it and decide again
            except AlreadyAnswered as answered:
                stored = await self.store.stored_result(answered.stream_id, answered.command_key)
                assert stored is not None
                return self._replay_or_reuse(stored, fingerprint, "idempotency_key_reused", 422)
            await self.refresh_rules()
            return Outcome(*append.answer, position=recorded[-1].position)
        if outcome is None:
            return _refusal_outcome(Refusal(503, "contention", "the rules are being changed by many writers; retry"))
        if idempotency_key is not None and not dry_run:
            return await self._keep_answer(stream_id, idempotency_key, fingerprint, outcome)
        return outcome

    def _decide_rules(self, command: cmd.Command) -> ev.Event:
        now = self.clock()
        if isinstance(command, cmd.ChangeProgramme):
            return decide_change(self.rules.programmes, command.settings, command.effective_from, now)
        if isinstance(command, cmd.CreateCampaign):
            return decide_create(self.rules.campaigns, command, now)
        assert isinstance(command, cmd.EndCampaign) and command.campaign_id is not None, "the path names it"
        return decide_end(self.rules.campaigns, command.campaign_id, command.reason, now)

    def _rules_answer(self, event: ev.Event) -> dict:
        if isinstance(event, ev.ProgrammeChanged):
            return {"version": event.version, "effective_from": event.effective_from, "settings": event.settings}
        book = CampaignBook(dict(self.rules.campaigns.campaigns))
        if isinstance(event, ev.CampaignEnded):
            book.campaigns[event.campaign_id] = dataclasses.replace(book.campaigns[event.campaign_id])
        book.evolve(event)
        campaign = book.campaigns[event.campaign_id]
        return campaign.view(self.clock(), self.rules.spend.get(event.campaign_id, Spend()))

    def _campaign_context(self) -> CampaignContext:
        return CampaignContext(self.rules.campaigns, self.rules.spend)

    def _note_grants(self, append: Append) -> None:
        """Count a committed append's grants in this process's view of the budgets."""
        for grant in append.grants:
            self.rules.spend[grant.campaign_id] = add_spend(self.rules.spend.get(grant.campaign_id, Spend()), grant)

    # -- simulations (CONTRACT §6.5) -------------------------------------------

    async def simulate(
        self, command: cmd.Simulate, progress: Callable[[int], None] | None = None,
    ) -> SimulationAnswer:
        """What the window's purchases would have granted under the command's changes. Appends nothing;
        a Refusal (the contract's code) before anything is read."""
        return await self.run_simulation(await self.prepare_simulation(command), progress)

    async def prepare_simulation(self, command: cmd.Simulate) -> Simulation:
        """The simulation of the command's window on the rules as they are now, or a Refusal."""
        await self.refresh_rules()
        return Simulation.of(
            command.from_, command.to, self.rules.programmes, self.rules.campaigns,
            command.changes.settings, command.changes.campaigns,
        )

    async def run_simulation(
        self, simulation: Simulation, progress: Callable[[int], None] | None = None,
    ) -> SimulationAnswer:
        """The log's purchases and grants, read up to the head as it is now, fed to the pure
        ``Simulation`` in log order; ``progress`` is told how many purchases each page held."""
        head, _hash = await self.store.head()

        def read_after(position: int) -> asyncio.Task | None:
            if position >= head:
                return None
            return asyncio.ensure_future(
                self.store.read_all(position, SIMULATION_PAGE_EVENTS, SIMULATION_EVENT_TYPES, until=head)
            )

        # The next page is read while this one is simulated: PostgreSQL's half of a read runs on
        # another core meanwhile.
        reading = read_after(0)
        try:
            while reading is not None:
                page = await reading
                reading = read_after(page[-1].position) if page else None
                for envelope in page:
                    event = from_data(envelope.type, envelope.schema_version, envelope.data)
                    simulation.feed(envelope.stream_id, envelope.occurred_at, envelope.programme_version, event)
                if progress is not None:
                    progress(sum(1 for envelope in page if envelope.type == "purchase_recorded"))
        finally:
            if reading is not None:
                reading.cancel()
        return simulation.answer()

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

    async def follow_log(self) -> None:
        """Serve reads from the cache from now on, following the log's tail (before any member is cached:
        at start-up)."""
        assert not self._states and self.follower is None
        head, _hash = await self.store.head()
        self.follower = LogFollower(self.store.stream_versions_after, self._apply_log, head)
        self.store.head_listeners.append(self.follower.heard)

    async def stop_following(self) -> None:
        if self.follower is not None:
            self.store.head_listeners.remove(self.follower.heard)
            follower, self.follower = self.follower, None
            await follower.stop()

    async def read(self, stream_id: str, min_position: int | None = None) -> MemberState:
        """The member as of a moment after this call, showing every write answered before it
        (by any process) and, with ``min_position``, every event up to that position.

        From the cache when this process has applied the log that far (README, member state
        cache: the consistency promise); otherwise as ``load`` reads it. The state is the
        cached object itself: use it before the next await.
        """
        follower = self.follower
        if follower is None:
            return await self.load(stream_id)
        if min_position is not None and follower.applied >= min_position:
            follower.read_served()
        else:
            try:
                await follower.current()
            except Exception:
                log.warning("catching up with the log failed; reading %s from it", stream_id, exc_info=True)
                return await self.load(stream_id)
        state = None if self._locks.busy(stream_id) else self._cached(stream_id)
        return state if state is not None else await self.load(stream_id)

    def _apply_log(self, rows) -> None:
        """The log's events past ``follower.applied``: drop the cached states they make stale.

        A member whose lock is held is being loaded (its state out of the cache) or changed by a
        command here (its cached state may hold the command's events, not committed yet):
        remember what the log holds, so that ``_remember`` does not cache a state older than it.
        """
        for _position, stream_id, stream_version in rows:
            if self._locks.busy(stream_id) and stream_version > self._log_versions.get(stream_id, 0):
                self._log_versions[stream_id] = stream_version
            state = self._states.get(stream_id)
            if state is not None and state.version < stream_version:
                self.forget(stream_id)

    def _idle(self, stream_id: str) -> None:
        self._log_versions.pop(stream_id, None)

    async def _load_locked(self, stream_id: str) -> MemberState:
        """Cached state plus any events appended since (by this or another process).

        Not cached: the latest snapshot plus the events after it. Either way
        only the events past a known version are read, so deciding costs the
        same for a member with 5 events and one with 5,000.
        """
        state = self._states.pop(stream_id, None)
        self._cached_events_total -= self._cached_events.pop(stream_id, 0)
        more_to_read = True
        if state is None:
            snapshot, envelopes = await self.store.load_stream(stream_id, MemberState)
            state = snapshot or MemberState()
            if state.version:
                self._snapshot_versions[stream_id] = state.version
            for envelope in envelopes:
                evolve(state, fact_of(envelope))
            more_to_read = len(envelopes) == MAX_READ_LIMIT  # a first page only
        if more_to_read:
            async for page in self.store.stream_pages(stream_id, after_version=state.version):
                for envelope in page:
                    evolve(state, fact_of(envelope))
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
        """Cache (or re-cache, after it grew) a state; evict the least recently used beyond the bounds.

        Not a state older than an event the log follower has applied: another process appended
        meanwhile, and a read served from the cache would miss it.
        """
        if state.version < self._log_versions.get(stream_id, 0):
            self.forget(stream_id)
            return
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

    async def state_as_of(self, stream_id: str, at: datetime, min_position: int | None = None) -> MemberState:
        """The member as the events with occurred_at <= ``at`` make it (log order); read as ``read`` reads.

        The enrolment is always taken, whatever its date: a purchase a till dated before the member's
        enrolment counts in the balance as of its date, as it does in the liability report, so the
        member exists for that read too (its tier is the one it enrolled with).
        """
        state = await self.read(stream_id, min_position)
        if state.latest_occurred_at is None or state.latest_occurred_at <= at:
            return state
        pages = self.store.stream_pages(stream_id)
        return fold([fact_of(envelope) async for page in pages for envelope in page
                     if envelope.occurred_at <= at or envelope.type == "member_enrolled"])

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
        dry_run: bool = False,
    ) -> Outcome:
        """Run one command exactly once; ``fingerprint`` defaults to the command's request hash.

        A dry run (CONTRACT §6.5) decides exactly as the command would, on a state and rules just read,
        and answers what it would answer (``dry_run_outcome``), but appends nothing and stores nothing:
        no Idempotency-Key or natural id is recorded, no budget or cap counted.
        """
        fingerprint = fingerprint or request_hash(operation, stream_id, command)
        if idempotency_key is not None:
            stored = await self.store.stored_result(GLOBAL_SCOPE, f"idem:{idempotency_key}")
            if stored is not None:
                outcome = self._replay_or_reuse(stored, fingerprint, "idempotency_key_reused", 422)
                return dry_run_outcome(outcome) if dry_run else outcome
        if stream_id.startswith("$"):
            return _refusal_outcome(Refusal(422, "invalid_id", "a member id cannot start with $", field="member_id"))
        if dry_run:
            await self.refresh_rules()  # the budgets as the store would check them now
        else:
            await self._ensure_rules()
        async with self._locks.hold(stream_id):
            outcome = await self._decide_and_append(
                operation, stream_id, command, fingerprint, actor, idempotency_key, expected_version, dry_run
            )
        if dry_run:
            return dry_run_outcome(outcome)
        if idempotency_key is not None and outcome.status < 500 and outcome.position is None and not outcome.replayed:
            return await self._keep_answer(stream_id, idempotency_key, fingerprint, outcome)
        return outcome

    async def answer_once(
        self, stream_id: str, idempotency_key: str, fingerprint: str, answer: Callable[[], Awaitable[Outcome]]
    ) -> Outcome:
        """An answer no member command makes (a body refused before any decision, a time job's report),
        given once per Idempotency-Key (CONTRACT §4): the key's first answer when it has one, else
        ``answer()``'s, kept for the retries unless it is a 5xx."""
        stored = await self.store.stored_result(GLOBAL_SCOPE, f"idem:{idempotency_key}")
        if stored is not None:
            return self._replay_or_reuse(stored, fingerprint, "idempotency_key_reused", 422)
        outcome = await answer()
        if outcome.status >= 500:
            return outcome
        return await self._keep_answer(stream_id, idempotency_key, fingerprint, outcome)

    async def _keep_answer(self, stream_id: str, idempotency_key: str, fingerprint: str, outcome: Outcome) -> Outcome:
        """Store an answer that appended nothing under its Idempotency-Key, unless the key got its first answer
        meanwhile: then that one.

        A refusal is an answer too: the retry gets it again. It is stored
        through the append path (an append of no events), under the head lock
        where every answer is checked and stored, so a concurrent request with
        the same key either commits first (and this caller gets its answer) or
        finds this one.
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
        await self._ensure_rules()
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
                    programme, decided = self._decide(state, request.command)
                except (Refusal, DuplicateCommand):
                    break
                if not decided or _touches_other_streams(request.command, decided):
                    break  # run alone by ``execute``, which decides the other streams' part too
                appends.append(self._prepare_append(
                    stream_id, state, request.command, programme, decided, request.fingerprint, request.actor,
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
            self._note_grants(append)
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

    def _decide(self, state: MemberState, command: cmd.Command) -> tuple[Programme, list[Decided]]:
        """Decide by the programme version in force at the command's business time (CONTRACT §6.1)."""
        now = self.clock()
        programme = self.programme_at(command_time(command, now))
        return programme, decide(state, command, programme, now, self._campaign_context())

    async def _decide_and_append(
        self, operation, stream_id, command, fingerprint, actor, idempotency_key, expected_version, dry_run=False,
    ) -> Outcome:
        rules_read = dry_run  # a dry run has just read them
        for attempt in range(MAX_CONFLICT_RETRIES):
            # First try: decide on the cached state without reading the log.
            # An append is safe on it, since the store checks its version under
            # the head lock (a stale cache is a conflict: reload, decide again);
            # anything else (a refusal, a replay, 412, nothing to append) is
            # answered only from a state just read, so another process's
            # appends can never show through as a wrong refusal.
            state = self._cached(stream_id) if attempt == 0 and not dry_run else None
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
                programme, decided = self._decide(state, command)
            except Refusal as refusal:
                if not checked:
                    continue
                if not rules_read:  # nor may stale rules show through as a refusal
                    rules_read = True
                    if await self.refresh_rules():
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
            # Other members' streams this command appends to stay locked until it has committed.
            async with contextlib.AsyncExitStack() as held:
                try:
                    together, answer_extra = await self._other_streams(
                        stream_id, state, command, programme, decided, actor, idempotency_key, held
                    )
                except Refusal as refusal:
                    if not checked:
                        continue
                    return _refusal_outcome(refusal)
                if dry_run:
                    return await self._dry_run(stream_id, state, command, programme, decided, fingerprint, answer_extra)
                try:
                    append = self._prepare_append(
                        stream_id, state, command, programme, decided, fingerprint, actor, idempotency_key, together,
                        answer_extra,
                    )
                    recorded = await self.store.append(append)
                except WrongExpectedVersion as conflict:
                    self.forget(stream_id)
                    self.forget(conflict.stream_id)  # a referrer's cached state, when it was that stream
                    continue
                except RulesChanged:
                    self.forget(stream_id)  # the in-place evolve has run
                    rules_read = True
                    await self.refresh_rules()
                    continue
                except IdentityTaken as taken:
                    self.forget(stream_id)
                    return _refusal_outcome(_identity_taken(taken.identity_type, taken.value))
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
                self._note_grants(append)
                self._remember(stream_id, state)  # it grew: count its new events against the cache's bound
                for part in together:
                    self._advance_cached(part)
                try:  # the state now includes the events just appended
                    await self._maybe_snapshot(stream_id, state)
                except Exception:  # a snapshot is only a cache; the command has succeeded
                    log.warning("snapshot of %s not written; the next cold load folds further", stream_id, exc_info=True)
                return Outcome(status, body, position=_highest_position(append.recorded, append.together))
        return _refusal_outcome(Refusal(503, "contention", "the member is being changed by many writers; retry"))

    async def _other_streams(
        self, stream_id: str, state: MemberState, command: cmd.Command, programme: Programme, decided: list[Decided],
        actor: str | None, idempotency_key: str | None, held: contextlib.AsyncExitStack,
    ) -> tuple[list[Append], dict]:
        """What a command needs of other members (CONTRACT §6.4), and what that adds to its answer.

        An enrolment's referrer must exist (422 ``referrer_not_found``). A
        referee's qualifying first purchase rewards the referrer: decided on
        the referrer's state as read now, appended with the purchase at the
        version that state had, so two referees' rewards racing from two
        processes cannot both pass the referrer's monthly cap. A capped
        referrer gets nothing appended: only more rewards can land meanwhile,
        so a cap reached stays reached.
        """
        if isinstance(command, cmd.Enrol) and command.referred_by is not None:
            if not (await self.load(command.referred_by)).enrolled:
                raise Refusal(422, "referrer_not_found", f"member {command.referred_by} does not exist", field="referred_by")
            return [], {}
        coupon = referrals.referee_coupon(d.event for d in decided)
        if coupon is None or state.referred_by is None:
            return [], {}
        referrer_id = state.referred_by
        # Held until the purchase commits (``held``), so this process's commands on the referrer wait rather
        # than conflict. Referee, then referrer: a referrer enrolled first, so locks are never taken in a cycle.
        await held.enter_async_context(self._locks.hold(referrer_id))
        # The cached state, like a member's own: a stale one only misses rewards (they accumulate), so it
        # never says "capped" wrongly, and a reward decided on it fails its version check and is decided again.
        referrer = self._cached(referrer_id) or await self._load_locked(referrer_id)
        at = decided[0].occurred_at
        reward = referrals.referrer_reward(referrer, stream_id, at, programme)
        version = referrer.version
        referral = ReferralAnswer(
            referrer_id=referrer_id, referrer_points=reward.points if reward else 0, coupon_id=coupon.coupon_id
        )
        if reward is None:
            return [], {"referral": referral}
        together = Append(
            stream_id=referrer_id, expected_version=version, events=[NewEvent(at, reward)], command_id=idempotency_key,
            actor=actor, programme_version=programme.version,
        )
        return [together], {"referral": referral}

    def _advance_cached(self, part: Append) -> None:
        """After a commit, with the other stream still locked: its cached state gets the events appended to
        it, if it is the state they were decided on; else it is dropped (read again when needed)."""
        cached = self._states.get(part.stream_id)
        if cached is None or cached.version != part.expected_version:
            self.forget(part.stream_id)
            return
        for offset, new in enumerate(part.events, start=1):
            evolve(cached, Fact(new.event, new.occurred_at, part.expected_version + offset))
        self._remember(part.stream_id, cached)

    def _prepare_append(
        self, stream_id: str, state: MemberState, command: cmd.Command, programme: Programme, decided: list[Decided],
        fingerprint: str, actor: str | None, idempotency_key: str | None, together: Sequence[Append] = (),
        answer_extra: dict | None = None,
    ) -> Append:
        """The append of a decided command; evolves ``state`` with its events and builds its answer.

        In place and before the commit: the caller holds the member's lock, and
        forgets the cached state if the append fails. ``together``: other
        streams' events that commit with it (their states are not evolved here).
        """
        expected_version = state.version
        for offset, new in enumerate(decided, start=1):
            evolve(state, Fact(new.event, new.occurred_at, expected_version + offset))
        body = msgspec.structs.replace(answer(command, state, decided, programme), **(answer_extra or {}))
        keys = [ResultKey(stream_id, natural_key, fingerprint) for natural_key in _natural_keys(command)]
        if idempotency_key is not None:
            keys.append(ResultKey(GLOBAL_SCOPE, f"idem:{idempotency_key}", fingerprint))
        append = Append(
            stream_id=stream_id,
            expected_version=expected_version,
            events=[NewEvent(d.occurred_at, d.event) for d in decided],
            command_id=idempotency_key,
            actor=actor,
            programme_version=programme.version,
            identities=[(i.type, i.value) for i in command.identities] if isinstance(command, cmd.Enrol) else (),
            result_keys=keys,
            rules=self.rules.seen(),
            grants=grants_in((d.event for d in decided), self.rules.campaigns),
            # The answer's position is the highest the command appended, its stream_version the member's own.
            # Not a closure over ``append``: that would be a reference cycle, and every batch line's append,
            # events and answer would then wait for the cyclic collector (bench/README.md).
            respond=lambda recorded: (
                201, with_position(body, _highest_position(recorded, together), recorded[-1].stream_version)
            ),
            together=together,
        )
        return append

    async def _dry_run(
        self, stream_id: str, state: MemberState, command: cmd.Command, programme: Programme,
        decided: list[Decided], fingerprint: str, answer_extra: dict,
    ) -> Outcome:
        """What the decided command would answer, built as its append would build it, then dropped:
        the state it evolved is forgotten (the next command reads the member again). An identity another
        member holds refuses it as the store would."""
        try:
            if isinstance(command, cmd.Enrol):
                for identity in command.identities:
                    owner = await self.store.identity_owner(identity.type, identity.value)
                    if owner is not None and owner != stream_id:
                        return _refusal_outcome(_identity_taken(identity.type, identity.value))
            append = self._prepare_append(
                stream_id, state, command, programme, decided, fingerprint, None, None, (), answer_extra
            )
            assert append.respond is not None
            return Outcome(*append.respond([_Unsealed(None, state.version)]))
        finally:
            self.forget(stream_id)

    async def _natural_replay(self, stream_id: str, natural_key: str, fingerprint: str) -> Outcome:
        stored = await self.store.stored_result(stream_id, natural_key)
        if stored is None:
            return _refusal_outcome(Refusal(409, "duplicate_id", f"{natural_key} was already used on this member"))
        return self._replay_or_reuse(stored, fingerprint, "duplicate_id", 409)


class _Unsealed(NamedTuple):
    """Where a dry run's last event would land: at no position; the member's version it would reach."""

    position: None
    stream_version: int


def dry_run_outcome(outcome: Outcome) -> Outcome:
    """A dry run's answer: the command's own, and when it is a success, with ``"dry_run": true`` and
    ``position`` null (CONTRACT §6.5). Refusals are the command's exactly."""
    if outcome.status >= 300:
        return outcome
    body = msgspec.json.decode(outcome.body)
    body.update(position=None, dry_run=True)
    return dataclasses.replace(outcome, body=encode_json(body), position=None)


def _identity_taken(identity_type: str, value: str) -> Refusal:
    return Refusal(409, "identity_taken", f"{identity_type} {value} belongs to another member")


class KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self, on_idle: Callable[[str], None] = lambda key: None) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._on_idle = on_idle  # told when nobody holds or waits for a key any more

    def busy(self, key: str) -> bool:
        return key in self._locks

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
                self._on_idle(key)
            else:
                self._locks[key] = (lock, users - 1)


def _highest_position(recorded: Sequence, together: Sequence[Append]) -> int | None:
    """The highest position of an append's ``recorded`` events and of its ``together`` parts' (sealed after it);
    None for one never sealed (a dry run's)."""
    positions = [events[-1].position for events in (recorded, *(part.recorded for part in together)) if events]
    return max((position for position in positions if position is not None), default=None)


def _touches_other_streams(command: cmd.Command, decided: list[Decided]) -> bool:
    """An enrolment naming a referrer, or a referee's purchase that rewards one."""
    if isinstance(command, cmd.Enrol):
        return command.referred_by is not None
    return referrals.referee_coupon(d.event for d in decided) is not None


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

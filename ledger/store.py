"""The event store on PostgreSQL: append with expected versions, read, tail, verify.

Appends lock the single ``event_head`` row for the length of their
transaction (see schema.sql): positions are gap-free, commit in order, and the
hash chain extends one event at a time. ``append_many`` puts several
commands' appends into one transaction (group commit), each under its own
savepoint so that one refusal does not fail the others.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, AsyncIterator, Callable, NamedTuple, Sequence

import asyncpg
import msgspec

from events.catalogue import Event, event_type
from events.codec import GENESIS_HASH, canonical_bytes, chain_hash, encode_json, to_data
from events.envelope import Envelope
from events.upcasting import current_version
from ledger.campaigns import CAMPAIGNS_STREAM, Grant, Spend, add_spend, grant_holds
from ledger.clock import Clock, system_clock
from ledger.programme import PROGRAMME_STREAM

log = logging.getLogger("loyalty.store")

NOTIFY_CHANNEL = "loyalty_events"
GROUP_BATCH_MAX = 500  # commands in one group-commit transaction
GROUP_QUEUE_MAX = 10_000  # commands waiting for one; submitters wait beyond it
# Bump when MemberState's shape changes: older snapshots are then ignored.
SNAPSHOT_FORMAT = 6
MAX_READ_LIMIT = 10_000
POSITION_UNBOUNDED = 2**62
MAX_WAIT_MS = 30_000
# The statements of an append transaction, which holds the head lock every
# writer waits for: a few milliseconds each, so 5 s is far, and shorter than a
# request's deadline (10 s), so the others' appends still answer in time.
APPEND_STATEMENT_TIMEOUT_MS = 5_000
IMPORT_STATEMENT_TIMEOUT_MS = 30_000  # an import's COPY of 20,000 events
# A session holding the head lock while its backend has waited this long for
# its own client, with a writer waiting for the lock, is cut by that writer's
# process: a client frozen mid-COPY is beyond the server's own timeouts.
STALLED_HOLDER_S = 5.0
PRUNE_BATCH_MAX = 1000  # answers deleted per transaction: pruning never holds many row locks for long


class WrongExpectedVersion(Exception):
    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(f"stream {stream_id} is at version {actual}, not {expected}")
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class IdentityTaken(Exception):
    def __init__(self, identity_type: str, value: str, owner: str) -> None:
        super().__init__(f"{identity_type} {value} belongs to another member")
        self.identity_type = identity_type
        self.value = value
        self.owner = owner


class RulesChanged(Exception):
    """The programme or the campaigns changed, or a campaign's budget moved, since the decision."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} changed since the command was decided")
        self.what = what


class RulesSeen(NamedTuple):
    """The versions of the $programme and $campaigns streams a decision saw (checked on append)."""

    programme_version: int
    campaigns_version: int



class NewEvent(NamedTuple):
    occurred_at: datetime
    event: Event


class AlreadyAnswered(Exception):
    """A command key (idempotency key or natural id) got its answer meanwhile."""

    def __init__(self, stream_id: str, command_key: str) -> None:
        super().__init__(f"{command_key} was answered already")
        self.stream_id = stream_id
        self.command_key = command_key


class StoredResult(NamedTuple):
    """A command's first answer, kept so a retry gets it again."""

    stream_id: str
    command_key: str
    request_hash: str
    status: int
    body: bytes
    created_at: datetime


class HeadMoved(Exception):
    """The log's head is not the one sealed events were meant to follow."""

    def __init__(self, position: int, hash_: str) -> None:
        super().__init__(f"the log's head is at {position}")
        self.position = position
        self.hash = hash_


class _Prepared(NamedTuple):
    """An event's part of an envelope that needs no head: computed before the head lock."""

    occurred_at: datetime
    type: str
    schema_version: int
    data: Any


def _prepare(new: NewEvent) -> _Prepared:
    name = event_type(new.event)
    return _Prepared(new.occurred_at, name, current_version(name), to_data(new.event))


class ResultKey(NamedTuple):
    stream_id: str
    command_key: str
    request_hash: str


Respond = Callable[[list[Envelope]], tuple[int, bytes]]


@dataclass
class Append:
    """One command's events for one stream, and what must commit with them.

    ``respond`` turns the sealed events into the command's answer, stored
    under every ``result_keys`` entry in the same transaction.
    """

    stream_id: str
    expected_version: int | None  # None: any version
    events: Sequence[NewEvent]
    command_id: str | None = None
    actor: str | None = None
    programme_version: int | None = None
    identities: Sequence[tuple[str, str]] = ()
    result_keys: Sequence[ResultKey] = ()
    respond: Respond | None = None
    # A member's command: the rules its decision saw, and the campaign rewards it grants.
    rules: RulesSeen | None = None
    grants: Sequence[Grant] = ()
    # Other streams' events that commit with this command's or not at all (a referral's
    # referrer, CONTRACT §6.4), each checked at its own expected version.
    together: Sequence[Append] = ()
    # Filled in by the store:
    recorded: list[Envelope] = field(default_factory=list)
    answer: tuple[int, bytes] = (201, b"{}")
    results: list[StoredResult] = field(default_factory=list)


# What ``append_many`` reports for one command while the others commit.
_APPEND_REFUSALS = (WrongExpectedVersion, IdentityTaken, AlreadyAnswered, RulesChanged)
# Failures of the connection or the server, not of one command: retrying each
# command alone would only fail each again (and after a cut connection whether
# the COMMIT landed is unknown).
_NOT_ONE_COMMANDS_FAULT = (
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.exceptions.OperatorInterventionError,  # class 57: shutdown, cancelled
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: disk full, too many connections
    asyncpg.InterfaceError,  # the client side of a cut connection
    asyncpg.exceptions.InternalClientError,  # a connection left mid-operation by a cut
    OSError,
    asyncio.TimeoutError,
)


def is_one_commands_fault(failure: Exception) -> bool:
    """Whether a failed append may be retried alone: anything but a failure of the connection or the server.

    asyncpg's own DataError (an argument it cannot encode) is an
    InterfaceError, but the value at fault is one command's.
    """
    return isinstance(failure, asyncpg.exceptions._base.DataError) or not isinstance(failure, _NOT_ONE_COMMANDS_FAULT)


_LOCK_HEAD_SQL = "SELECT position, hash, set_config('statement_timeout', $1, true) FROM event_head FOR UPDATE"


class VerifyReport(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    ok: bool
    checked: int
    head_position: int
    head_hash: str
    first_bad_position: int | None


_ENVELOPE_COLUMNS = (
    "position, stream_id, stream_version, type, schema_version, occurred_at, recorded_at,"
    " command_id, actor, programme_version, data::text AS data, hash"
)

# The snapshot (if any) and the events after it; see EventStore.load_stream.
_LOAD_STREAM_SQL = f"""
    SELECT CASE WHEN e.position IS NULL OR e.stream_version = coalesce(s.stream_version, 0) + 1
                THEN s.state END AS snapshot, e.*
    FROM (SELECT) AS one
    LEFT JOIN member_snapshots s ON s.stream_id = $1 AND s.format = $2
    LEFT JOIN LATERAL (
        SELECT {_ENVELOPE_COLUMNS} FROM events
        WHERE stream_id = $1 AND stream_version > coalesce(s.stream_version, 0)
        ORDER BY stream_version LIMIT $3
    ) AS e ON true
    ORDER BY e.stream_version"""

_EVENT_COLUMNS = (
    "position", "stream_id", "stream_version", "type", "schema_version", "occurred_at",
    "recorded_at", "command_id", "actor", "programme_version", "data", "hash",
)


def envelope_from_row(row: asyncpg.Record) -> Envelope:
    return Envelope(
        position=row["position"],
        stream_id=row["stream_id"],
        stream_version=row["stream_version"],
        type=row["type"],
        schema_version=row["schema_version"],
        occurred_at=row["occurred_at"],
        recorded_at=row["recorded_at"],
        command_id=row["command_id"],
        actor=row["actor"],
        programme_version=row["programme_version"],
        data=msgspec.json.decode(row["data"]),
        hash=row["hash"].strip(),
    )


async def read_envelopes(conn_or_pool: asyncpg.Connection | asyncpg.Pool, after_position: int, limit: int) -> list[Envelope]:
    """The log after a position, in position order, as the feed serves it (the publisher reads this way too)."""
    rows = await conn_or_pool.fetch(
        f"SELECT {_ENVELOPE_COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT $2", after_position, limit
    )
    return [envelope_from_row(r) for r in rows]


async def insert_events(conn: asyncpg.Connection, rows: list[Envelope]) -> None:
    """Insert sealed envelopes with one binary COPY (appends and imports alike), and count what
    they grant for campaigns (``campaign_spend``).

    COPY, not INSERT ... SELECT FROM unnest(arrays): asyncpg checks every
    array element for being a nested array (an ABC isinstance each), which
    cost more than the rest of the insert (bench/README.md).
    """
    await _count_campaign_spend(conn, rows)
    await conn.copy_records_to_table(
        "events",
        columns=_EVENT_COLUMNS,
        records=[
            (r.position, r.stream_id, r.stream_version, r.type, r.schema_version, r.occurred_at, r.recorded_at,
             r.command_id, r.actor, r.programme_version, encode_json(r.data).decode(), r.hash)
            for r in rows
        ],
    )


def campaign_rewards_of(rows: Sequence[Envelope]) -> tuple[dict[str, Spend], set[tuple[str, str]]]:
    """What these events grant, per campaign (points, coupons), and the (campaign, member) pairs rewarded."""
    spend: dict[str, Spend] = {}
    rewarded: set[tuple[str, str]] = set()
    for row in rows:
        if row.type not in ("points_earned", "coupon_issued"):
            continue
        campaign_id = row.data.get("campaign_id")
        if campaign_id is not None:
            points, coupons = (row.data["points"], 0) if row.type == "points_earned" else (0, 1)
            before = spend.get(campaign_id, Spend())
            spend[campaign_id] = Spend(before.points + points, before.coupons + coupons)
            rewarded.add((campaign_id, row.stream_id))
    return spend, rewarded


async def _count_campaign_spend(conn: asyncpg.Connection, rows: Sequence[Envelope]) -> None:
    """Add the rows' grants to ``campaign_spend``, counting a member once per campaign (``campaign_spend_members``)."""
    spend, rewarded = campaign_rewards_of(rows)
    if not spend:
        return
    campaign_ids = sorted(spend)
    pairs = sorted(rewarded)
    await conn.execute(
        """WITH added AS (
               INSERT INTO campaign_spend_members (campaign_id, stream_id) SELECT * FROM unnest($4::text[], $5::text[])
               ON CONFLICT DO NOTHING RETURNING campaign_id),
           counted AS (SELECT campaign_id, count(*) AS members FROM added GROUP BY campaign_id)
           INSERT INTO campaign_spend AS s (campaign_id, points, coupons, members)
           SELECT g.campaign_id, g.points, g.coupons, coalesce(counted.members, 0)
           FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS g(campaign_id, points, coupons)
           LEFT JOIN counted USING (campaign_id)
           ON CONFLICT (campaign_id) DO UPDATE SET points = s.points + excluded.points,
               coupons = s.coupons + excluded.coupons, members = s.members + excluded.members""",
        campaign_ids, [spend[c].points for c in campaign_ids], [spend[c].coupons for c in campaign_ids],
        [c for c, _ in pairs], [m for _, m in pairs],
    )


def envelope_hash(envelope: Envelope, previous_hash: str) -> str:
    return chain_hash(
        previous_hash,
        canonical_bytes(
            position=envelope.position,
            stream_id=envelope.stream_id,
            stream_version=envelope.stream_version,
            type=envelope.type,
            schema_version=envelope.schema_version,
            occurred_at=envelope.occurred_at,
            recorded_at=envelope.recorded_at,
            command_id=envelope.command_id,
            actor=envelope.actor,
            programme_version=envelope.programme_version,
            data=envelope.data,
        ),
    )


class EventStore:
    def __init__(self, pool: asyncpg.Pool, clock: Clock = system_clock) -> None:
        self.pool = pool
        self.clock = clock
        self._listener: asyncpg.Connection | None = None
        self._connect: Callable[[], Any] | None = None
        self._relisten: asyncio.Task | None = None
        self._head_seen = 0
        self._head_changed = asyncio.Condition()
        self.head_listeners: list[Callable[[int], None]] = []  # told each position a notification names
        self.appended_events = 0  # by this process (loyalty_events_appended_total)
        self._group: GroupCommit | None = None

    # -- appending -----------------------------------------------------------

    async def append(self, append: Append) -> list[Envelope]:
        """Append one command's events atomically; raises on a version conflict.

        With group commit started, the append joins the next transaction.
        """
        [outcome] = await self.append_series([append])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def append_series(self, appends: Sequence[Append]) -> list[list[Envelope] | Exception]:
        """Appends in this order, each free to expect the version its predecessor leaves; one outcome each.

        Handed over together, without waiting for each other's commit: with
        group commit they join the queue in order, else one transaction.
        """
        if self._group is not None:
            return await self._group.submit_many(appends)
        return await self.append_many(appends)

    def start_group_commit(self, batch_max: int = GROUP_BATCH_MAX, queue_max: int = GROUP_QUEUE_MAX) -> None:
        self._group = GroupCommit(self, batch_max, queue_max)

    async def stop_group_commit(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            await group.close()

    async def append_many(self, appends: Sequence[Append]) -> list[list[Envelope] | Exception]:
        """Group commit: many commands in one transaction, one outcome each.

        A command that fails its expected version, finds its key answered
        (before or earlier in the batch) or an identity taken is reported and
        leaves nothing behind (identity links are undone by a savepoint); the
        others commit. An append with no events stores its answer only (a
        refusal kept for its Idempotency-Key): under the head lock like every
        answer, so one key has one first answer.

        The head lock serializes every writer of every process, so what can
        run before taking it does (the events' data, their types); what runs
        under it needs the head (positions, hashes) or must not race (keys,
        versions, identities).
        """
        prepared = {id(part): [_prepare(new) for new in part.events] for a in appends for part in (a, *a.together)}
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                head_position, head_hash = await self._lock_head(conn)
                outcomes: list[list[Envelope] | Exception] = []
                rows: list[Envelope] = []
                # Two set-based reads for the whole batch (not two per command):
                # the round trips under the head lock are what limit throughput.
                answered = await self._answered_keys(conn, appends)
                versions = await self._stream_versions(conn, appends)
                spend = await self._campaign_spend(conn, appends)
                for append in appends:
                    parts = (append, *append.together)  # all or nothing
                    for part in parts:
                        part.recorded, part.results = [], []  # an append retried alone (GroupCommit) starts afresh
                    try:
                        for part in parts:
                            self._check_and_reserve(part, answered, versions)
                        _check_rules(append, versions, spend)
                        if append.identities:
                            async with conn.transaction():  # a savepoint: a taken identity undoes this command's links only
                                await self._link_identities(conn, append)
                        answered.update((k.stream_id, k.command_key) for part in parts for k in part.result_keys)
                    except _APPEND_REFUSALS as refusal:
                        outcomes.append(refusal)
                        continue
                    for part in parts:
                        recorded = self._seal(part, prepared[id(part)], head_position, head_hash, versions)
                        if recorded:
                            head_position, head_hash = recorded[-1].position, recorded[-1].hash
                        rows.extend(recorded)
                    self._answer(append)
                    outcomes.append(append.recorded)
                if rows:
                    await self._extend_log(conn, rows)
                await self._store_results(conn, [r for a in appends for r in a.results])
        self.appended_events += len(rows)
        return outcomes

    async def append_sealed(self, rows: list[Envelope], after: tuple[int, str]) -> None:
        """Append events sealed elsewhere (an import of an export) right after the head ``after``.

        The caller checked their chain; they go in through the same tail as
        every append (``_extend_log``), with the identities their
        ``identity_linked`` events link. Raises ``HeadMoved`` if the head is
        no longer ``after``.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            head = await self._lock_head(conn, IMPORT_STATEMENT_TIMEOUT_MS)
            if head != after:
                raise HeadMoved(*head)
            await conn.executemany(
                """INSERT INTO identities (identity_type, value, stream_id) VALUES ($1, $2, $3)
                   ON CONFLICT (identity_type, value) DO NOTHING""",
                [(e.data["identity_type"], e.data["value"], e.stream_id) for e in rows if e.type == "identity_linked"],
            )
            await self._extend_log(conn, rows)

    async def _extend_log(self, conn: asyncpg.Connection, rows: list[Envelope]) -> None:
        """The one way events enter the log: insert them, move the head to the last, tell the listeners.

        The caller holds the head lock and sealed ``rows`` on the head it read.
        """
        await insert_events(conn, rows)
        last = rows[-1]
        # One statement, one round trip under the head lock.
        await conn.execute(
            "WITH moved AS (UPDATE event_head SET position = $1, hash = $2) SELECT pg_notify($3, $4)",
            last.position, last.hash, NOTIFY_CHANNEL, str(last.position),
        )

    async def cut_stalled_lock_holders(self, stalled_s: float = STALLED_HOLDER_S) -> list[int]:
        """End the sessions that block a head-lock waiter while they wait for their own client; their pids.

        The pool's idle_in_transaction_session_timeout and the appends'
        statement timeout bound a holder whose client stops between
        statements or while the server works; one stopped while the server
        waits for COPY data from it is reached by neither (PostgreSQL does not
        cancel a statement blocked reading from its client), so every process
        looks for one now and then. Only a holder that blocks our lock
        statement and has waited for its client for ``stalled_s`` is cut: its
        transaction rolls back, as if its connection had been lost.
        """
        rows = await self.pool.fetch(
            """SELECT holder.pid, pg_terminate_backend(holder.pid) AS cut
               FROM pg_stat_activity holder
               WHERE holder.wait_event_type = 'Client' AND holder.state <> 'idle'
                 AND holder.state_change < now() - make_interval(secs => $1)
                 AND holder.pid IN (
                     SELECT unnest(pg_blocking_pids(waiter.pid)) FROM pg_stat_activity waiter
                     WHERE waiter.datname = current_database() AND waiter.wait_event_type = 'Lock'
                       AND waiter.query LIKE $2)""",
            stalled_s, _LOCK_HEAD_SQL.split(",")[0] + "%",
        )
        cut = [row["pid"] for row in rows if row["cut"]]
        if cut:
            log.warning("ended %d session(s) holding the head lock while stalled on their client: %s", len(cut), cut)
        return cut

    async def _lock_head(self, conn: asyncpg.Connection, statement_timeout_ms: int = APPEND_STATEMENT_TIMEOUT_MS) -> tuple[int, str]:
        """Lock the head row for this transaction; its later statements are bounded by ``statement_timeout_ms``.

        Every writer waits for the holder, so the holder's every step is
        bounded: a client that stops between statements is cut by the pool's
        idle_in_transaction_session_timeout (ledger/database.py), one that
        stops mid-statement (a COPY waiting for its rows) by this timeout,
        set in the same round trip and reset at the transaction's end.
        """
        row = await conn.fetchrow(_LOCK_HEAD_SQL, str(statement_timeout_ms))
        return row["position"], row["hash"].strip()

    async def _answered_keys(self, conn: asyncpg.Connection, appends: Sequence[Append]) -> set[tuple[str, str]]:
        """The batch's result keys that already have an answer stored."""
        keys = [key for append in appends for key in append.result_keys]
        if not keys:
            return set()
        # A scalar subquery per key, not IN/EXISTS: the planner cannot turn it
        # into a hash join over the whole (large) table; each key is one
        # primary-key lookup.
        rows = await conn.fetch(
            """SELECT k.stream_id, k.command_key FROM unnest($1::text[], $2::text[]) AS k(stream_id, command_key)
               WHERE (SELECT true FROM command_results r
                      WHERE r.stream_id = k.stream_id AND r.command_key = k.command_key)""",
            [key.stream_id for key in keys],
            [key.command_key for key in keys],
        )
        return {(row["stream_id"], row["command_key"]) for row in rows}

    async def _stream_versions(self, conn: asyncpg.Connection, appends: Sequence[Append]) -> dict[str, int]:
        """Each of the batch's streams' current version (0 for a new stream); and the rules'
        streams' when a command of the batch was decided on them."""
        streams = {part.stream_id for append in appends for part in (append, *append.together)}
        if any(append.rules is not None for append in appends):
            streams |= {PROGRAMME_STREAM, CAMPAIGNS_STREAM}
        rows = await conn.fetch(
            """SELECT s.stream_id, coalesce((SELECT max(e.stream_version) FROM events e
                                             WHERE e.stream_id = s.stream_id), 0) AS version
               FROM unnest($1::text[]) AS s(stream_id)""",
            list(streams),
        )
        return {row["stream_id"]: row["version"] for row in rows}

    async def _campaign_spend(self, conn: asyncpg.Connection, appends: Sequence[Append]) -> dict[str, Spend]:
        """What the campaigns with a budget the batch grants from have spent, read under the head lock
        (a grant of a campaign without one holds whatever was spent: no round trip for it)."""
        campaign_ids = list({grant.campaign_id for append in appends for grant in append.grants if grant.budgeted})
        if not campaign_ids:
            return {}
        return await self.read_campaign_spend(conn, campaign_ids)

    async def read_campaign_spend(self, conn=None, campaign_ids: Sequence[str] | None = None) -> dict[str, Spend]:
        """Every campaign's spend so far (or these campaigns')."""
        rows = await (conn or self.pool).fetch(
            """SELECT campaign_id, points, coupons, members FROM campaign_spend
               WHERE $1::text[] IS NULL OR campaign_id = ANY($1::text[])""",
            campaign_ids,
        )
        return {row["campaign_id"]: Spend(row["points"], row["coupons"], row["members"]) for row in rows}

    def _check_and_reserve(self, append: Append, answered: set[tuple[str, str]], versions: dict[str, int]) -> None:
        # Every appender holds the head lock while ``answered`` and ``versions``
        # are read and used, so this check cannot race another process; keys
        # answered earlier in the same batch are in ``answered`` too.
        for key in append.result_keys:
            if (key.stream_id, key.command_key) in answered:
                raise AlreadyAnswered(key.stream_id, key.command_key)
        actual = versions[append.stream_id]
        if append.expected_version is not None and append.expected_version != actual:
            raise WrongExpectedVersion(append.stream_id, append.expected_version, actual)

    async def _link_identities(self, conn: asyncpg.Connection, append: Append) -> None:
        for identity_type, value in append.identities:
            owner = await conn.fetchval(
                """INSERT INTO identities (identity_type, value, stream_id) VALUES ($1, $2, $3)
                   ON CONFLICT (identity_type, value) DO UPDATE SET stream_id = identities.stream_id
                   RETURNING stream_id""",
                identity_type,
                value,
                append.stream_id,
            )
            if owner != append.stream_id:
                raise IdentityTaken(identity_type, value, owner)

    def _seal(self, append: Append, events: list[_Prepared], position: int, previous_hash: str,
              versions: dict[str, int]) -> list[Envelope]:
        """Give the command's events positions, versions and hashes."""
        recorded_at = self.clock()
        version = versions[append.stream_id]
        for new in events:
            position += 1
            version += 1
            unsealed = Envelope(
                position=position,
                stream_id=append.stream_id,
                stream_version=version,
                type=new.type,
                schema_version=new.schema_version,
                occurred_at=new.occurred_at,
                recorded_at=recorded_at,
                command_id=append.command_id,
                actor=append.actor,
                programme_version=append.programme_version,
                data=new.data,
                hash="",
            )
            previous_hash = envelope_hash(unsealed, previous_hash)
            append.recorded.append(msgspec.structs.replace(unsealed, hash=previous_hash))
        versions[append.stream_id] = version
        return append.recorded

    def _answer(self, append: Append) -> None:
        if append.respond is None:
            return
        status, body = append.answer = append.respond(append.recorded)
        recorded_at = self.clock()
        append.results = [
            StoredResult(key.stream_id, key.command_key, key.request_hash, status, body, recorded_at)
            for key in append.result_keys
        ]

    async def _store_results(self, conn: asyncpg.Connection, results: list[StoredResult]) -> None:
        # No ON CONFLICT: every writer of answers holds the head lock and checked
        # the keys under it, so a duplicate is a bug, and it fails loudly (COPY
        # checks the primary key as INSERT does). COPY, not an INSERT per answer:
        # a batch stores thousands, and each INSERT is a statement PostgreSQL binds
        # and executes on its own (bench/README.md).
        if results:
            await conn.copy_records_to_table("command_results", columns=StoredResult._fields, records=results)

    async def prune_answers(self, scope: str, older_than: datetime, batch_max: int = PRUNE_BATCH_MAX) -> int:
        """Delete the answers stored under ``scope`` before ``older_than``, a bounded batch per transaction.

        It takes no head lock: appends never wait for it (a pruned key is
        checked under the lock like a key never seen). Returns how many went.
        """
        pruned = 0
        while True:
            deleted = await self.pool.fetchval(
                """WITH gone AS (
                       DELETE FROM command_results WHERE ctid = ANY(ARRAY(
                           SELECT ctid FROM command_results WHERE stream_id = $1 AND created_at < $2 LIMIT $3))
                       RETURNING 1)
                   SELECT count(*) FROM gone""",
                scope, older_than, batch_max,
            )
            pruned += deleted
            if deleted < batch_max:
                if pruned:
                    log.info("forgot %d answers of %r stored before %s", pruned, scope, older_than)
                return pruned

    async def stored_result(self, stream_id: str, command_key: str) -> StoredResult | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM command_results WHERE stream_id = $1 AND command_key = $2", stream_id, command_key
        )
        if row is None:
            return None
        return StoredResult(row["stream_id"], row["command_key"], row["request_hash"].strip(), row["status"], row["body"],
                            row["created_at"])

    # -- reading -------------------------------------------------------------

    async def read_stream(self, stream_id: str, after_version: int = 0, limit: int = MAX_READ_LIMIT) -> list[Envelope]:
        rows = await self.pool.fetch(
            f"""SELECT {_ENVELOPE_COLUMNS} FROM events WHERE stream_id = $1 AND stream_version > $2::bigint
                ORDER BY stream_version LIMIT $3""",
            stream_id,
            after_version,
            min(limit, MAX_READ_LIMIT),
        )
        return [envelope_from_row(r) for r in rows]

    async def stream_pages(self, stream_id: str, after_version: int = 0) -> AsyncIterator[list[Envelope]]:
        """The stream after ``after_version``, oldest first, a page (``read_stream``'s) at a time."""
        while True:
            page = await self.read_stream(stream_id, after_version)
            if page:
                yield page
            if len(page) < MAX_READ_LIMIT:
                return
            after_version = page[-1].stream_version

    async def read_all(
        self, after_position: int = 0, limit: int = 1000, types: Sequence[str] | None = None,
        until: int | None = None,
    ) -> list[Envelope]:
        """Events after a position in log order, of some types only if given, at or below ``until`` if given."""
        limit = min(limit, MAX_READ_LIMIT)
        if types:
            rows = await self.pool.fetch(
                f"""SELECT {_ENVELOPE_COLUMNS} FROM events WHERE position > $1 AND position <= $4
                    AND type = ANY($3::text[]) ORDER BY position LIMIT $2""",
                after_position,
                limit,
                list(types),
                until if until is not None else POSITION_UNBOUNDED,
            )
        else:
            return await read_envelopes(self.pool, after_position, limit)
        return [envelope_from_row(r) for r in rows]

    async def count_of_type(self, event_type: str) -> int:
        """How many events of a type the log holds (an index-only scan of events_type_position)."""
        return await self.pool.fetchval("SELECT count(*) FROM events WHERE type = $1", event_type)

    async def stream_versions_after(self, after_position: int, limit: int) -> list[tuple[int, str, int]]:
        """``(position, stream_id, stream_version)`` of the events after ``after_position``, in log order."""
        rows = await self.pool.fetch(
            "SELECT position, stream_id, stream_version FROM events WHERE position > $1 ORDER BY position LIMIT $2",
            after_position,
            limit,
        )
        return [tuple(row) for row in rows]

    async def head(self) -> tuple[int, str]:
        row = await self.pool.fetchrow("SELECT position, hash FROM event_head")
        return row["position"], row["hash"].strip()

    async def stream_ids(self, after: str = "", limit: int = 1000) -> list[str]:
        """Members in id order (for jobs and replays), paged by id."""
        rows = await self.pool.fetch(
            """SELECT stream_id FROM events WHERE stream_version = 1 AND stream_id > $1
               AND stream_id NOT LIKE '$%' ORDER BY stream_id LIMIT $2""",
            after,
            limit,
        )
        return [r["stream_id"] for r in rows]

    async def identity_owner(self, identity_type: str, value: str) -> str | None:
        return await self.pool.fetchval(
            "SELECT stream_id FROM identities WHERE identity_type = $1 AND value = $2", identity_type, value
        )

    # -- snapshots -------------------------------------------------------------

    async def load_stream(self, stream_id: str, state_type: type) -> tuple[Any | None, list[Envelope]]:
        """A stream's latest snapshot (None: there is none, or it is unreadable: it is only a cache) and the
        events after it (a first page of ``MAX_READ_LIMIT``), in one query.

        Most commands find their member outside the cache (a programme of
        millions, a cache of thousands), so this is their load: one round
        trip and one pool checkout instead of two each, 255 -> 150 µs of
        this process's CPU a load (measured over 4,000 members, 16 at once).
        The snapshot comes on the first row only, beside the event that
        follows it (versions have no gaps), or on the one row there is
        when no event follows it.
        """
        rows = await self.pool.fetch(_LOAD_STREAM_SQL, stream_id, SNAPSHOT_FORMAT, MAX_READ_LIMIT)
        envelopes = [envelope_from_row(row) for row in rows if row["position"] is not None]
        snapshot = rows[0]["snapshot"] if rows else None
        if snapshot is None:
            return None, envelopes
        try:
            return msgspec.msgpack.decode(snapshot, type=state_type), envelopes
        except msgspec.DecodeError:
            log.warning("snapshot of %s is unreadable; folding from the start", stream_id)
            return None, await self.read_stream(stream_id)

    async def save_snapshot(self, stream_id: str, stream_version: int, state: Any) -> None:
        await self.pool.execute(
            """INSERT INTO member_snapshots (stream_id, stream_version, format, state) VALUES ($1, $2, $3, $4)
               ON CONFLICT (stream_id) DO UPDATE SET stream_version = excluded.stream_version,
                   format = excluded.format, state = excluded.state
               WHERE member_snapshots.stream_version < excluded.stream_version""",
            stream_id,
            stream_version,
            SNAPSHOT_FORMAT,
            msgspec.msgpack.encode(state),
        )

    # -- tailing -------------------------------------------------------------

    async def start_listening(self, connect: Callable[[], Any]) -> None:
        """LISTEN for appends so that long polls wake at once.

        A lost listener (connection cut, database restarted) is replaced in the
        background; meanwhile long polls poll (tests/test_database_faults.py).
        """
        self._connect = connect
        await self._listen()

    async def _listen(self) -> None:
        listener = await self._connect()
        await listener.add_listener(NOTIFY_CHANNEL, self._on_notify)
        listener.add_termination_listener(self._on_listener_lost)
        self._listener = listener
        # Appends while no one listened sent notifications nobody heard.
        self._head_seen = max(self._head_seen, (await self.head())[0])

    def _on_listener_lost(self, _conn) -> None:
        self._listener = None
        if self._connect is not None and self._relisten is None:
            self._relisten = asyncio.get_running_loop().create_task(self._listen_again())

    async def _listen_again(self) -> None:
        try:
            while self._connect is not None and self._listener is None:
                try:
                    await asyncio.wait_for(self._listen(), 10)
                except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as failure:
                    log.warning("cannot LISTEN again (%s); retrying in 1 s", failure)
                    await asyncio.sleep(1)
            await self._wake()
        finally:
            self._relisten = None

    async def stop_listening(self) -> None:
        self._connect = None
        if self._relisten is not None:
            self._relisten.cancel()
        if self._listener is not None:
            listener, self._listener = self._listener, None
            await listener.close()

    def _on_notify(self, _conn, _pid, _channel, payload: str) -> None:
        position = int(payload)
        for listener in self.head_listeners:
            listener(position)
        if position > self._head_seen:
            self._head_seen = position
            asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        async with self._head_changed:
            self._head_changed.notify_all()

    async def wait_for_position(self, after_position: int, wait_ms: int) -> bool:
        """Wait (at most ``wait_ms``, capped at 30 s) until the head passes ``after_position``."""
        wait_s = min(max(wait_ms, 0), MAX_WAIT_MS) / 1000
        if self._head_seen > after_position:
            return True
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            head = (await self.head())[0] if self._listener is None else self._head_seen
            self._head_seen = max(self._head_seen, head)
            if self._head_seen > after_position:
                return True
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            async with self._head_changed:
                try:
                    # Without a listener, poll: a bounded wait either way.
                    timeout = remaining if self._listener is not None else min(remaining, 0.05)
                    await asyncio.wait_for(self._head_changed.wait(), timeout)
                except asyncio.TimeoutError:
                    pass

    # -- verification --------------------------------------------------------

    async def iter_all(self, after_position: int = 0, batch: int = 5000,
                       upto_position: int | None = None) -> AsyncIterator[list[Envelope]]:
        """The log after ``after_position`` (up to ``upto_position`` when given), a page at a time."""
        while True:
            envelopes = await self.read_all(after_position, batch)
            if upto_position is not None:
                envelopes = [e for e in envelopes if e.position <= upto_position]
            if not envelopes:
                return
            yield envelopes
            after_position = envelopes[-1].position

    async def verify(self, progress: Callable[[int], None] | None = None) -> VerifyReport:
        """Recompute the chain up to the head read first; the first changed, missing or reordered event is reported.

        The head is read before the events: on a live log, events appended
        while the check runs lie past it and are not judged (reading the head
        last made an append committing meanwhile look like a forged tail).
        Positions commit in order under the head lock, so every event up to
        the head read is already visible.
        """
        head_position, head_hash = await self.head()
        previous_hash, expected_position, checked = GENESIS_HASH, 1, 0
        first_bad: int | None = None
        async for envelopes in self.iter_all(upto_position=head_position):
            for envelope in envelopes:
                checked += 1
                if first_bad is None:
                    if envelope.position != expected_position:
                        first_bad = expected_position  # a gap: an event was removed
                    elif envelope_hash(envelope, previous_hash) != envelope.hash:
                        first_bad = envelope.position
                expected_position = envelope.position + 1
                previous_hash = envelope.hash
            if progress is not None:
                progress(len(envelopes))
        if first_bad is None and (head_position != expected_position - 1 or head_hash != previous_hash):
            first_bad = expected_position  # the log's tail was removed
        return VerifyReport(
            ok=first_bad is None,
            checked=checked,
            head_position=head_position,
            head_hash=head_hash,
            first_bad_position=first_bad,
        )


def _check_rules(append: Append, versions: dict[str, int], spend: dict[str, Spend]) -> None:
    """The rules the decision saw are still the rules, and each grant still fits its budget with
    what the campaign has spent now (this batch's earlier appends included); then reserve it."""
    if append.rules is not None:
        if append.rules.programme_version != versions[PROGRAMME_STREAM]:
            raise RulesChanged(PROGRAMME_STREAM)
        if append.rules.campaigns_version != versions[CAMPAIGNS_STREAM]:
            raise RulesChanged(CAMPAIGNS_STREAM)
    for grant in append.grants:
        if not grant_holds(grant, spend.get(grant.campaign_id, Spend())):
            raise RulesChanged(f"the budget of campaign {grant.campaign_id}")
    for grant in append.grants:
        spend[grant.campaign_id] = add_spend(spend.get(grant.campaign_id, Spend()), grant)


class _Submitted(NamedTuple):
    """Appends handed over together (a command, or a member's series), and the one future of their outcomes."""

    appends: Sequence[Append]
    outcomes: asyncio.Future


class GroupCommit:
    """Many concurrent commands' appends in one transaction.

    Appends serialize on the head lock anyway, so one writer task takes
    everything queued while the previous transaction ran (at most
    ``batch_max`` appends) and commits it at once: one fsync and one lock
    hand-over for many commands. It never waits for a batch to fill, so a
    lone command pays no extra latency. What is queued is a submission (a
    command, or up to ``batch_max`` of a member's series) with one future:
    a batch line costs no future and no queue hand-over of its own. The queue
    is bounded (``queue_max`` submissions): when full, submitters wait.
    """

    def __init__(self, store: EventStore, batch_max: int, queue_max: int) -> None:
        self.store = store
        self.batch_max = batch_max
        self.queue: asyncio.Queue[_Submitted] = asyncio.Queue(queue_max)
        self._carried: _Submitted | None = None  # taken from the queue, but it would have overfilled the last batch
        self.writer = asyncio.get_running_loop().create_task(self._write())

    async def submit_many(self, appends: Sequence[Append]) -> list[list[Envelope] | Exception]:
        """Queue ``appends`` in order; each one's outcome. Raises if none of them committed for a reason
        other than a refusal (a failed transaction); once one has committed, a failure is its own outcome."""
        submitted = []
        for first in range(0, len(appends), self.batch_max):
            submitted.append(_Submitted(appends[first:first + self.batch_max], asyncio.get_running_loop().create_future()))
            await self.queue.put(submitted[-1])
        results = await asyncio.gather(*(s.outcomes for s in submitted), return_exceptions=True)
        outcomes = [o for s, result in zip(submitted, results)
                    for o in (result if isinstance(result, list) else [result] * len(s.appends))]
        failures = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, _APPEND_REFUSALS)]
        committed = any(not isinstance(o, BaseException) for o in outcomes)
        if failures and (not committed or not all(isinstance(f, Exception) for f in failures)):
            raise failures[0]  # nothing of these committed (or this is a cancellation): the failure answers
        return outcomes  # some committed: each outcome answers its own append

    async def _next_batch(self) -> list[_Submitted]:
        """The submissions waiting now, in order, up to ``batch_max`` appends (at least one submission)."""
        batch = [self._carried or await self.queue.get()]
        self._carried = None
        appends_count = len(batch[0].appends)
        while not self.queue.empty():
            submitted = self.queue.get_nowait()
            if appends_count + len(submitted.appends) > self.batch_max:
                self._carried = submitted  # first in the next batch: the order holds
                break
            batch.append(submitted)
            appends_count += len(submitted.appends)
        return batch

    async def _write(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                outcomes = await self._append_batch([append for submitted in batch for append in submitted.appends])
            except BaseException as failure:  # the whole transaction failed: tell every submitter
                for submitted in batch:
                    if not submitted.outcomes.done():
                        submitted.outcomes.set_exception(
                            failure if isinstance(failure, Exception) else asyncio.CancelledError())
                if isinstance(failure, asyncio.CancelledError):
                    raise
                continue
            first = 0
            for submitted in batch:
                if not submitted.outcomes.done():  # else its submitter was cancelled
                    submitted.outcomes.set_result(outcomes[first:first + len(submitted.appends)])
                first += len(submitted.appends)

    async def _append_batch(self, appends: list[Append]) -> list[list[Envelope] | Exception]:
        """The batch in one transaction; if it fails, each append in one of its own.

        One command that fails (the database refuses it: a constraint, a
        trigger, a value out of range, a deadlock; or Python does: an answer
        that cannot be built, a value that cannot be encoded) must not fail
        the commands that happened to share its transaction. The transaction
        rolled back, so each append is simply tried again alone, in order; an
        append behind a failed one of its stream then fails its expected
        version, as it would have. Failures of the connection or the server
        are not retried here: the clients' retries with their keys settle them.
        """
        try:
            return await self._append_many_watched(appends)
        except Exception as failure:
            if len(appends) == 1 or not is_one_commands_fault(failure):
                raise
            log.warning("a group commit of %d appends failed (%r); retrying them one by one", len(appends), failure)
        outcomes: list[list[Envelope] | Exception] = []
        for index, append in enumerate(appends):
            try:
                outcomes.extend(await self.store.append_many([append]))
            except Exception as failure:
                if is_one_commands_fault(failure):
                    outcomes.append(failure)  # this command's own fault
                    continue
                # The connection or the server failed: the appends not yet tried get
                # its error, and those already committed keep their outcomes.
                outcomes.extend([failure] * (len(appends) - index))
                break
        return outcomes

    async def _append_many_watched(self, appends: list[Append]) -> list[list[Envelope] | Exception]:
        """``append_many``; while it waits past ``STALLED_HOLDER_S``, cut a head-lock holder stalled on its client.

        The waiter is the one that knows the lock is held too long, so it
        looks; a holder that is merely busy is left alone.
        """
        appending = asyncio.ensure_future(self.store.append_many(appends))
        try:
            while not (await asyncio.wait({appending}, timeout=STALLED_HOLDER_S))[0]:
                try:
                    await asyncio.wait_for(self.store.cut_stalled_lock_holders(), STALLED_HOLDER_S)
                except Exception:
                    log.warning("could not look for a stalled head-lock holder", exc_info=True)
        except BaseException:
            appending.cancel()
            raise
        return appending.result()

    async def close(self) -> None:
        self.writer.cancel()
        try:
            await self.writer
        except asyncio.CancelledError:
            pass

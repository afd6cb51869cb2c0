"""Stored history made fast: real, hash-chained events written with COPY.

A template member is run through the real rules (``decide`` and ``evolve``)
once; its events are then cloned for as many members as needed, only the
stream id (and ``member_id`` in ``member_enrolled``) changed, so every row is
an event the service itself could have written. Positions continue the log
and the hash chain is computed as the store computes it, so ``loyalty
verify`` passes over the result. The same COPY is the bulk-import baseline:
the fastest way PostgreSQL takes these rows.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import asyncpg


from events.catalogue import event_type
from events.codec import encode_json, to_data
from events.envelope import Envelope
from events.upcasting import current_version
from ledger import commands as cmd
from ledger.decide import decide
from ledger.programme import Programme
from ledger.state import Fact, MemberState, evolve
from ledger.store import envelope_hash

EVENT_COLUMNS = (
    "position", "stream_id", "stream_version", "type", "schema_version", "occurred_at", "recorded_at",
    "command_id", "actor", "programme_version", "data", "hash",
)
COPY_CHUNK_ROWS = 50_000


def template_stream(purchases: int, programme: Programme, now: datetime) -> list[tuple[str, int, datetime, dict]]:
    """(type, schema_version, occurred_at, data) of one member: enrolment then ``purchases`` purchases."""
    state = MemberState()
    out: list[tuple[str, int, datetime, dict]] = []

    def run(command: cmd.Command) -> None:
        for decided in decide(state, command, programme, now):
            name = event_type(decided.event)
            evolve(state, Fact(decided.event, decided.occurred_at, state.version + 1))
            out.append((name, current_version(name), decided.occurred_at, to_data(decided.event)))

    run(cmd.Enrol(member_id="TEMPLATE", identities=[], enrolled_at=now - timedelta(days=25)))
    for n in range(purchases):
        # Spread over the last 20 days, oldest first, amounts 1-500 yuan.
        at = now - timedelta(days=20) + timedelta(seconds=n * 20 * 86400 // max(purchases, 1))
        run(cmd.RecordPurchase(purchase_id=f"p{n}", store_id=f"s{n % 50}", amount_cents=100 + (n * 7919) % 50_000,
                               occurred_at=at))
    return out


async def head(conn: asyncpg.Connection) -> tuple[int, str]:
    row = await conn.fetchrow("SELECT position, hash FROM event_head")
    return row["position"], row["hash"].strip()


def sealed_rows(template, stream_ids, position: int, previous_hash: str, recorded_at: datetime, programme_version: int):
    """Envelope rows for every stream in ``stream_ids``, chained from (position, previous_hash)."""
    rows = []
    for stream_id in stream_ids:
        for version, (name, schema_version, occurred_at, data) in enumerate(template, start=1):
            if name == "member_enrolled":
                data = {**data, "member_id": stream_id}
            position += 1
            envelope = Envelope(
                position=position, stream_id=stream_id, stream_version=version, type=name,
                schema_version=schema_version, occurred_at=occurred_at, recorded_at=recorded_at,
                command_id=None, actor="bench-filler", programme_version=programme_version, data=data, hash="",
            )
            previous_hash = envelope_hash(envelope, previous_hash)
            rows.append((position, stream_id, version, name, schema_version, occurred_at, recorded_at, None,
                         "bench-filler", programme_version, encode_json(data).decode(), previous_hash))
    return rows, position, previous_hash


async def append_members(url: str, prefix: str, members: int, purchases_each: int, programme: Programme,
                         now: datetime | None = None) -> dict:
    """Write ``members`` members (``prefix``0..) of ``purchases_each`` purchases each, by COPY."""
    now = now or datetime.now(timezone.utc)
    template = template_stream(purchases_each, programme, now)
    conn = await asyncpg.connect(url)  # no jsonb codec: COPY takes the JSON text as is
    started = time.perf_counter()
    seal_s = copy_s = 0.0
    written = 0
    try:
        async with conn.transaction():
            position, previous_hash = await conn.fetchrow("SELECT position, hash FROM event_head FOR UPDATE")
            previous_hash = previous_hash.strip()
            per_chunk = max(1, COPY_CHUNK_ROWS // len(template))
            for first in range(0, members, per_chunk):
                ids = [f"{prefix}{n}" for n in range(first, min(first + per_chunk, members))]
                t0 = time.perf_counter()
                rows, position, previous_hash = sealed_rows(template, ids, position, previous_hash, now, programme.version)
                t1 = time.perf_counter()
                await conn.copy_records_to_table("events", records=rows, columns=EVENT_COLUMNS)
                seal_s += t1 - t0
                copy_s += time.perf_counter() - t1
                written += len(rows)
            await conn.execute("UPDATE event_head SET position = $1, hash = $2", position, previous_hash)
        # Settled history, not rows written a moment ago: autovacuum and the
        # checkpoint of what was just written would otherwise run during the
        # measured load.
        await conn.execute("VACUUM (ANALYZE) events")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return {
        "events": written,
        "events_per_member": len(template),
        "seconds": round(time.perf_counter() - started, 2),
        "seal_s": round(seal_s, 2),
        "copy_s": round(copy_s, 2),
    }


async def copy_baseline(url: str, after_position: int) -> dict:
    """COPY and multi-row INSERT of the events past ``after_position`` into equivalent tables.

    The tables are ``LIKE events INCLUDING ALL`` (same columns, primary key,
    unique (stream_id, stream_version) and type index; no append-only
    trigger), so the database does the same index work as for the real log.
    """
    conn = await asyncpg.connect(url)
    try:
        raw = await conn.fetch(
            f"SELECT {', '.join(EVENT_COLUMNS[:-2])}, data::text, hash FROM events WHERE position > $1 ORDER BY position",
            after_position,
        )
        rows = [tuple(r) for r in raw]
        result = {"rows": len(rows)}
        for method in ("copy", "insert"):
            table = f"bench_{method}_events"
            await conn.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (LIKE events INCLUDING ALL)")
            started = time.perf_counter()
            for first in range(0, len(rows), 5000):
                chunk = rows[first:first + 5000]
                async with conn.transaction():
                    if method == "copy":
                        await conn.copy_records_to_table(table, records=chunk, columns=EVENT_COLUMNS)
                    else:
                        await conn.execute(
                            f"INSERT INTO {table} ({', '.join(EVENT_COLUMNS)}) SELECT * FROM unnest("
                            "$1::bigint[], $2::text[], $3::int[], $4::text[], $5::int[], $6::timestamptz[],"
                            " $7::timestamptz[], $8::text[], $9::text[], $10::int[], $11::jsonb[], $12::text[])",
                            *[list(column) for column in zip(*chunk)],
                        )
            seconds = time.perf_counter() - started
            result[f"{method}_seconds"] = round(seconds, 3)
            result[f"{method}_events_per_s"] = round(len(rows) / seconds, 1) if seconds else None
            await conn.execute(f"DROP TABLE {table}")
        return result
    finally:
        await conn.close()


__all__ = ["append_members", "copy_baseline", "template_stream"]

"""What every read model shares: where it writes, and batch-sized row handling.

A projection writes either its live tables or a rebuild's shadow tables
(``<table>__shadow``); ``Target`` names them. A batch of events touches a
bounded set of rows, so ``Rows`` loads them in one query (but for the rows
the batch creates), lets the projection change them in memory in log order,
and writes them back in two statements, the created rows inserted and the
changed ones upserted: at most three round trips per table per batch,
whatever the batch's length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Callable, Iterable, Sequence

import asyncpg
import msgspec

from ledger.programme import Programme
from projections.feed import Decoded

SHADOW_SUFFIX = "__shadow"

Row = dict[str, Any]
Key = tuple[str, ...]


@dataclass(frozen=True)
class Target:
    """The tables a projection writes (live, or a rebuild's shadows) and the rules it needs."""

    suffix: str = ""
    programme: Programme = field(default_factory=Programme)

    def table(self, name: str) -> str:
        return name + self.suffix

    @property
    def is_shadow(self) -> bool:
        return self.suffix == SHADOW_SUFFIX


def live(programme: Programme) -> Target:
    return Target("", programme)


def shadow(programme: Programme) -> Target:
    return Target(SHADOW_SUFFIX, programme)


class Rows:
    """The rows of one table that a batch touches, keyed by their primary key (text columns)."""

    def __init__(self, table: str, key: Sequence[str], columns: Sequence[str]) -> None:
        self.table = table
        self.key = tuple(key)
        self.columns = tuple(columns)
        self._column_set = frozenset(columns)
        # itemgetter gives a tuple only for two names or more
        self.key_of: Callable[[Row], Key] = itemgetter(*key) if len(key) > 1 else lambda row: (row[key[0]],)
        self._rows: dict[Key, Row] = {}
        self._dirty: set[Key] = set()
        self._created: set[Key] = set()

    async def load(self, conn: asyncpg.Connection, keys: Iterable[Key], created: Iterable[Key] = ()) -> None:
        """Read the rows with these keys in one query, but for those already in memory and those the
        batch ``created`` itself (ids are unique: a row an event creates did not exist before it)."""
        wanted = list(set(keys).difference(self._rows, created))
        if not wanted:
            return
        arrays = [list(column) for column in zip(*wanted)]
        unnest = ", ".join(f"${n}::text[]" for n in range(1, len(self.key) + 1))
        key_list = ", ".join(self.key)
        rows = await conn.fetch(
            f"SELECT {', '.join(self.columns)} FROM {self.table}"
            f" WHERE ({key_list}) IN (SELECT * FROM unnest({unnest}))",
            *arrays,
        )
        for row in rows:
            record = dict(row)
            self._rows[self.key_of(record)] = record

    def get(self, *key: str) -> Row | None:
        return self._rows.get(key)

    def put(self, row: Row) -> Row:
        """Add a row an event creates; ``save`` inserts it (one that existed fails the batch)."""
        assert row.keys() == self._column_set, (self.table, sorted(row.keys() ^ self._column_set))
        key = self.key_of(row)
        self._rows[key] = row
        self._dirty.add(key)
        self._created.add(key)
        return row

    def touch(self, row: Row) -> Row:
        """Mark a row changed in place."""
        self._dirty.add(self.key_of(row))
        return row

    async def save(self, conn: asyncpg.Connection) -> None:
        """Write the changed rows back: the created ones by a plain insert (PostgreSQL's cost a row:
        10.8 us, an upsert's 17), the others by an upsert."""
        created, changed = [], []
        for key, row in self._rows.items():  # in the order they were loaded or created
            if key in self._dirty:
                (created if key in self._created else changed).append(row)
        await insert_rows(conn, self.table, self.columns, created)
        await upsert(conn, self.table, self.key, self.columns, changed, replaced(self.columns, self.key))
        self._dirty.clear()
        self._created.clear()  # stored now: changed again, they are upserted


# Rows travel to the database as one JSON text per statement, unpacked there by
# json_populate_recordset into the table's own row type: msgspec encodes a row in about
# 0.5 us, where asyncpg's binary encoding of the same row as typed arrays took 10 us and
# COPY 5-7 us (the projector's Python is the bottleneck; PostgreSQL has the other core).
_json = msgspec.json.Encoder()


def _rows_of(table: str) -> str:
    return f"json_populate_recordset(NULL::{table}, $1::json)"


def replaced(columns: Sequence[str], key: Sequence[str]) -> str:
    """The ``SET`` of an upsert that replaces every non-key column with the new row's."""
    return ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)


async def upsert(conn: asyncpg.Connection, table: str, key: Sequence[str], columns: Sequence[str],
                 rows: Sequence[Row], on_conflict_set: str) -> None:
    """Insert ``rows`` (unique keys) in one statement; a row whose key exists is updated by
    ``on_conflict_set`` instead (the existing row is ``t``, the new one ``excluded``)."""
    if rows:
        listed = ", ".join(columns)
        await conn.execute(
            f"INSERT INTO {table} AS t ({listed}) SELECT {listed} FROM {_rows_of(table)}"
            f" ON CONFLICT ({', '.join(key)}) DO UPDATE SET {on_conflict_set}",
            _json.encode(rows).decode(),
        )


async def insert_rows(conn: asyncpg.Connection, table: str, columns: Sequence[str], rows: Sequence[Row]) -> None:
    """Append rows in one statement (tables that only ever grow: ledger lines, tier history)."""
    if rows:
        listed = ", ".join(columns)
        await conn.execute(f"INSERT INTO {table} ({listed}) SELECT {listed} FROM {_rows_of(table)}",
                           _json.encode(rows).decode())


async def apply_in_memory(conn: asyncpg.Connection, batch: list[Decoded], rows: Any, appliers) -> None:
    """Load the rows a batch touches, apply its events in log order, write the changed rows back."""
    await rows.load(conn, batch)
    for envelope, event in batch:
        appliers[type(event)](rows, envelope, event)
    await rows.save(conn)

"""Export the log as JSON lines or CSV, and import an export into another database.

Export streams the feed in position order, one bounded batch at a time, so
memory stays constant however long the log. A JSON line is the full
envelope (CONTRACT §3), hash included.

Import is resumable and idempotent: positions the database already holds
are skipped (the file's line at the database's head must carry the head's
hash, else the file is another history and is refused), every line's hash
is recomputed from the previous one as it goes (a changed, missing or
reordered line stops the import before it is written), and lines are
inserted in batches, each in one transaction with ``event_head`` and the
identities the events link. An interrupted import is resumed by running it
again. Stored command answers (idempotency) are not part of the log and are
not carried over; natural ids still refuse duplicates after an import.
"""

from __future__ import annotations

import asyncio
import csv
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterable

import msgspec

from events.codec import GENESIS_HASH, encode_json
from events.envelope import Envelope
from ledger.store import EventStore, HeadMoved, envelope_hash

EXPORT_BATCH_EVENTS = 5000
IMPORT_BATCH_EVENTS = 20_000
YIELD_EVERY_LINES = 100
CSV_COLUMNS = (
    "position", "stream_id", "stream_version", "type", "schema_version", "occurred_at", "recorded_at",
    "command_id", "actor", "programme_version", "data", "hash",
)

_decoder = msgspec.json.Decoder(Envelope)



# -- export ---------------------------------------------------------------------------------------


async def export(pool, out: IO[str], fmt: str = "jsonl", after: int = 0,
                 progress: Callable[[int], Any] | None = None) -> int:
    """Write every event after position ``after`` to ``out``; returns how many."""
    write = _jsonl_writer(out) if fmt == "jsonl" else _csv_writer(out)
    written = 0
    async for envelopes in EventStore(pool).iter_all(after, EXPORT_BATCH_EVENTS):
        for envelope in envelopes:
            write(envelope)
        written += len(envelopes)
        if progress is not None:
            progress(len(envelopes))
    out.flush()
    return written


def _jsonl_writer(out: IO[str]) -> Callable[[Envelope], None]:
    return lambda envelope: out.write(encode_json(envelope).decode() + "\n")


def _csv_writer(out: IO[str]) -> Callable[[Envelope], None]:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def write(envelope: Envelope) -> None:
        row = msgspec.to_builtins(envelope)
        row["data"] = encode_json(envelope.data).decode()
        writer.writerow(["" if row[c] is None else row[c] for c in CSV_COLUMNS])

    return write


# -- import ---------------------------------------------------------------------------------------


class ImportRefused(Exception):
    """The file cannot be imported here; nothing after the last committed batch was written."""


@dataclass
class ImportReport:
    read: int = 0
    skipped: int = 0  # already in the database
    inserted: int = 0
    head_position: int = 0
    head_hash: str = GENESIS_HASH


class _Importer:
    """Checks each line, then writes the accepted ones a batch at a time.

    A batch is written while the lines after it are read and checked: Python
    checks the chain while PostgreSQL takes the previous COPY, on the other
    core. One batch at most is in flight, and each writes only on the head
    the previous one committed, so the order and the resumability are those
    of writing batch after batch.
    """

    def __init__(self, pool, batch_events: int) -> None:
        self.pool = pool
        self.store = EventStore(pool)
        self.batch_events = batch_events
        self.report = ImportReport()
        self.start_position, self.start_hash = 0, GENESIS_HASH  # this database's head when the import began
        self.accepted_position = 0  # of the last line committed, in flight or pending
        self.previous_hash: str | None = None  # of the file's previous line
        self.expected_position = 0
        self.pending: list[Envelope] = []
        self.writing: asyncio.Task | None = None

    async def start(self) -> None:
        self.start_position, self.start_hash = await self.store.head()
        self.report.head_position, self.report.head_hash = self.start_position, self.start_hash
        self.accepted_position = self.start_position

    async def line(self, number: int, text: bytes) -> None:
        try:
            envelope = _decoder.decode(text)
        except msgspec.DecodeError as error:
            raise ImportRefused(f"line {number}: not an exported envelope: {error}") from None
        self.report.read += 1
        await self._check_chain(number, envelope)
        if envelope.position <= self.start_position:
            if envelope.position == self.start_position and envelope.hash != self.start_hash:
                raise ImportRefused(f"line {number}: position {envelope.position} differs from this database's;"
                                    " the file is another history")
            self.report.skipped += 1
            return
        if envelope.position != self.accepted_position + 1:
            raise ImportRefused(f"line {number}: position {envelope.position} does not follow {self.accepted_position}")
        self.accepted_position = envelope.position
        self.pending.append(envelope)
        if len(self.pending) >= self.batch_events:
            await self.flush()

    async def _check_chain(self, number: int, envelope: Envelope) -> None:
        if self.previous_hash is None:
            self.previous_hash = await self._hash_before(number, envelope.position)
        elif envelope.position != self.expected_position:
            raise ImportRefused(f"line {number}: position {envelope.position} where {self.expected_position} was due")
        if envelope_hash(envelope, self.previous_hash) != envelope.hash:
            raise ImportRefused(f"line {number}: the hash of position {envelope.position} does not match its"
                                " content and the previous hash; the file was changed")
        self.previous_hash = envelope.hash
        self.expected_position = envelope.position + 1

    async def _hash_before(self, number: int, position: int) -> str:
        """The hash the file's first line chains from: genesis, or this database's event before it."""
        if position == 1:
            return GENESIS_HASH
        if position - 1 > self.start_position:
            raise ImportRefused(f"line {number}: the file starts at position {position}, but this database ends at"
                                f" {self.start_position}; import the earlier part first")
        found = await self.pool.fetchval("SELECT hash FROM events WHERE position = $1", position - 1)
        return found.strip()

    async def flush(self) -> None:
        """Start writing the pending lines once the batch before them is committed."""
        await self.drain()
        if self.pending:
            rows, self.pending = self.pending, []
            self.writing = asyncio.create_task(self._write(rows))

    async def drain(self) -> None:
        """Wait for the batch in flight, if any; its failure is raised here."""
        if self.writing is not None:
            writing, self.writing = self.writing, None
            await writing

    async def _write(self, rows: list[Envelope]) -> None:
        last = rows[-1]
        try:
            await self.store.append_sealed(rows, after=(self.report.head_position, self.report.head_hash))
        except HeadMoved as moved:
            raise ImportRefused(f"the database's head moved to {moved.position} during the import; run it again") from None
        self.report.inserted += len(rows)
        self.report.head_position, self.report.head_hash = last.position, last.hash


async def import_lines(pool, lines: Iterable[bytes], batch_events: int = IMPORT_BATCH_EVENTS,
                       progress: Callable[[int], Any] | None = None) -> ImportReport:
    """Import exported JSON lines (an open binary file, say); ``progress`` gets the bytes read, now and then."""
    importer = _Importer(pool, batch_events)
    await importer.start()
    read_bytes = 0
    try:
        for number, text in enumerate(lines, start=1):
            if text.strip():
                await importer.line(number, text)
            read_bytes += len(text)
            if number % YIELD_EVERY_LINES == 0:
                # Checking a line never waits, so without this the batch in
                # flight would not move until the next one is due.
                await asyncio.sleep(0)
                if progress is not None:
                    progress(read_bytes)
                    read_bytes = 0
        await importer.flush()
    finally:
        await importer.drain()
    if progress is not None:
        progress(read_bytes)
    return importer.report

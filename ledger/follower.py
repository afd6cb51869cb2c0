"""How far this process has applied the log to its member cache, and catching up to the head.

A catch-up reads ``(position, stream_id, stream_version)`` of every event
after ``applied`` and hands the rows to the ledger, which drops the cached
members they make stale; then ``applied`` moves to the last row. Positions
commit in order (every append holds the head lock until its commit), so a
query's snapshot sees a gap-free prefix of the log, and the rows it returns,
once applied, leave the cache current up to the head as of the moment the
query was sent: everything committed before then, by any process.

``current()`` waits for a catch-up begun after it was called: readers that
arrive together share one query (a catch-up running when a reader arrives
may have sent its query before that reader's write was answered, so the
reader waits for the next). A notification of an append (LISTEN) starts a
catch-up too, while readers are about, so that reads naming a position
(``min_position``) usually find it applied already and need no query at all;
and without readers once the cache is ``UNREAD_LAG_MAX_EVENTS`` behind, so
that no read ever waits for a catch-up over a long write-only burst.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Sequence

CATCH_UP_PAGE = 10_000  # rows a catch-up query reads at most; it reads pages until one is short
# With no readers about, notifications are followed only once the cache is this many events behind: a
# write-only burst costs a small query now and then, and the first read after it catches up over at most
# this many rows, not over the whole burst (a read after 254,578 purchase events waited 0.8 s).
UNREAD_LAG_MAX_EVENTS = 2_000
# A catch-up is shared and outlives the requests waiting for it, so it is bounded on its own: one hung
# on a connection a partition left silent would otherwise hold every later read. Its readers then read
# the log themselves (``Ledger.read``), bounded by their requests' deadlines.
CATCH_UP_TIMEOUT_S = 5.0

Row = tuple[int, str, int]  # position, stream_id, stream_version
ReadAfter = Callable[[int, int], Awaitable[Sequence[Row]]]
Apply = Callable[[Sequence[Row]], None]


class LogFollower:
    def __init__(self, read_after: ReadAfter, apply: Apply, applied: int) -> None:
        self.applied = applied  # every event up to here is applied to the cache
        self._read_after = read_after
        self._apply = apply
        self._next: asyncio.Future[None] | None = None  # the catch-up not begun yet, that new readers join
        self._running: asyncio.Task | None = None
        self._readers_about = False  # a read since the last catch-up began: notifications are worth following

    async def current(self) -> None:
        """Return once every event committed before this call (by any process) is applied."""
        self._readers_about = True
        await asyncio.shield(self._request())

    def read_served(self) -> None:
        self._readers_about = True

    def heard(self, position: int) -> None:
        """A notification: the head is at ``position``. Catch up if readers may ask for it, or if the
        cache has fallen ``UNREAD_LAG_MAX_EVENTS`` behind."""
        if position > self.applied and (self._readers_about or position - self.applied >= UNREAD_LAG_MAX_EVENTS):
            self._request()

    def _request(self) -> asyncio.Future[None]:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            if self._running is None:
                self._running = asyncio.get_running_loop().create_task(self._run())
        return self._next

    async def _run(self) -> None:
        try:
            while self._next is not None:
                done, self._next = self._next, None
                self._readers_about = False
                try:
                    await asyncio.wait_for(self._catch_up(), CATCH_UP_TIMEOUT_S)
                except Exception as failure:
                    done.set_exception(failure)
                    done.exception()  # a catch-up only a notification asked for has nobody to tell
                except BaseException:
                    done.cancel()  # stopping: its readers must not wait forever
                    raise
                else:
                    done.set_result(None)
        finally:
            self._running = None

    async def _catch_up(self) -> None:
        while True:
            rows = await self._read_after(self.applied, CATCH_UP_PAGE)
            if rows:
                self._apply(rows)
                self.applied = rows[-1][0]
            if len(rows) < CATCH_UP_PAGE:
                return

    async def stop(self) -> None:
        if self._running is not None:
            self._running.cancel()
            try:
                await self._running
            except asyncio.CancelledError:
                pass
        if self._next is not None and not self._next.done():
            self._next.cancel()

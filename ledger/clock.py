"""The clock, injected everywhere: production reads the system, tests set it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Callable

Clock = Callable[[], datetime]

# The times a caller may ask about (an ``as_of``): the views reach a year or so either side of the
# moment (rolling windows, ``expiring_30d``, months in the programme's timezone), so a moment near the
# ends of what ``datetime`` holds would overflow there; these bounds leave centuries of room.
AS_OF_EARLIEST = datetime(1000, 1, 1, tzinfo=timezone.utc)
AS_OF_LATEST = datetime(9000, 1, 1, tzinfo=timezone.utc)


def as_of_problem(moment: datetime) -> str | None:
    """Why ``moment`` cannot be asked about, or None when it can."""
    if AS_OF_EARLIEST <= moment < AS_OF_LATEST:
        return None
    return f"is between {AS_OF_EARLIEST.date().isoformat()} and {AS_OF_LATEST.date().isoformat()}"


def system_clock() -> datetime:
    return datetime.now(timezone.utc)


class ManualClock:
    """A clock that moves only when told (tests, replays)."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now

    def set(self, moment: datetime) -> None:
        self.now = moment

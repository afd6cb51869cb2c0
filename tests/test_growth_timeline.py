"""``GrowthTimeline``, the index behind rolling growth, against the walk it replaced.

The stateful model test (test_programme_model.py) checks tiers end to end;
this one drives the index alone through what the domain can do to it: growth
arriving in any date order (late purchases), returns dated at or after their
purchase, and windows anywhere, their ends on an entry's date or between.
"""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from ledger.state import GrowthTimeline

START = datetime(2025, 1, 1, tzinfo=timezone.utc)
hours = st.integers(min_value=0, max_value=24 * 60)


def _walked(entries: list[tuple[datetime, int]], returns: list[tuple[datetime, datetime, int]],
            start: datetime, end: datetime) -> int:
    """The old rule, a walk: growth dated in (start, end], less returns dated up to end of purchases in it."""
    growth = sum(g for at, g in entries if start < at <= end)
    return growth - sum(g for bought_at, at, g in returns if start < bought_at <= end and at <= end)


@given(
    steps=st.lists(
        st.tuples(hours, st.integers(min_value=0, max_value=500), st.none() | st.tuples(hours, st.integers(1, 500))),
        max_size=60,
    ),
    windows=st.lists(st.tuples(hours, st.integers(min_value=0, max_value=24 * 30)), min_size=1, max_size=8),
)
def test_growth_in_any_window_equals_the_walk_over_every_entry(steps, windows):
    timeline = GrowthTimeline()
    entries: list[tuple[datetime, int]] = []
    returns: list[tuple[datetime, datetime, int]] = []
    for hour, growth, returned in steps:
        at = START + timedelta(hours=hour)
        timeline.add(at, growth)
        entries.append((at, growth))
        if returned is not None:
            later, taken = returned
            returned_at = at + timedelta(hours=later)  # a return is never dated before its purchase
            timeline.take_back(at, returned_at, taken)
            returns.append((at, returned_at, taken))
    for end_hour, span_hours in windows:
        end = START + timedelta(hours=end_hour)
        start = end - timedelta(hours=span_hours)
        assert timeline.within(start, end) == _walked(entries, returns, start, end)
    # As a snapshot stores it and a cached copy holds it, it answers the same.
    stored = msgspec.msgpack.decode(msgspec.msgpack.encode(timeline), type=GrowthTimeline)
    copied = copy.deepcopy(timeline)
    for end_hour, span_hours in windows:
        end = START + timedelta(hours=end_hour)
        start = end - timedelta(hours=span_hours)
        assert stored.within(start, end) == copied.within(start, end) == timeline.within(start, end)


def test_a_late_entry_shifts_the_running_totals_after_it():
    timeline = GrowthTimeline()
    timeline.add(START + timedelta(days=2), 10)
    timeline.add(START + timedelta(days=3), 20)
    timeline.add(START + timedelta(days=1), 5)  # a till synced late
    assert timeline.running == [0, 5, 15, 35]
    assert timeline.within(START, START + timedelta(days=2)) == 15
    assert timeline.within(START + timedelta(days=1), START + timedelta(days=3)) == 30

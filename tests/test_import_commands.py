"""`loyalty import` of batch command lines: an offline till's or a migration's history, once."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from events.codec import rfc3339

from ledger.store import EventStore
from tests.service_process import run_cli

pytestmark = pytest.mark.asyncio


def lines() -> list[dict]:
    """A till's last days (the CLI runs on the real clock: times are relative to it)."""
    now = datetime.now(timezone.utc)
    enrolled_at = rfc3339(now - timedelta(days=3))
    history = [{"op": "enrol", "member_id": f"m{n}", "body": {"enrolled_at": enrolled_at}} for n in range(5)]
    for n in range(5):
        for k in range(3):
            body = {"purchase_id": f"p{k}", "store_id": "till-042", "amount_cents": 25800,
                    "occurred_at": rfc3339(now - timedelta(days=2 - k))}
            history.append({"op": "purchase", "member_id": f"m{n}", "body": body})
    history.append({"op": "redemption", "member_id": "m0", "body": {"redemption_id": "r1", "points": 10**6}})
    return history


async def test_importing_command_lines_twice_takes_effect_once(pool, database_url, tmp_path):
    path = tmp_path / "till-042.ndjson"
    path.write_text("\n".join(json.dumps(line) for line in lines()) + "\n")
    first = run_cli(database_url, "import", str(path))
    assert first.returncode == 1, first.stderr  # the over-large redemption is refused, and said so
    assert "insufficient_points" in first.stderr and "line 21" in first.stderr
    assert json.loads(first.stdout) == {"lines": 21, "by_status": {"201": 20, "409": 1}}
    store = EventStore(pool)
    head = await store.head()
    events = await store.read_all(0, 10_000)
    assert sum(e.type == "purchase_recorded" for e in events) == 15
    earned = [e.data for e in events if e.type == "points_earned"]
    assert len(earned) == 15 and all(d["points"] == 25 * d["day_pct"] // 100 for d in earned)

    again = run_cli(database_url, "import", str(path))
    assert json.loads(again.stdout) == json.loads(first.stdout)
    assert await store.head() == head
    assert (await store.verify()).ok

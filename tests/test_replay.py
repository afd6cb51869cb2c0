"""The auditors' replay (``loyalty replay``): the log alone, recomputed, against the projections."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import timedelta

import pytest

from cli.replay import replay
from tests.test_projections_support import PROGRAMME, START, Shop, a_little_history, project_all

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def shop(pool):
    shop = Shop(pool)
    await a_little_history(shop)
    await project_all(pool)
    return shop


async def test_replay_agrees_with_the_projections_now_and_as_of_any_earlier_time(pool, shop):
    for as_of in (shop.clock(), START, START - timedelta(days=15), START + timedelta(days=100)):
        report = await replay(pool, PROGRAMME, as_of)
        assert report.ok, "\n".join(report.mismatches)
        assert report.members_checked == 2 and report.head == await shop.head()
        assert set(report.positions.values()) == {report.head}


async def test_replay_reports_a_bucket_row_corrupted_on_purpose(pool, shop):
    await pool.execute("UPDATE point_buckets SET remaining = remaining - 1 WHERE stream_id = 'm2' AND bucket_id = 'p:q1'")
    report = await replay(pool, PROGRAMME, START + timedelta(days=10))
    assert not report.ok
    assert "member m2: bucket p:q1: remaining: log 25, projection 24" in report.mismatches


async def test_replay_reports_a_trail_line_corrupted_on_purpose_as_a_wrong_balance(pool, shop):
    await pool.execute(
        "UPDATE ledger_lines SET points = points + 7 WHERE stream_id = 'm1' AND kind = 'redeem' AND bucket_id = 'p:p1'"
    )
    at = START + timedelta(days=1)
    assert f"member m1: balance as of {at.isoformat()}: lifetime_redeemed: log 0, projection -7" in \
        (await replay(pool, PROGRAMME, at)).mismatches


async def test_replay_reports_a_tier_row_corrupted_on_purpose(pool, shop):
    # m1 was upgraded to silver by p2, and the return of p2 reverted it to regular.
    await pool.execute("UPDATE member_tiers SET to_tier = 'gold' WHERE stream_id = 'm1' AND reason = 'return'")
    report = await replay(pool, PROGRAMME, START)
    assert f"member m1: tier as of {START.isoformat()}: tier: log 'regular', projection 'gold'" in report.mismatches


async def test_replay_of_one_member_checks_that_member_only(pool, shop):
    await pool.execute("UPDATE member_summary SET debt = debt + 1 WHERE stream_id = 'm1'")
    assert (await replay(pool, PROGRAMME, shop.clock(), member_id="m2")).ok
    report = await replay(pool, PROGRAMME, shop.clock(), member_id="m1")
    assert report.members_checked == 1
    assert report.mismatches == ["member m1: summary: debt: log 75, projection 76"]


async def test_a_projection_behind_the_log_is_compared_at_its_own_position(pool, shop):
    await shop.purchase("m2", "late", 100_000)  # appended, not yet projected
    report = await replay(pool, PROGRAMME, shop.clock())
    assert report.ok, report.mismatches
    assert report.head > max(report.positions.values())
    assert "not caught up: only the events they have applied were compared" in report.summary()


async def loyalty(database_url: str, *args: str) -> tuple[int, str, str]:
    """Run the ``loyalty`` command line against this test's database."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys, service; sys.exit(service.main())", *args,
        env={**os.environ, "DATABASE_URL": database_url, "LOYALTY_LOG_LEVEL": "WARNING"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err.decode()


async def test_loyalty_replay_exits_0_when_all_agree_and_1_with_a_readable_diff(pool, shop, database_url):
    code, out, err = await loyalty(database_url, "replay", "--as-of", "2025-01-07T00:00:00Z")
    assert code == 0, err
    assert "replayed 2 member(s)" in out and "agree with the log" in out and "not caught up" not in out
    assert "replay" in err  # the progress bar

    await pool.execute("UPDATE point_buckets SET remaining = remaining - 1 WHERE stream_id = 'm2' AND bucket_id = 'p:q1'")
    code, out, _err = await loyalty(database_url, "replay", "--as-of", "2025-01-07T00:00:00Z", "--member", "m2")
    assert code == 1
    assert "member m2: bucket p:q1: remaining: log 25, projection 24" in out
    assert "DISAGREE" in out


async def test_replay_reports_a_log_the_domain_cannot_fold_and_checks_the_other_members(pool, shop):
    from events import catalogue as ev
    from ledger.store import Append, NewEvent

    ghost = ev.RedemptionReversed(redemption_id="ghost", points=1, buckets=[], expired=[])
    await shop.ledger.store.append(Append("m2", None, [NewEvent(shop.clock(), ghost)]))
    await project_all(pool)
    report = await replay(pool, PROGRAMME, shop.clock())
    assert report.members_checked == 2
    assert len(report.mismatches) == 2 and report.mismatches[0].startswith("member m2: the log up to position")
    assert "cannot be folded: KeyError('ghost')" in report.mismatches[0]
    assert report.mismatches[1] == "programme liability not compared: 1 member(s) could not be folded"

"""Dry runs and simulations (CONTRACT §6.5) through the real HTTP application on PostgreSQL.

The random-history properties (a dry run changes nothing and answers what the command then
answers; a simulation without changes grants what was granted) are in tests/test_programme_app.py.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from events.codec import rfc3339
from tests.support import TUESDAY
from tests.test_replay import loyalty

pytestmark = pytest.mark.asyncio

HOUR, DAY = timedelta(hours=1), timedelta(days=1)
# TUESDAY is 2025-01-07 02:00Z, 10:00 in Shanghai; the window is [Wednesday 02:00Z, Saturday 02:00Z).
WINDOW = {"from": rfc3339(TUESDAY + DAY), "to": rfc3339(TUESDAY + 4 * DAY)}


def campaign(campaign_id: str, reward: dict, starts_at=TUESDAY, **fields) -> dict:
    return {"campaign_id": campaign_id, "name": campaign_id, "starts_at": rfc3339(starts_at),
            "ends_at": rfc3339(TUESDAY + 30 * DAY), "reward": reward, **fields}


async def history(api) -> None:
    """Two regular members; a real bonus campaign of 5 points with a budget of 10; four purchases."""
    for member_id in ("m1", "m2"):
        await api.enrol(member_id)
    status, created, _ = await api.post("/v1/campaigns", campaign("r-bonus", {"kind": "bonus", "points": 5},
                                                                  budget_points=10), role="admin")
    assert status == 201, created
    api.clock.set(TUESDAY + 5 * DAY)
    for member_id, purchase_id, amount_cents, at in [
        ("m1", "p1", 100_00, TUESDAY + HOUR),  # before the window: 10 + r-bonus 5
        ("m1", "p2", 200_00, TUESDAY + DAY + HOUR),  # Wednesday: 20 + r-bonus 5 (the budget's last 5)
        ("m2", "p3", 300_00, TUESDAY + 3 * DAY + HOUR),  # Friday, member day: 60; r-bonus spent
        ("m2", "p4", 50_00, TUESDAY + 4 * DAY + HOUR),  # Saturday: after the window
    ]:
        status, answer, _ = await api.purchase(member_id, purchase_id, amount_cents, occurred_at=rfc3339(at))
        assert status == 201, answer


async def test_a_simulation_answers_what_we_computed_by_hand(api):
    await simulate_by_hand(api)


async def test_loyalty_simulate_prints_the_same_answer_with_a_progress_bar(api, database_url, tmp_path):
    changes, answer = await simulate_by_hand(api)
    path = tmp_path / "changes.json"
    path.write_text(json.dumps(changes))
    code, out, err = await loyalty(database_url, "simulate", "--from", WINDOW["from"], "--to", WINDOW["to"], str(path))
    assert code == 0, err
    assert json.loads(out) == answer and "simulate" in err and "purchase" in err  # the bar counts purchases
    code, _out, err = await loyalty(database_url, "simulate", "--from", WINDOW["to"], "--to", WINDOW["from"], str(path))
    assert code == 1 and json.loads(err)["code"] == "invalid_window"


async def simulate_by_hand(api):
    await history(api)
    head = await api.head()
    changes = {
        "settings": {"earn_cents_per_point": 500},  # twice the points
        "campaigns": [
            # Started before now: allowed for drafts. A member's first purchase gets a coupon.
            campaign("d-coupon", {"kind": "coupon", "template": "FIRST10", "value_cents": 1000,
                                  "min_spend_cents": 0, "valid_days": 30}, starts_at=TUESDAY - 10 * DAY,
                     conditions={"first_purchase_only": True}, budget_coupons=5),
            campaign("a-mult", {"kind": "multiplier", "multiplier_pct": 150}, conditions={"weekdays": ["friday"]},
                     per_member_limit=1, per_member_period="week"),
        ],
    }
    status, answer, _ = await api.post("/v1/simulations", {**WINDOW, "changes": changes}, role="admin")
    assert status == 200, answer
    # Actual, in the window: p2 20 + 5 (r-bonus) = 25; p3 floor(30000*100*200/10^7) = 60. 85 points, 5 of
    # them from campaigns, no coupon. p1 (before) and p4 (after) are outside it.
    # Simulated, campaigns in campaign_id order a-mult, d-coupon, r-bonus; r-bonus had granted 5 (p1)
    # before the window, so 5 of its budget remain:
    #   p2 (m1, Wednesday): floor(20000*100*100/(500*10^4)) = 40; a-mult: not Friday; d-coupon: m1 bought
    #       p1 before; r-bonus 5 (budget now spent). 45 points, 5 from campaigns.
    #   p3 (m2, Friday): floor(30000*100*200/(500*10^4)) = 120; a-mult floor(120*50/100) = 60; d-coupon:
    #       m2's first purchase: 1 coupon; r-bonus: budget spent, a reward of 0 is not granted. 180 points.
    #   225 points, 65 from campaigns, 1 coupon; delta 225 - 85 = 140; cost 140 * 100 cents = 14,000.
    assert answer == {
        "purchases": 2, "members": 2,
        "actual": {"points": 85, "campaign_points": 5, "coupons": 0},
        "simulated": {"points": 225, "campaign_points": 65, "coupons": 1},
        "delta_points": 140, "delta_cost_cents": 14_000,
        "by_month": [{"month": "2025-01", "actual_points": 85, "simulated_points": 225}],
    }
    assert await api.head() == head  # nothing appended
    return changes, answer


async def test_a_simulation_without_changes_grants_what_was_granted(api):
    await history(api)
    status, unchanged, _ = await api.post("/v1/simulations", WINDOW, role="admin")
    assert status == 200 and unchanged["delta_points"] == 0 and unchanged["simulated"] == unchanged["actual"]


async def test_bad_simulations_get_the_contracts_codes_and_append_nothing(api):
    await history(api)
    head = await api.head()
    mult = {"kind": "multiplier", "multiplier_pct": 200}
    for body, status, code, field in [
        ({"from": WINDOW["to"], "to": WINDOW["from"]}, 422, "invalid_window", "to"),
        ({**WINDOW, "changes": {"settings": {"pending_days": -1}}}, 422, "invalid_programme", "pending_days"),
        ({**WINDOW, "changes": {"settings": {"colour": "red"}}}, 422, "invalid_programme", "colour"),
        ({**WINDOW, "changes": {"campaigns": [campaign("x", {"kind": "multiplier", "multiplier_pct": 100})]}},
         422, "invalid_campaign", "reward.multiplier_pct"),
        ({**WINDOW, "changes": {"campaigns": [campaign("x", mult, starts_at=TUESDAY + 40 * DAY)]}},
         422, "invalid_window", "ends_at"),
        ({**WINDOW, "changes": {"campaigns": [campaign("r-bonus", mult)]}}, 409, "campaign_exists", None),
        ({**WINDOW, "changes": {"campaigns": [campaign("x", mult), campaign("x", mult)]}}, 409, "campaign_exists", None),
        ({**WINDOW, "changes": {"campaigns": [campaign("bad id", mult)]}}, 422, "invalid_id", None),
        ({**WINDOW, "changes": {"tiers": []}}, 422, "validation_failed", None),
        ({"to": WINDOW["to"]}, 422, "validation_failed", None),
    ]:
        got, answer, response = await api.post("/v1/simulations", body, role="admin")
        assert (got, answer["code"]) == (status, code), (body, answer)
        assert field is None or answer["field"] == field, answer
        assert response.content_type == "application/problem+json"
    got, answer, _ = await api.post("/v1/simulations", WINDOW, role="checkout")
    assert (got, answer["code"]) == (403, "forbidden")
    assert await api.head() == head


async def test_a_dry_run_answers_as_the_command_would_and_changes_nothing(api):
    await api.enrol("m1")
    status, created, _ = await api.post("/v1/campaigns?dry_run=true", campaign("c1", {"kind": "bonus", "points": 7},
                                                                                budget_points=7), role="admin")
    assert status == 201 and created["dry_run"] is True and created["position"] is None
    head = await api.head()
    status, created, _ = await api.post("/v1/campaigns", campaign("c1", {"kind": "bonus", "points": 7},
                                                                  budget_points=7), role="admin")
    assert status == 201 and "dry_run" not in created
    head = await api.head()
    path = "/v1/members/m1/purchases"
    body = {"purchase_id": "p1", "store_id": "s1", "amount_cents": 258_00}
    for _ in range(2):  # the same key twice: neither the key nor the natural id nor the budget was recorded
        status, dry, _ = await api.post(path + "?dry_run=true", body, **{"Idempotency-Key": "k1"})
        assert status == 201 and dry["dry_run"] is True and dry["position"] is None, dry
        assert (dry["points"], dry["base_points"], dry["rewards"]) == (32, 25, [
            {"campaign_id": "c1", "points": 7, "coupon_id": None}])
        assert await api.head() == head
    status, real, _ = await api.post(path, body, **{"Idempotency-Key": "k1"})
    assert status == 201 and "dry_run" not in real
    head = await api.head()
    assert {**dry, "position": real["position"], "dry_run": None} == {**real, "dry_run": None}
    # Now the budget is spent and p1 recorded: the dry runs answer as the real commands would.
    status, again, response = await api.post(path + "?dry_run=true", {**body, "amount_cents": 1}, role="checkout")
    assert (status, again["code"]) == (409, "duplicate_id")
    status, other, _ = await api.post(path + "?dry_run=true", {**body, "purchase_id": "p2"})
    assert status == 201 and other["rewards"] == [] and other["position"] is None
    status, refused, _ = await api.post("/v1/members/m1/redemptions?dry_run=true", {"redemption_id": "r1", "points": 1})
    assert (status, refused["code"]) == (409, "insufficient_points")
    status, refused, _ = await api.post("/v1/members/m1/purchases?dry_run=yes", body)
    assert (status, refused["field"]) == (422, "dry_run")
    response = await api.client.put("/v1/programme?dry_run=true", json={"settings": {}}, headers=api.headers("admin"))
    assert response.status == 422 and (await response.json())["field"] == "dry_run"
    status, ended, _ = await api.post("/v1/campaigns/c1/end?dry_run=true", {"reason": "try"}, role="admin")
    assert status == 201 and ended["ended_at"] is not None and ended["dry_run"] is True
    assert await api.head() == head
    await api.ledger.refresh_rules()
    assert api.ledger.rules.campaigns.campaigns["c1"].ended_at is None
    later = rfc3339(TUESDAY + 400 * DAY)
    api.clock.set(TUESDAY + 400 * DAY)
    status, dry_job, _ = await api.post(f"/v1/jobs/expire?as_of={later}&dry_run=true", role="admin")
    assert status == 200 and dry_job["appended"] >= 1 and dry_job["position"] is None and dry_job["dry_run"], dry_job
    assert await api.head() == head
    status, job, _ = await api.post(f"/v1/jobs/expire?as_of={later}", role="admin")
    assert status == 200 and job["appended"] == dry_job["appended"] and "dry_run" not in job

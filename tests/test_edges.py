"""Edges a fuzzer and a new user hit: each answered at once, with a code and the field named."""

from __future__ import annotations

import logging
import re
import time
from datetime import timedelta

import pytest

from events import catalogue as ev
from ledger.store import Append, EventStore, NewEvent
from tests.support import TUESDAY, running_api

pytestmark = pytest.mark.asyncio

RFC3339_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


async def test_a_min_position_past_the_head_is_refused_at_once(api):
    await api.enrol("m1")
    head = await api.head()
    for path in ("/v1/members/m1/ledger", "/v1/programme/liability", "/v1/segments/active"):
        started = time.monotonic()
        status, problem, response = await api.get(path, role="reader", min_position=head + 1)
        assert status == 422 and problem["code"] == "min_position_ahead", problem
        assert problem["field"] == "min_position" and problem["head_position"] == head
        assert response.content_type == "application/problem+json"
        assert time.monotonic() - started < 1.5  # not the 2 s wait for a projection


@pytest.mark.parametrize("path, role", [
    ("/v1/events", "auditor"), ("/v1/members/m1/events", "auditor"), ("/v1/members/m1/ledger", "reader"),
    ("/v1/segments/active", "reader"),
])
async def test_an_empty_after_is_refused_the_same_way_everywhere(api, path, role):
    await api.enrol("m1")
    status, problem, _ = await api.get(path, role=role, after="")
    assert (status, problem["code"], problem["field"]) == (422, "validation_failed", "after"), problem


async def test_an_unknown_event_type_is_refused_not_an_empty_page(api):
    await api.enrol("m1")
    status, problem, _ = await api.get("/v1/events", role="auditor", type="nonsense")
    assert (status, problem["code"], problem["field"]) == (422, "validation_failed", "type"), problem
    status, problem, _ = await api.get("/v1/events", role="auditor", type="member_enrolled,nonsense")
    assert status == 422, problem
    for empty in ("", "member_enrolled,"):
        status, problem, _ = await api.get("/v1/events", role="auditor", type=empty)
        assert (status, problem["field"]) == (422, "type"), problem
    status, page, _ = await api.get("/v1/events", role="auditor", type="member_enrolled")
    assert status == 200 and [e["type"] for e in page["events"]] == ["member_enrolled"]


async def test_a_birthday_that_is_no_day_of_the_year_is_refused(api):
    head_before = await api.head()  # the programme's version 1
    for birthday in ("02-30", "04-31", "11-31"):
        status, problem, _ = await api.post("/v1/members", {"member_id": "m1", "birthday": birthday})
        assert (status, problem["code"], problem["field"]) == (422, "validation_failed", "birthday"), problem
    assert await api.head() == head_before
    for member, birthday in (("m1", "02-29"), ("m2", "12-31")):
        status, answer, _ = await api.post("/v1/members", {"member_id": member, "birthday": birthday})
        assert status == 201, answer


async def test_a_missing_required_field_is_named(api):
    await api.enrol("m1")
    status, problem, _ = await api.post("/v1/members/m1/purchases", {"store_id": "s1", "amount_cents": 100})
    assert (status, problem["code"], problem["field"]) == (422, "validation_failed", "purchase_id"), problem
    status, problem, _ = await api.post("/v1/members", {"member_id": "m2", "identities": [{"type": "phone"}]})
    assert (status, problem["field"]) == (422, "identities[0].value"), problem


async def test_problem_details_print_times_as_every_answer_does(api):
    await api.enrol("m1")
    status, problem, _ = await api.post("/v1/members/m1/redemptions", {"redemption_id": "r1", "points": 5})
    assert status == 409 and problem["code"] == "insufficient_points", problem
    times = re.findall(r"\d{4}-\d\d-\d\dT[^ )]*", problem["detail"])
    assert times and all(RFC3339_Z.fullmatch(t) for t in times), problem["detail"]
    assert "+00:00" not in problem["detail"]


async def test_the_admin_key_of_a_restart_is_not_created_again(pool, caplog):
    caplog.set_level(logging.INFO, logger="loyalty")
    from ledger.settings import Settings

    settings = Settings(rate_limit_per_s=None, admin_key="lk_admin_the_same_secret_at_every_start")
    for _start in range(2):
        async with running_api(pool, settings=settings):
            pass
    created = [r for r in caplog.records if "created by environment" in r.getMessage()]
    kept = [r for r in caplog.records if "exists already" in r.getMessage()]
    assert (len(created), len(kept)) == (1, 1), [r.getMessage() for r in caplog.records]
    assert await pool.fetchval("SELECT count(*) FROM api_keys WHERE created_by = 'environment'") == 1


async def test_metrics_count_appended_events_and_show_the_logs_head(api, pool):
    await api.enrol("m1")
    await api.purchase("m1", "p1", 25_800)
    appended_here = await api.head()
    # Another process appends: the head is the log's, the counter this process's.
    await EventStore(pool).append(Append("elsewhere", 0, [NewEvent(TUESDAY - timedelta(days=1), ev.PurchaseRecorded(
        purchase_id="x1", store_id="s1", amount_cents=100))]))
    metrics = await (await api.client.get("/metrics")).text()
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith(("loyalty_events_appended_total", "loyalty_log_head_position"))}
    assert values["loyalty_events_appended_total"] == appended_here
    assert values["loyalty_log_head_position"] == appended_here + 1


@pytest.mark.parametrize("as_of", ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z"])
async def test_an_as_of_at_the_ends_of_time_is_refused_not_an_overflow(api, as_of):
    await api.enrol("m1")
    head_before = await api.head()
    for path, role in (("/v1/members/m1/balance", "reader"), ("/v1/members/m1/tier", "reader"),
                       ("/v1/programme/liability", "reader"), ("/v1/programme", "reader")):
        status, problem, _ = await api.get(path, role=role, as_of=as_of)
        assert (status, problem["code"], problem["field"]) == (422, "validation_failed", "as_of"), (path, problem)
        assert "between 1000-01-01 and 9000-01-01" in problem["detail"]
    status, problem, _ = await api.post(f"/v1/jobs/expire?as_of={as_of}", role="admin")
    assert (status, problem["field"]) == (422, "as_of"), problem
    assert await api.head() == head_before
    status, _, _ = await api.get("/v1/members/m1/balance", role="reader", as_of="1000-01-01T00:00:00Z")
    assert status == 200


async def test_a_balance_before_the_enrolment_counts_a_purchase_dated_before_it(api):
    """A till's purchase dated before the member enrolled counts as of its date, as in the liability."""
    await api.enrol("m1")
    status, answer, _ = await api.purchase("m1", "p1", 25_000, occurred_at=(api.clock() - timedelta(days=20)).isoformat())
    assert status == 201, answer
    as_of = (api.clock() - timedelta(days=10)).isoformat()
    status, balance, _ = await api.get("/v1/members/m1/balance", role="reader", as_of=as_of)
    assert status == 200, balance
    assert balance["available"] + balance["pending"] == answer["points"] > 0
    status, tier, _ = await api.get("/v1/members/m1/tier", role="reader", as_of=as_of)
    assert status == 200 and tier["tier"] == "regular", tier
    status, problem, _ = await api.get("/v1/members/nobody/balance", role="reader", as_of=as_of)
    assert (status, problem["code"]) == (404, "member_not_found")

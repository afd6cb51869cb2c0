"""Auditors verify a live ledger: through the HTTP endpoint and `loyalty verify`, while 8 writers append."""

from __future__ import annotations

import asyncio
import itertools
import json

import aiohttp
import pytest

from tests.service_process import Client, ServiceProcess, create_key, enrol_members, run_cli

pytestmark = pytest.mark.asyncio

WRITERS = 8
VERIFICATIONS_MIN = 5


async def test_verification_of_a_busy_log_is_always_ok_over_http_and_the_command_line(database_url):
    async with ServiceProcess(database_url) as service:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            admin = Client(session, service.url, service.admin_key)
            checkout = Client(session, service.url, await create_key(session, service, "checkout", "till-busy"))
            auditor = Client(session, service.url, await create_key(session, service, "auditor", "audit-busy"))
            members = await enrol_members(admin, WRITERS)
            numbers = itertools.count()
            writing = True

            async def write(member: str) -> None:
                while writing:
                    n = next(numbers)
                    status, body, _ = await checkout.post(f"/v1/members/{member}/purchases",
                                                          {"purchase_id": f"p{n}", "store_id": "s1", "amount_cents": 900})
                    assert status == 201, body

            writers = [asyncio.create_task(write(member)) for member in members]
            http_reports, cli_reports = [], []
            while len(http_reports) < VERIFICATIONS_MIN or len(cli_reports) < 2:
                cli = asyncio.create_task(asyncio.to_thread(run_cli, database_url, "verify"))
                while not cli.done():
                    status, report, _ = await auditor.get("/v1/audit/verify")
                    assert status == 200, report
                    http_reports.append(report)
                finished = await cli
                assert finished.returncode == 0, finished.stdout + finished.stderr
                cli_reports.append(json.loads(finished.stdout))
            writing = False
            await asyncio.gather(*writers)
    head_positions = [r["head_position"] for r in http_reports + cli_reports]
    assert head_positions[-1] > head_positions[0]  # the log grew while it was verified
    assert [r for r in http_reports + cli_reports if not r["ok"]] == []

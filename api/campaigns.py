"""Campaigns over HTTP (CONTRACT §6.2): create and end them (the ``$campaigns`` stream), read them from
the ``campaigns`` projection with their live counters."""

from __future__ import annotations

import re

import msgspec
from aiohttp import web

from api import answers
from api.auth import ADMIN, PRINCIPAL, READER
from api.context import LEDGER
from api.decoding import DRY_RUN, PAGE_LIMIT_MAX, decode_command, idempotency_key, query_int
from api.problems import HttpProblem, json_response, outcome_response
from api.projected import caught_up
from api.route import Route
from ledger import commands as cmd
from projections import campaigns

CAMPAIGN_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,32}$"
_CAMPAIGN_ID = re.compile(CAMPAIGN_ID_PATTERN)
_ID_DETAIL = "a campaign_id is 1-32 characters of A-Z a-z 0-9 . _ : -"


def _campaign_id(value: str, name: str = "campaign_id") -> str:
    if not _CAMPAIGN_ID.match(value):
        raise HttpProblem(422, "invalid_id", _ID_DETAIL, field=name)
    return value


async def post_campaign(request: web.Request) -> web.StreamResponse:
    command = await decode_command(request, "campaign_create", cmd.CreateCampaign)
    return await _change(request, "campaign_create", command)


async def end_campaign(request: web.Request) -> web.StreamResponse:
    campaign_id = _campaign_id(request.match_info["campaign_id"])
    command = await decode_command(request, "campaign_end", cmd.EndCampaign, campaign_id=campaign_id)
    return await _change(request, "campaign_end", command)


async def _change(request: web.Request, operation: str, command: cmd.Command) -> web.StreamResponse:
    """A campaign's creation or end, exactly once per Idempotency-Key, or its dry run."""
    outcome = await request.app[LEDGER].execute_rules(
        operation, command, actor=request[PRINCIPAL].name, idempotency_key=idempotency_key(request),
        dry_run=request[DRY_RUN],
    )
    return outcome_response(outcome)


async def get_campaign(request: web.Request) -> web.StreamResponse:
    campaign_id = _campaign_id(request.match_info["campaign_id"])
    service = await caught_up(request, campaigns.NAME)
    async with service.pool.acquire() as conn:
        found = await campaigns.campaign(conn, campaign_id, service.clock())
    if found is None:
        raise HttpProblem(404, "campaign_not_found", f"campaign {campaign_id} does not exist; check the id")
    return json_response(msgspec.convert(found, answers.CampaignView))


async def list_campaigns(request: web.Request) -> web.StreamResponse:
    status = request.query.get("status")
    if status is not None and status not in campaigns.STATUSES:
        raise HttpProblem(422, "validation_failed", f"status is one of {', '.join(campaigns.STATUSES)}", field="status")
    after = request.query.get("after")
    if after is not None:  # given empty, it breaks the id rule too
        _campaign_id(after, "after")
    limit = query_int(request, "limit", 100, 1, PAGE_LIMIT_MAX)
    service = await caught_up(request, campaigns.NAME)
    async with service.pool.acquire() as conn:
        listed = await campaigns.campaign_page(conn, after or "", limit + 1, service.clock(), status)
    more = len(listed) > limit
    listed = listed[:limit]
    return json_response(answers.CampaignPage(
        campaigns=msgspec.convert(listed, list[answers.CampaignView]),
        next_after=listed[-1]["campaign_id"] if more else None,
    ))


_ID_SCHEMA = {"type": "string", "pattern": CAMPAIGN_ID_PATTERN}

ROUTES = [
    Route("POST", "/v1/campaigns", post_campaign, ADMIN, "Create a campaign", status=201, body=cmd.CreateCampaign,
          answer=answers.CampaignChanged,
          headers=("Idempotency-Key",), errors=(400, 401, 403, 408, 409, 413, 415, 422, 429, 503), dry_run=True),
    Route("POST", "/v1/campaigns/{campaign_id}/end", end_campaign, ADMIN, "End a campaign now", status=201,
          body=cmd.EndCampaign, answer=answers.CampaignChanged, headers=("Idempotency-Key",), parameter_schemas={"campaign_id": _ID_SCHEMA},
          errors=(400, 401, 403, 404, 408, 409, 413, 415, 422, 429, 503), dry_run=True),
    Route("GET", "/v1/campaigns", list_campaigns, READER, "Campaigns in campaign_id order, with their counters",
          answer=answers.CampaignPage, query=("status", "after", "limit", "min_position"),
          parameter_schemas={"status": {"type": "string", "enum": list(campaigns.STATUSES)}, "after": _ID_SCHEMA}),
    Route("GET", "/v1/campaigns/{campaign_id}", get_campaign, READER, "A campaign with its live counters",
          answer=answers.CampaignView, query=("min_position",), parameter_schemas={"campaign_id": _ID_SCHEMA}),
]

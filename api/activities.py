"""A member's growth tasks (CONTRACT §6.3): their page, from the member's own events (read-your-writes).

The command itself (``POST /v1/members/{id}/activities``, batch op
``activity``) is an ``Operation`` of ``api/commands.py`` like every command.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from api.auth import READER
from api.decoding import page
from api.problems import json_response
from api.reads import member_state
from api.route import Route
from ledger.commands import Timestamp


class ActivityLine(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    activity_id: str
    type: str
    points: int
    growth: int
    ref: str | None
    occurred_at: Timestamp
    stream_version: int


class ActivitiesPage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    activities: list[ActivityLine]
    next_after: int | None  # a stream_version; null on the last page


async def get_activities(request: web.Request) -> web.StreamResponse:
    """Oldest first, newest last; ``after`` counts the member's ``stream_version``, as the events page does."""
    after, limit = page(request)
    state = await member_state(request)
    listed = [a for a in state.activities.values() if a.version > after]  # in log order already
    more = len(listed) > limit
    listed = listed[:limit]
    activities = [
        ActivityLine(activity_id=a.activity_id, type=a.type, points=a.points, growth=a.growth, ref=a.ref,
                     occurred_at=a.occurred_at, stream_version=a.version)
        for a in listed
    ]
    return json_response(ActivitiesPage(activities=activities, next_after=listed[-1].version if more else None))


ROUTES = [
    Route("GET", "/v1/members/{member_id}/activities", get_activities, READER, "The member's growth tasks, newest last",
          query=("after", "limit"), answer=ActivitiesPage, operation_id="get_activities"),
]

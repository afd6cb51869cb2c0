"""Simulations over HTTP (CONTRACT §6.5): ``POST /v1/simulations`` answers at once (200), whatever the
window's size; the ledger reads the history and the pure ``ledger.simulation`` decides."""

from __future__ import annotations

from aiohttp import web

from api.auth import ADMIN
from api.context import LEDGER
from api.decoding import decode, read_body
from api.problems import HttpProblem, json_response
from api.route import Route
from ledger import commands as cmd
from ledger.errors import Refusal
from ledger.simulation import SimulationAnswer


async def post_simulation(request: web.Request) -> web.StreamResponse:
    command = decode(await read_body(request), cmd.Simulate)
    try:
        answer = await request.app[LEDGER].simulate(command)
    except Refusal as refusal:
        raise HttpProblem(refusal.status, refusal.code, refusal.detail, **refusal.extra) from None
    return json_response(answer)


ROUTES = [
    Route("POST", "/v1/simulations", post_simulation, ADMIN,
          "What a changed programme and draft campaigns would have granted over a window of history",
          body=cmd.Simulate, answer=SimulationAnswer, operation_id="simulate",
          errors=(400, 401, 403, 408, 409, 413, 415, 422, 429, 503)),
]

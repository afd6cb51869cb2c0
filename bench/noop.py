"""The baseline server: aiohttp on uvloop (as the service), doing nothing useful.

POST /v1/members/{member_id}/purchases reads the body and decodes it with
msgspec into the same ``RecordPurchase`` struct the service decodes (so the
baseline pays for HTTP and decoding, nothing else) and answers 201 with a
body the size of the service's answer. The member reads (GET
/v1/members/{member_id}, its /balance and /tier) answer fixed bodies of the
service's shape and size. Same routes as the service, so the same wrk scripts
drive both.

    python -m bench.noop PORT
"""

from __future__ import annotations

import asyncio
import signal
import sys

import msgspec
import uvloop
from aiohttp import web

from ledger.commands import RecordPurchase

PURCHASE_ANSWER = b'{"points":25,"growth":258,"tier":"regular","position":123456}'
BALANCE_ANSWER = (
    b'{"available":0,"pending":25,"debt":0,"expiring_30d":0,"lifetime_earned":25,"lifetime_clawed":0,'
    b'"lifetime_adjusted":0,"lifetime_redeemed":0,"lifetime_expired":0,"as_of":"2025-01-03T10:00:00Z"}'
)

TIER_ANSWER = b'{"tier":"regular","growth_window":0,"next_tier":"silver","growth_needed":3000,"hold_until":null}'
MEMBER_ANSWER = (
    b'{"member_id":"r1","status":"prospect","identities":[{"type":"card","value":"card-r1"}],"birthday":null,'
    b'"enrolled_at":"2026-12-02T14:19:37.544610Z","referred_by":null,"referrals_rewarded":0,"tier":' + TIER_ANSWER
    + b',"balance":' + BALANCE_ANSWER + b',"stream_version":6,"lifecycle":"prospect","recency_days":null,'
    b'"orders_365d":0,"spend_365d_cents":0}'
)


async def purchase(request: web.Request) -> web.Response:
    command = msgspec.json.decode(await request.read(), type=RecordPurchase)
    assert command.amount_cents > 0
    return web.Response(status=201, body=PURCHASE_ANSWER, content_type="application/json")


def fixed_answer(body: bytes):
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return answer


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def main(port: int) -> None:
    app = web.Application()
    app.router.add_post("/v1/members/{member_id}/purchases", purchase)
    # aiohttp tries these in order: purchase and balance first, where they were before the others came.
    app.router.add_get("/v1/members/{member_id}/balance", fixed_answer(BALANCE_ANSWER))
    app.router.add_get("/v1/members/{member_id}/tier", fixed_answer(TIER_ANSWER))
    app.router.add_get("/v1/members/{member_id}", fixed_answer(MEMBER_ANSWER))
    app.router.add_get("/healthz", healthz)
    await serve(app, port)


async def serve(app: web.Application, port: int) -> None:
    """Serve ``app`` on 127.0.0.1:``port`` (no access log) until SIGTERM or SIGINT."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))

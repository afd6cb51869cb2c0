"""Helpers for the projection, replay and export tests (no tests here).

``Shop`` drives the real application layer (``Ledger.execute``: decide,
append) with a manual clock; the projections are then run by the real
runtime and compared with each other and with the replay.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg

from ledger import commands as cmd
from ledger.application import Ledger, Outcome
from ledger.clock import ManualClock
from ledger.database import create_pool, database_url_for, quote_ident
from ledger.jobs import run_job
from ledger.programme import Programme
from ledger.store import EventStore
from projections import runtime
from projections.tables import live

# A Monday, 10:00 in Shanghai.
START = datetime(2025, 1, 6, 2, 0, tzinfo=timezone.utc)
# Late events of up to 400 days are accepted, so histories can reach back past expiry dates.
PROGRAMME = Programme(max_backdate_days=400)

_numbers = itertools.count(1)


class Shop:
    """Commands through the real Ledger on a real database, at a manual clock's time."""

    def __init__(self, pool, programme: Programme = PROGRAMME, start: datetime = START) -> None:
        self.pool = pool
        self.programme = programme
        self.clock = ManualClock(start)
        self.ledger = Ledger(EventStore(pool, self.clock), programme, self.clock)

    def ago(self, days: float) -> datetime | None:
        """An occurred_at ``days`` before now (None: now)."""
        return self.clock() - timedelta(days=days) if days else None

    async def do(self, name: str, member_id: str, command: cmd.Command) -> Outcome:
        return await self.ledger.execute(name, member_id, command, actor="tests")

    async def enrol(self, member_id: str, **fields: Any) -> Outcome:
        return await self.do("enrol", member_id, cmd.Enrol(member_id=member_id, **fields))

    async def enrol_referred(self, member_id: str, referrer_id: str) -> Outcome:
        return await self.enrol(member_id, referred_by=referrer_id)

    async def purchase(self, member_id: str, purchase_id: str, amount_cents: int, days_ago: float = 0) -> Outcome:
        return await self.do("purchase", member_id, cmd.RecordPurchase(
            purchase_id=purchase_id, store_id="s1", amount_cents=amount_cents, occurred_at=self.ago(days_ago)))

    async def ret(self, member_id: str, return_id: str, purchase_id: str, amount_cents: int, days_ago: float = 0):
        return await self.do("return", member_id, cmd.RecordReturn(
            return_id=return_id, purchase_id=purchase_id, amount_cents=amount_cents, occurred_at=self.ago(days_ago)))

    async def redeem(self, member_id: str, redemption_id: str, points: int, days_ago: float = 0) -> Outcome:
        return await self.do("redemption", member_id, cmd.Redeem(
            redemption_id=redemption_id, points=points, order_ref="o1", occurred_at=self.ago(days_ago)))

    async def reverse(self, member_id: str, redemption_id: str, days_ago: float = 0) -> Outcome:
        return await self.do("redemption_reversal", member_id, cmd.ReverseRedemption(
            redemption_id=redemption_id, occurred_at=self.ago(days_ago)))

    async def adjust(self, member_id: str, adjustment_id: str, points: int) -> Outcome:
        return await self.do("adjustment", member_id, cmd.Adjust(
            adjustment_id=adjustment_id, points=points, reason="goodwill"))

    async def buy_coupon(self, member_id: str, coupon_id: str, points_cost: int) -> Outcome:
        return await self.do("coupon_issue", member_id, cmd.IssueCoupon(
            coupon_id=coupon_id, template="POINTS10", value_cents=1000, min_spend_cents=0,
            expires_at=self.clock() + timedelta(days=20), points_cost=points_cost))

    async def redeem_coupon(self, member_id: str, coupon_id: str, order_amount_cents: int) -> Outcome:
        return await self.do("coupon_redemption", member_id, cmd.RedeemCoupon(
            coupon_id=coupon_id, order_ref="o2", order_amount_cents=order_amount_cents))

    async def reverse_coupon(self, member_id: str, coupon_id: str) -> Outcome:
        return await self.do("coupon_redemption_reversal", member_id, cmd.ReverseCouponRedemption(coupon_id=coupon_id))

    async def activity(self, member_id: str, activity_id: str, activity_type: str, days_ago: float = 0) -> Outcome:
        return await self.do("activity", member_id, cmd.RecordActivity(
            activity_id=activity_id, type=activity_type, occurred_at=self.ago(days_ago)))

    async def job(self, name: str) -> dict:
        return await run_job(self.ledger, name, self.clock())

    async def head(self) -> int:
        return (await self.ledger.store.head())[0]


async def a_little_history(shop: Shop) -> None:
    """Two members with earns, a partial return into debt, burns, a reversal, a coupon bought, expiry."""
    for member_id in ("m1", "m2"):
        assert (await shop.enrol(member_id)).status == 201
    assert (await shop.purchase("m1", "p1", 258_00, days_ago=20)).status == 201
    assert (await shop.purchase("m1", "p2", 3_000_00, days_ago=10)).status == 201
    assert (await shop.purchase("m2", "q1", 500_00, days_ago=9)).status == 201
    assert (await shop.redeem("m1", "r1", 300)).status == 201
    assert (await shop.ret("m1", "x1", "p2", 2_000_00)).status == 201
    assert (await shop.reverse("m1", "r1")).status == 201
    assert (await shop.buy_coupon("m2", "c1", 20)).status == 201
    assert (await shop.adjust("m2", "a1", -5)).status == 201
    shop.clock.advance(days=400)
    await shop.job("expire")
    await shop.job("tiers")


async def project_all(pool, programme: Programme = PROGRAMME, batch_size: int = runtime.BATCH_EVENTS_MAX) -> None:
    """Bring every projection's live tables up to the head, in batches of ``batch_size``."""
    await runtime.ensure_tables(pool, programme)
    async with pool.acquire() as conn:
        for module in runtime.PROJECTIONS.values():
            await runtime.catch_up(conn, module, live(programme), batch_size=batch_size)


async def all_rows(pool) -> dict[str, list[tuple]]:
    """Every live projection table's rows, in a stable order: for row-for-row comparison."""
    found = {}
    for module in runtime.PROJECTIONS.values():
        for table in module.TABLES:
            rows = await pool.fetch(f"SELECT * FROM {table}")
            found[table] = sorted(tuple(row.values()) for row in rows)
    return found


async def rebuild_all(pool, programme: Programme = PROGRAMME, batch_size: int = 50) -> None:
    """Rebuild every projection from position 0 beside the live tables, then swap."""
    async with pool.acquire() as conn:
        for name in runtime.PROJECTIONS:
            await runtime.rebuild_here(conn, name, programme, batch_size=batch_size)


@contextlib.asynccontextmanager
async def fresh_database(server_url: str, template: str):
    """A new database cloned from the schema template, with a pool; dropped afterwards."""
    name = f"loyalty_p5_{os.getpid()}_{next(_numbers)}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"CREATE DATABASE {quote_ident(name)} TEMPLATE {quote_ident(template)}")
    finally:
        await admin.close()
    pool = await create_pool(database_url_for(server_url, name), min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        finally:
            await admin.close()

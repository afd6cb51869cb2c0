"""Helpers for tests that talk HTTP to the real application on a real database."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Awaitable, TypeVar

import asyncpg
from aiohttp.test_utils import TestClient, TestServer

from ledger.clock import ManualClock
from ledger.database import create_pool, database_url_for, quote_ident
from ledger.store import EventStore
from ledger.programme import Programme
from api.app import create_app
from api.auth import KEYS
from api.context import LEDGER
from ledger.settings import Settings

# A Tuesday, 10:00 in Shanghai.
TUESDAY = datetime(2025, 1, 7, 2, 0, tzinfo=timezone.utc)

T = TypeVar("T")


class OwnDatabase:
    """A database of its own, made from the template, and an event loop of its own to drive it.

    For hypothesis tests, which cannot be coroutines: they call ``run``.
    ``close`` stops the group commit of ``store`` (when given one, as started
    by ``start_group_commit``) before the pool closes, then drops the database.
    """

    def __init__(self, server_url: str, template: str, name: str) -> None:
        self.server_url, self.name = server_url, name
        self.loop = asyncio.new_event_loop()
        self.run(self._create(template))

    def run(self, coroutine: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coroutine)

    async def _admin(self, statement: str) -> None:
        conn = await asyncpg.connect(self.server_url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    async def _create(self, template: str) -> None:
        await self._admin(f"DROP DATABASE IF EXISTS {quote_ident(self.name)} WITH (FORCE)")
        await self._admin(f"CREATE DATABASE {quote_ident(self.name)} TEMPLATE {quote_ident(template)}")
        self.pool = await create_pool(database_url_for(self.server_url, self.name), min_size=1, max_size=4)

    def start_group_commit(self, store: EventStore) -> None:
        async def start() -> None:
            store.start_group_commit()  # its writer task needs the running loop

        self.run(start())

    def close(self, store: EventStore | None = None) -> None:
        async def shut() -> None:
            if store is not None:
                await store.stop_group_commit()
            await self.pool.close()
            await self._admin(f"DROP DATABASE IF EXISTS {quote_ident(self.name)} WITH (FORCE)")

        self.run(shut())
        self.loop.close()


class Api:
    """An HTTP client with one key per role and the app's manual clock."""

    def __init__(self, client: TestClient, clock: ManualClock, keys: dict[str, str]) -> None:
        self.client = client
        self.clock = clock
        self.keys = keys
        self.app = client.server.app

    @property
    def ledger(self):
        return self.app[LEDGER]

    def headers(self, role: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}", **extra}

    async def post(self, path: str, body=None, role: str = "checkout", **headers: str):
        response = await self.client.post(path, json=body if body is not None else {}, headers=self.headers(role, **headers))
        return response.status, await response.json(content_type=None), response

    async def get(self, path: str, role: str = "admin", **params):
        response = await self.client.get(path, params=params, headers=self.headers(role))
        return response.status, await response.json(content_type=None), response

    async def enrol(self, member_id: str, **body):
        status, answer, _ = await self.post("/v1/members", {"member_id": member_id, **body})
        assert status == 201, answer
        return answer

    async def purchase(self, member_id: str, purchase_id: str, amount_cents: int, **body):
        return await self.post(
            f"/v1/members/{member_id}/purchases",
            {"purchase_id": purchase_id, "store_id": "s1", "amount_cents": amount_cents, **body},
        )

    async def head(self) -> int:
        return (await self.ledger.store.head())[0]


@asynccontextmanager
async def running_api(pool, programme: Programme | None = None, start: datetime = TUESDAY, settings: Settings | None = None):
    clock = ManualClock(start)
    app = create_app(pool, programme or Programme(), clock, settings or Settings(rate_limit_per_s=None))
    async with TestClient(TestServer(app)) as client:
        keys = {}
        for role in ("checkout", "reader", "auditor", "admin"):
            created = await app[KEYS].create(f"test-{role}", role, "tests")
            keys[role] = created["key"]
        yield Api(client, clock, keys)

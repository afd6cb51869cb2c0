"""``loyalty serve`` with one change applied, for the one-change-at-a-time experiments.

    python -m bench.variant VARIANT      (then as `loyalty serve`: env DATABASE_URL, LOYALTY_PORT, ...)

Variants (each a patch applied before the service starts, nothing else):

- ``default``: the service as shipped (uvloop, asyncpg's statement cache, no reset query on release, GC tuned);
- ``asyncio``: the standard library's event loop instead of uvloop;
- ``no_statement_cache``: asyncpg's ``statement_cache_size=0``: every query parsed and planned
  again (what "no prepared statements" costs; asyncpg prepares and caches by default);
- ``full_reset``: asyncpg's own reset query on every release to the pool
  (``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``) instead of
  ``ledger.database._keep_session``;
- ``reuse_port``: the listening socket with SO_REUSEPORT, so that several processes share the port;
- ``default_gc``: Python's own collector thresholds (700, 10, 10) and nothing frozen, instead of
  ``service.tune_garbage_collector``.
"""

from __future__ import annotations

import asyncio
import sys
import types


def apply(variant: str) -> None:
    import service
    from ledger import database

    if variant == "default":
        return
    if variant == "asyncio":
        service.uvloop = types.SimpleNamespace(run=asyncio.run)
        return
    if variant == "no_statement_cache":
        async def create_pool(url: str, *, min_size: int = 2, max_size: int = 10):
            import asyncpg

            return await asyncpg.create_pool(
                url, min_size=min_size, max_size=max_size, init=database._init_connection,
                reset=database._keep_session, statement_cache_size=0,
                server_settings={"statement_timeout": "30s", "application_name": "loyalty"}, command_timeout=40,
            )

        database.create_pool = create_pool
        return
    if variant == "full_reset":
        async def full_reset(conn) -> None:
            await conn.execute(conn.get_reset_query())

        database._keep_session = full_reset
        return
    if variant == "default_gc":
        service.tune_garbage_collector = lambda: None
        return
    if variant == "reuse_port":
        from aiohttp import web

        class ReusePortSite(web.TCPSite):
            def __init__(self, *args, **kwargs) -> None:
                kwargs["reuse_port"] = True
                super().__init__(*args, **kwargs)

        web.TCPSite = ReusePortSite  # type: ignore[misc]
        return
    raise SystemExit(f"unknown variant {variant!r}")


if __name__ == "__main__":
    apply(sys.argv[1])
    import service

    sys.exit(service.main(["serve"]))

"""Who may call: roles, the API key ring (stored hashed) and per-key rate limits."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal, get_args

from aiohttp import web

from api.problems import HttpProblem
from ledger.application import new_id
from ledger.clock import Clock
from ledger.settings import Settings

log = logging.getLogger("loyalty.service")
audit_log = logging.getLogger("loyalty.audit")

Role = Literal["checkout", "reader", "auditor", "admin"]
ROLES: tuple[str, ...] = get_args(Role)
CHECKOUT = frozenset({"checkout", "admin"})
READER = frozenset({"reader", "auditor", "admin"})
MEMBER_READER = READER | {"checkout"}
AUDITOR = frozenset({"auditor", "admin"})
ADMIN = frozenset({"admin"})

KEYS = web.AppKey("keys", "KeyRing")
PRINCIPAL = web.RequestKey("principal", "Principal")


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class Principal:
    key_id: str
    name: str
    role: str


@dataclass
class KeyRing:
    """API keys, stored hashed; looked up by hash and compared in constant time."""

    pool: Any
    settings: Settings
    clock: Clock
    # By the secret as sent, not by its hash: a cached key costs a dict lookup, not a SHA-256 per request.
    _cache: dict[str, tuple[Principal | None, float]] = field(default_factory=dict)
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    CACHE_SECONDS = 30.0  # a revoked key may still be accepted this long after its revocation
    CACHE_KEYS_MAX = 10_000

    async def authenticate(self, secret: str) -> Principal | None:
        cached = self._cache.get(secret)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        digest = hash_key(secret)
        row = await self.pool.fetchrow(
            "SELECT key_id, key_hash, name, role FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL", digest
        )
        principal = None
        if row is not None and hmac.compare_digest(row["key_hash"].strip(), digest):
            principal = Principal(row["key_id"], row["name"], row["role"])
        if len(self._cache) >= self.CACHE_KEYS_MAX:
            self._cache.clear()
        self._cache[secret] = (principal, now + self.CACHE_SECONDS)
        return principal

    async def create(self, name: str, role: str, created_by: str | None, secret: str | None = None) -> dict[str, Any]:
        """A new key (``secret`` given: that one, as LOYALTY_ADMIN_KEY at every start); an existing secret is kept as it is."""
        secret = secret or f"lk_{secrets.token_urlsafe(32)}"
        digest = hash_key(secret)
        key_id = await self.pool.fetchval(
            """INSERT INTO api_keys (key_id, key_hash, name, role, created_by) VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (key_hash) DO NOTHING RETURNING key_id""",
            new_id("key"), digest, name, role, created_by,
        )
        if key_id is None:  # a given secret that is a key already (a restart with the same LOYALTY_ADMIN_KEY)
            row = await self.pool.fetchrow("SELECT key_id, name, role FROM api_keys WHERE key_hash = $1", digest)
            log.info("api key %s (%s, role %s) exists already; not created again", row["key_id"], row["name"], row["role"])
            return {"key": secret, "key_id": row["key_id"], "name": row["name"], "role": row["role"]}
        log.info("api key %s (%s, role %s) created by %s", key_id, name, role, created_by or "the command line")
        return {"key": secret, "key_id": key_id, "name": name, "role": role}

    def take_token(self, key_id: str) -> float | None:
        """Per-key token bucket; returns the seconds to wait when empty."""
        rate = self.settings.rate_limit_per_s
        if rate is None:
            return None
        now = time.monotonic()
        tokens, last = self._buckets.get(key_id, (self.settings.rate_burst, now))
        tokens = min(self.settings.rate_burst, tokens + (now - last) * rate)
        if tokens < 1:
            self._buckets[key_id] = (tokens, now)
            return (1 - tokens) / rate
        self._buckets[key_id] = (tokens - 1, now)
        return None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def allow(roles: frozenset[str]) -> Callable[[Handler], Handler]:
    """Require a bearer key with one of ``roles`` (401 without, 403 with another)."""

    def wrap(handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            header = request.headers.get("Authorization", "")
            scheme, _, secret = header.partition(" ")
            if scheme.lower() != "bearer" or not secret:
                raise HttpProblem(401, "unauthorized", "send Authorization: Bearer <key>",
                                  {"WWW-Authenticate": "Bearer"})
            keys: KeyRing = request.app[KEYS]
            principal = await keys.authenticate(secret.strip())
            if principal is None:
                raise HttpProblem(401, "unauthorized", "the API key is unknown or revoked", {"WWW-Authenticate": "Bearer"})
            if principal.role not in roles:
                raise HttpProblem(403, "forbidden", f"role {principal.role} may not do this; it needs one of {sorted(roles)}")
            wait_s = keys.take_token(principal.key_id)
            if wait_s is not None:
                raise HttpProblem(429, "rate_limited", "too many requests for this key; slow down",
                                  {"Retry-After": str(max(1, int(wait_s + 0.999)))})
            request[PRINCIPAL] = principal
            if principal.role == "admin" and request.method != "GET":
                # Who did an admin action (rebuilds and key creation append no event to say so).
                audit_log.info("%s %s by %s (key %s)", request.method, request.path_qs, principal.name, principal.key_id)
            return await handler(request)

        guarded.roles = roles  # type: ignore[attr-defined]
        return guarded

    return wrap

"""The process's settings: the one place that reads the environment.

``Settings.from_env`` reads every ``LOYALTY_*`` variable and ``DATABASE_URL``
once, at start, and refuses a value that cannot work (``SettingsError``, with
the variable named): ``loyalty`` then exits 2 with that message before it
touches the database, instead of failing on every request later (a rate
limit of 0 divided by zero on each one). Everything else takes a
``Settings`` or the values in it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

DEFAULT_RATE_LIMIT_PER_S = 200.0
RATE_BURST_FACTOR = 2  # a key may send this many seconds' worth of requests at once
CACHE_EVENTS_MAX = 300_000  # see ledger/application.py: about 150 MB of member states
PORT_MAX = 65_535
IDEMPOTENCY_DAYS = 7  # how long an Idempotency-Key's first answer is kept (README, Exactly once)


class SettingsError(ValueError):
    """A setting that cannot work; the message names the variable and what it accepts."""


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None  # None: the embedded PostgreSQL under ./.loyalty/
    programme_path: str | None = None  # None: the programme's defaults
    host: str = "127.0.0.1"
    port: int = 8080
    rate_limit_per_s: float | None = DEFAULT_RATE_LIMIT_PER_S  # per key; None: off
    rate_burst: float = RATE_BURST_FACTOR * DEFAULT_RATE_LIMIT_PER_S
    scheduler: bool = True
    projectors: bool = True
    admin_key: str | None = None
    request_deadline_s: float = 10.0  # every bounded request answers within this (503 after)
    keepalive_s: float = 15.0  # idle connections, and request heads that never finish, are closed after this
    cache_events_max: int = CACHE_EVENTS_MAX
    idempotency_days: int = IDEMPOTENCY_DAYS
    log_level: str = "INFO"
    nats_url: str | None = None  # None: no publication to NATS JetStream (CONTRACT §7)
    publisher: bool = True  # serve runs a publisher (one leads across processes) when nats_url is set

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = _Environment(os.environ if environ is None else environ)
        rate_limit_per_s = env.positive_number_or_off("LOYALTY_RATE_LIMIT", DEFAULT_RATE_LIMIT_PER_S)
        return cls(
            database_url=env.text("DATABASE_URL"),
            programme_path=env.text("LOYALTY_PROGRAMME"),
            host=env.text("LOYALTY_HOST") or "127.0.0.1",
            port=env.integer("LOYALTY_PORT", 8080, low=1, high=PORT_MAX),
            rate_limit_per_s=rate_limit_per_s,
            rate_burst=RATE_BURST_FACTOR * rate_limit_per_s if rate_limit_per_s is not None else 0.0,
            scheduler=env.switch("LOYALTY_SCHEDULER"),
            projectors=env.switch("LOYALTY_PROJECTORS"),
            admin_key=env.text("LOYALTY_ADMIN_KEY"),
            request_deadline_s=env.positive_number("LOYALTY_REQUEST_DEADLINE_S", 10.0),
            keepalive_s=env.positive_number("LOYALTY_KEEPALIVE_S", 15.0),
            cache_events_max=env.integer("LOYALTY_CACHE_EVENTS", CACHE_EVENTS_MAX, low=1, high=10**9),
            idempotency_days=env.integer("LOYALTY_IDEMPOTENCY_DAYS", IDEMPOTENCY_DAYS, low=1, high=36_500),
            log_level=env.log_level("LOYALTY_LOG_LEVEL", "INFO"),
            nats_url=env.text("LOYALTY_NATS_URL"),
            publisher=env.switch("LOYALTY_PUBLISHER"),
        )


class _Environment:
    """Typed reads of the environment; each refusal names the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ

    def text(self, name: str) -> str | None:
        return self.environ.get(name) or None

    def switch(self, name: str) -> bool:
        value = self.environ.get(name, "on").strip().lower()
        if value not in ("on", "off"):
            raise SettingsError(f"{name}={value!r}: use on or off")
        return value == "on"

    def _converted(self, name: str, default: Any, convert: Callable[[str], Any], needed: str) -> Any:
        raw = self.environ.get(name)
        if raw is None:
            return default
        try:
            return convert(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r}: {needed} is needed") from None

    def positive_number(self, name: str, default: float) -> float:
        value = self._converted(name, default, float, "a number")
        if not 0 < value < float("inf"):  # nan fails this too
            raise SettingsError(f"{name}={self.environ[name]!r}: it must be greater than 0")
        return value

    def positive_number_or_off(self, name: str, default: float) -> float | None:
        if self.environ.get(name, "").strip().lower() == "off":
            return None
        return self.positive_number(name, default)

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self._converted(name, default, int, "a whole number")
        if not low <= value <= high:
            raise SettingsError(f"{name}={self.environ[name]!r}: it must be within {low}..{high}")
        return value

    def log_level(self, name: str, default: str) -> str:
        level = self.environ.get(name, default).strip().upper()
        if not isinstance(logging.getLevelName(level), int):
            raise SettingsError(f"{name}={level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

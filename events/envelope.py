"""The envelope every stored event travels in (CONTRACT §3)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec


class Envelope(msgspec.Struct, kw_only=True, frozen=True):
    position: int
    stream_id: str
    stream_version: int
    type: str
    schema_version: int
    occurred_at: datetime
    recorded_at: datetime
    command_id: str | None
    actor: str | None
    programme_version: int | None
    data: dict[str, Any]
    hash: str

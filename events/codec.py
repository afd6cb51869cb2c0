"""Encoding of event data, the canonical bytes the hash chain covers, and time.

One canonical form: JSON with sorted keys, no whitespace, integers only,
timestamps as RFC 3339 UTC (``Z``). It is computed from the decoded stored
row, so a verifier re-derives exactly the bytes the writer hashed.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any

import msgspec

from events.catalogue import EVENT_TYPES, AnyEvent, Event, event_type
from events.upcasting import upcast

GENESIS_HASH = "0" * 64

_canonical_encoder = msgspec.json.Encoder(order="sorted")
_encoder = msgspec.json.Encoder()


def to_data(event: Event) -> dict[str, Any]:
    """The envelope's ``data`` of an event: its fields, without the tag."""
    data = msgspec.to_builtins(event)
    if type(event).__struct_config__.tag is not None:  # an untagged event's "type" is its own field
        del data["type"]
    return data


def from_data(type_name: str, schema_version: int, data: dict[str, Any]) -> AnyEvent:
    """Decode stored data (upcast to the current version) into its struct."""
    struct = EVENT_TYPES.get(type_name)
    if struct is None:
        raise LookupError(f"unknown event type {type_name!r}")
    lifted = upcast(type_name, schema_version, data)
    # Into the concrete struct, not the tagged union AnyEvent: converting to a
    # typing.Union hashes the alias on every call, about 40 times slower, and
    # every fold and projection goes through here (bench/README.md).
    return msgspec.convert(lifted, struct)


def rfc3339(moment: datetime) -> str:
    return msgspec.to_builtins(moment.astimezone(timezone.utc))


def parse_time(text: str) -> datetime:
    moment = msgspec.convert(text, datetime)
    if moment.tzinfo is None:
        raise ValueError("timestamp needs a UTC offset")
    return moment.astimezone(timezone.utc)


def canonical_bytes(
    *,
    position: int,
    stream_id: str,
    stream_version: int,
    type: str,
    schema_version: int,
    occurred_at: datetime,
    recorded_at: datetime,
    command_id: str | None,
    actor: str | None,
    programme_version: int | None,
    data: dict[str, Any],
) -> bytes:
    """The bytes one event contributes to the hash chain."""
    return _canonical_encoder.encode(
        {
            "position": position,
            "stream_id": stream_id,
            "stream_version": stream_version,
            "type": type,
            "schema_version": schema_version,
            "occurred_at": rfc3339(occurred_at),
            "recorded_at": rfc3339(recorded_at),
            "command_id": command_id,
            "actor": actor,
            "programme_version": programme_version,
            "data": data,
        }
    )


def chain_hash(previous_hash: str, canonical: bytes) -> str:
    """SHA-256 over the previous event's hash and this event's canonical bytes."""
    return hashlib.sha256(bytes.fromhex(previous_hash) + canonical).hexdigest()


def encode_json(value: Any) -> bytes:
    return _encoder.encode(value)


__all__ = [
    "GENESIS_HASH",
    "canonical_bytes",
    "chain_hash",
    "encode_json",
    "event_type",
    "from_data",
    "parse_time",
    "rfc3339",
    "to_data",
]

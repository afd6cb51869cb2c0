"""Schema versions and upcasters.

Stored events are never rewritten. When an event's data shape changes, its
``CURRENT_VERSIONS`` entry goes up and an upcaster lifts older stored data to
the new shape on read. The hash chain always covers the stored bytes, so
upcasting never affects verification.
"""

from __future__ import annotations

from typing import Any, Callable

Data = dict[str, Any]
Upcaster = Callable[[Data], Data]

# Version 0 is the pre-release shape some early imports carry (see
# tests/fixtures); version 1 is the first published catalogue.
CURRENT_VERSIONS: dict[str, int] = {}
DEFAULT_VERSION = 1

_UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def current_version(event_type: str) -> int:
    return CURRENT_VERSIONS.get(event_type, DEFAULT_VERSION)


def upcaster(event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register a function that lifts ``event_type`` data by one version."""

    def register(function: Upcaster) -> Upcaster:
        _UPCASTERS[(event_type, from_version)] = function
        return function

    return register


def upcast(event_type: str, schema_version: int, data: Data) -> Data:
    """Lift stored data to the current version of its type, one step at a time."""
    target = current_version(event_type)
    while schema_version < target:
        step = _UPCASTERS.get((event_type, schema_version))
        if step is None:
            raise LookupError(f"no upcaster for {event_type} v{schema_version}")
        data = step(data)
        schema_version += 1
    return data


@upcaster("purchase_recorded", 0)
def _purchase_amount_yuan_to_cents(data: Data) -> Data:
    """v0 stored ``amount`` as a decimal string of yuan ("258.00")."""
    lifted = {k: v for k, v in data.items() if k != "amount"}
    yuan, _, fen = str(data["amount"]).partition(".")
    lifted["amount_cents"] = int(yuan) * 100 + int((fen + "00")[:2])
    return lifted

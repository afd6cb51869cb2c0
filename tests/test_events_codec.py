"""The codec: every event type round-trips, the hash is deterministic, v0 data upcasts."""

from __future__ import annotations

import types
import typing
from datetime import datetime, timezone

import msgspec

from hypothesis import given, settings
from hypothesis import strategies as st

from events.catalogue import EVENT_TYPES, AnyEvent, event_type
from events.codec import GENESIS_HASH, canonical_bytes, chain_hash, from_data, to_data
from events.upcasting import upcast

times = st.datetimes(timezones=st.just(timezone.utc))
ids = st.text(alphabet="abcXYZ019._:-", min_size=1, max_size=64)
amounts = st.integers(min_value=-(10**11), max_value=10**11)


def strategy_for(hint):
    """Values of a field's type as a stored event may hold them: UTC times, bounded ints."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is datetime:
        return times
    if hint is int:
        return amounts
    if hint is str:
        return st.text(max_size=30)
    if origin is dict:  # programme settings, campaign conditions: JSON objects
        json_values = st.one_of(st.none(), st.booleans(), amounts, st.text(max_size=10))
        return st.dictionaries(st.text(max_size=10), json_values, max_size=4)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(strategy_for(arg) for arg in args))
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=4)
    if hint is type(None):
        return st.none()
    if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
        return structs(hint)
    raise NotImplementedError(hint)


def structs(cls):
    hints = typing.get_type_hints(cls)
    return st.builds(cls, **{name: strategy_for(hints[name]) for name in cls.__struct_fields__})


any_event = st.sampled_from(sorted(EVENT_TYPES)).flatmap(lambda name: structs(EVENT_TYPES[name]))


@settings(max_examples=300, deadline=None)
@given(any_event)
def test_every_event_type_round_trips_through_data(event):
    name = event_type(event)
    assert from_data(name, 1, to_data(event)) == event


@settings(max_examples=200, deadline=None)
@given(any_event, times, st.integers(1, 10**9))
def test_the_hash_is_deterministic_and_covers_the_data(event, moment, position):
    fields = dict(
        position=position, stream_id="m1", stream_version=1, type=event_type(event), schema_version=1,
        occurred_at=moment, recorded_at=moment, command_id=None, actor="till", programme_version=1,
        data=to_data(event),
    )
    first = chain_hash(GENESIS_HASH, canonical_bytes(**fields))
    assert first == chain_hash(GENESIS_HASH, canonical_bytes(**fields))
    # The data re-read from storage (a fresh dict, other key order) hashes the same.
    reread = dict(reversed(list(to_data(event).items())))
    assert chain_hash(GENESIS_HASH, canonical_bytes(**{**fields, "data": reread})) == first
    assert chain_hash(GENESIS_HASH, canonical_bytes(**{**fields, "position": position + 1})) != first
    assert chain_hash("f" * 64, canonical_bytes(**fields)) != first


def test_a_v0_purchase_is_upcast_to_cents():
    stored_v0 = {"purchase_id": "p1", "store_id": "s1", "amount": "258.5"}
    assert upcast("purchase_recorded", 0, stored_v0)["amount_cents"] == 25850
    event = from_data("purchase_recorded", 0, stored_v0)
    assert event.amount_cents == 25850 and event_type(event) == "purchase_recorded"


def test_the_catalogue_names_every_contract_event():
    contract = {
        "member_enrolled", "identity_linked", "purchase_recorded", "points_earned", "purchase_returned",
        "points_clawed_back", "points_redeemed", "redemption_reversed", "points_expired", "points_adjusted",
        "tier_changed", "coupon_issued", "coupon_redeemed", "coupon_redemption_reversed", "coupon_voided",
    }
    assert contract <= set(EVENT_TYPES)
    assert len(AnyEvent.__args__) == len(EVENT_TYPES)

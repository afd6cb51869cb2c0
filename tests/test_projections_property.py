"""Property: for random histories, projecting incrementally equals rebuilding from scratch, and the replay.

Random commands (late ones included) go through the real ``Ledger`` with a
manual clock; between them the projectors run in random small batches. At
the end every projection is rebuilt from position 0 into shadow tables and
swapped in: every table must hold the same rows as before, row for row.
Then the replay (the pure domain's fold over the log) must agree with the
projections now and as of earlier times, and every member must be listed in
exactly the segment ``ledger.views.rfm`` gives.

Each example gets a fresh database cloned from the schema template.
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cli.replay import replay
from ledger import views
from ledger.database import run_blocking
from projections import members
from tests.test_projections_support import PROGRAMME, START, Shop, all_rows, fresh_database, project_all, rebuild_all

# Few members and ids, small burns and much time passing: most random commands are then accepted.
MEMBERS = st.sampled_from(["m1", "m1", "m2", "m2", "m3"])  # m3 enrols late, if at all
AMOUNTS = st.one_of(st.sampled_from([999, 10_000, 25_800, 300_000, 600_000]), st.integers(1, 700_000))
DAYS_AGO = st.sampled_from([0, 0, 0, 1, 6, 29, 200, 380])
PURCHASES = st.sampled_from(["p1", "p2", "p3", "p4"])
REDEMPTIONS = st.sampled_from(["r1", "r2", "r3"])
COUPONS = st.sampled_from(["c1", "welcome-1", "welcome-3"])

PURCHASE = st.tuples(st.just("purchase"), MEMBERS, PURCHASES, AMOUNTS, DAYS_AGO)
# Returns and reversals name one of the member's own purchases or redemptions (the k-th, resolved when run).
RETURN = st.tuples(st.just("ret"), MEMBERS, st.sampled_from(["x1", "x2", "x3"]), st.integers(0, 3),
                   st.sampled_from([1, 30, 50, 100]), DAYS_AGO)
REDEEM = st.tuples(st.just("redeem"), MEMBERS, REDEMPTIONS, st.integers(1, 40), DAYS_AGO)
REVERSE = st.tuples(st.just("reverse"), MEMBERS, st.integers(0, 1), DAYS_AGO)
ADVANCE = st.tuples(st.just("advance"), st.sampled_from([1 / 24, 1, 8, 31, 200, 366]))
STEPS = st.one_of(
    PURCHASE, PURCHASE, RETURN, RETURN, REDEEM, REDEEM, REDEEM, REVERSE, REVERSE, ADVANCE, ADVANCE,
    st.tuples(st.just("enrol"), st.just("m3")),
    st.tuples(st.just("enrol_referred"), st.just("m3"), st.sampled_from(["m1", "m2"])),
    st.tuples(st.just("adjust"), MEMBERS, st.sampled_from(["a1", "a2", "a3"]),
              st.integers(-60, 300).filter(lambda points: points != 0)),
    st.tuples(st.just("buy_coupon"), MEMBERS, st.just("c1"), st.integers(1, 40)),
    st.tuples(st.just("redeem_coupon"), MEMBERS, COUPONS, AMOUNTS),
    st.tuples(st.just("reverse_coupon"), MEMBERS, COUPONS),
    st.tuples(st.just("job"), st.sampled_from(["expire", "tiers"])),
    st.tuples(st.just("activity"), MEMBERS, st.sampled_from(["t1", "t2", "t3", "t4"]),
              st.sampled_from(["check_in", "review", "profile_completed", "nope"]), DAYS_AGO),
    st.tuples(st.just("project"), st.integers(1, 15)),
)


async def _run(shop: Shop, step: tuple) -> None:
    name, *args = step
    if name == "ret":
        member_id, return_id, k, percent, days_ago = args
        purchases = list((await shop.ledger.load(member_id)).purchases.values())
        if purchases:
            purchase = purchases[k % len(purchases)]
            await shop.ret(member_id, return_id, purchase.purchase_id,
                           max(purchase.amount_cents * percent // 100, 1), days_ago)
    elif name == "reverse":
        member_id, k, days_ago = args
        redemptions = list((await shop.ledger.load(member_id)).redemptions)
        if redemptions:
            await shop.reverse(member_id, redemptions[k % len(redemptions)], days_ago)
    elif name == "advance":
        shop.clock.advance(days=args[0])
    elif name == "project":
        await project_all(shop.pool, PROGRAMME, batch_size=args[0])
    else:
        await getattr(shop, name)(*args)  # refusals are part of random histories


async def _check(server_url: str, template: str, history: list[tuple]) -> None:
    async with fresh_database(server_url, template) as pool:
        shop = Shop(pool, PROGRAMME)
        await shop.enrol("m1", birthday="01-20")
        await shop.enrol("m2")
        await project_all(pool, PROGRAMME, batch_size=3)
        for step in history:
            await _run(shop, step)
        await project_all(pool, PROGRAMME, batch_size=7)

        incremental = await all_rows(pool)
        await rebuild_all(pool, PROGRAMME, batch_size=11)
        assert await all_rows(pool) == incremental

        now = shop.clock()
        for as_of in (now, now - timedelta(days=30), START + timedelta(days=3)):
            report = await replay(pool, PROGRAMME, as_of)
            assert report.ok, "\n".join(report.mismatches)
            assert report.positions == dict.fromkeys(report.positions, await shop.head())

        listed = {}
        for lifecycle in views.LIFECYCLES:
            for row in await members.segment_page(pool, lifecycle, "", 1000, now, PROGRAMME):
                listed[row["member_id"]] = lifecycle
        for member_id in ("m1", "m2", "m3"):
            state = await shop.ledger.load(member_id)
            if state.enrolled:
                assert listed.pop(member_id) == views.rfm(state.purchases.values(), now, PROGRAMME).lifecycle
        assert listed == {}


# The paths random histories reach least often: a reversal into an expired bucket (restored and
# expired at once), a return that leaves debt, credits paying debt, late purchases, expiry, downgrade,
# a late burn of points already recorded as expired.
TRICKY = [
    ("purchase", "m1", "p1", 300_000, 200), ("purchase", "m1", "p2", 100_000, 350),
    ("redeem", "m1", "r1", 40, 0), ("redeem", "m1", "r2", 250, 0), ("project", 2),
    ("advance", 31), ("reverse", "m1", 0, 0), ("ret", "m1", "x1", 0, 100, 0),
    ("purchase", "m1", "p3", 100_000, 0), ("adjust", "m1", "a1", 200), ("job", "expire"), ("job", "tiers"),
    ("project", 3), ("advance", 366), ("job", "expire"), ("job", "tiers"), ("buy_coupon", "m2", "c1", 5),
    # A late burn of points the expire job had already written off (dated before expires_at).
    ("purchase", "m2", "p1", 100_000, 380), ("job", "expire"), ("project", 4), ("redeem", "m2", "r1", 30, 20),
    # Activities: points at once, one paying debt, a late one, a capped one.
    ("activity", "m1", "t1", "profile_completed", 0), ("activity", "m1", "t2", "check_in", 6),
    ("activity", "m1", "t3", "profile_completed", 0), ("project", 2),
    # A referral: the referee's first purchase rewards the referrer (another stream) in the same append.
    ("enrol_referred", "m3", "m1"), ("purchase", "m3", "p1", 25_800, 0), ("project", 3),
]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=st.lists(STEPS, min_size=15, max_size=40))
@example(history=TRICKY)
def test_incremental_projection_equals_a_rebuild_from_scratch_and_the_replay(
    database_server_url, template_database, history
):
    run_blocking(lambda: _check(database_server_url, template_database, history))

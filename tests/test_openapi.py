"""/openapi.json as integrators use it: every route described with its roles and typed answers, valid, and a
client generated from it works against the real service."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from openapi_spec_validator import validate

from api.app import create_app
from api.context import ROUTE_TABLE
from api.openapi import build_openapi
from ledger.programme import Programme
from ledger.settings import Settings
from tests.support import running_api


def served_and_documented():
    app = create_app(None, Programme(), settings=Settings(rate_limit_per_s=None))
    served = {(route.method, route.resource.canonical): getattr(route.handler, "roles", None)
              for route in app.router.routes() if route.method != "HEAD"}
    document = build_openapi(app[ROUTE_TABLE])  # what GET /openapi.json answers
    documented = {(method.upper(), path): frozenset(operation["x-roles"]) if "x-roles" in operation else None
                  for path, operations in document["paths"].items() for method, operation in operations.items()}
    return served, documented


def test_every_registered_route_is_documented_with_the_roles_it_enforces():
    served, documented = served_and_documented()
    assert served.keys() - documented.keys() == set(), "a route the document does not describe"
    assert documented.keys() - served.keys() == set(), "the document describes a route the application lacks"
    assert served == documented
    assert documented[("POST", "/v1/projections/{name}/rebuild")] == {"admin"}


# -- a body id that contradicts the path -------------------------------------------------------


@pytest.fixture
async def api(pool):
    async with running_api(pool) as api:
        await api.enrol("m1")  # the welcome pack: welcome-1..4
        yield api


async def test_a_body_id_that_contradicts_the_path_is_refused_and_appends_nothing(api):
    head = await api.head()
    path = "/v1/members/m1/coupons/welcome-1/redemption"
    status, problem, _ = await api.post(path, {"coupon_id": "welcome-2", "order_ref": "o1", "order_amount_cents": 12_000})
    assert (status, problem["code"], problem["field"]) == (422, "path_mismatch", "coupon_id"), problem
    status, problem, _ = await api.post("/v1/members/m1/redemptions/r9/reversal", {"redemption_id": "r8"})
    assert (status, problem["code"], problem["field"]) == (422, "path_mismatch", "redemption_id"), problem
    assert await api.head() == head
    status, coupon, _ = await api.post(path, {"coupon_id": "welcome-1", "order_ref": "o1", "order_amount_cents": 12_000})
    assert (status, coupon["coupon_id"], coupon["status"]) == (201, "welcome-1", "redeemed"), coupon


# -- an integrator's view: validated, then a client generated and used -------------------------


def generated_client(document: dict, directory: Path):
    """The package openapi-python-client generates from ``document``, imported."""
    (directory / "openapi.json").write_text(json.dumps(document), encoding="utf-8")
    tool = Path(sys.executable).parent / "openapi-python-client"
    env = {**os.environ, "PATH": f"{tool.parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # its ruff post-hook
    finished = subprocess.run([str(tool), "generate", "--path", "openapi.json", "--meta", "none",
                               "--output-path", "loyalty_client"], cwd=directory, env=env,
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    sys.path.insert(0, str(directory))
    try:
        return importlib.import_module("loyalty_client")
    finally:
        sys.path.remove(str(directory))


def test_a_client_generated_from_the_document_enrols_buys_redeems_reverses_and_reads_typed_answers(
        live_service, tmp_path):
    document = httpx.get(f"{live_service.url}/openapi.json", timeout=30).json()
    validate(document)  # openapi-spec-validator: the document an integrator's tools read

    loyalty = generated_client(document, tmp_path)
    from loyalty_client.api.default import (  # noqa: E402  (generated just now)
        coupon_redemption,
        create_api_key,
        enrol,
        get_balance,
        purchase,
        redemption,
        redemption_reversal,
    )
    from loyalty_client.models import (
        Balance,
        CouponAnswer,
        Enrol,
        EnrolAnswer,
        NewKey,
        NewKeyRole,
        Problem,
        PurchaseAnswer,
        RecordPurchase,
        Redeem,
        RedeemCoupon,
        RedemptionAnswer,
        ReversalAnswer,
        ReverseRedemption,
    )

    admin = loyalty.AuthenticatedClient(base_url=live_service.url, token=live_service.admin_key)
    created = create_api_key.sync(client=admin, body=NewKey(name="till-1", role=NewKeyRole.CHECKOUT))
    till = loyalty.AuthenticatedClient(base_url=live_service.url, token=created.key)
    member = "m-generated"
    bought_at = datetime.now(timezone.utc) - timedelta(days=8)  # past the pending days: its points are available

    enrolled = enrol.sync(client=till, body=Enrol(member_id=member, enrolled_at=bought_at))
    assert isinstance(enrolled, EnrolAnswer) and enrolled.member_id == member
    welcome = enrolled.coupons[0]
    bought = purchase.sync(member, client=till, body=RecordPurchase(
        purchase_id="p1", store_id="s1", amount_cents=258_000, occurred_at=bought_at))
    assert isinstance(bought, PurchaseAnswer) and bought.points > 0 and bought.position > 0

    refused = coupon_redemption.sync(member, welcome.coupon_id, client=till, body=RedeemCoupon(
        coupon_id="someone-else", order_ref="o1", order_amount_cents=welcome.min_spend_cents))
    assert isinstance(refused, Problem) and refused.code == "path_mismatch"
    coupon = coupon_redemption.sync(member, welcome.coupon_id, client=till, body=RedeemCoupon(
        order_ref="o1", order_amount_cents=welcome.min_spend_cents))
    assert isinstance(coupon, CouponAnswer) and coupon.status.value == "redeemed"

    redeemed = redemption.sync(member, client=till, body=Redeem(redemption_id="r1", points=10))
    assert isinstance(redeemed, RedemptionAnswer) and redeemed.available == bought.points - 10
    reversed_ = redemption_reversal.sync(member, "r1", client=till, body=ReverseRedemption())
    assert isinstance(reversed_, ReversalAnswer) and reversed_.points == 10

    balance = get_balance.sync(member, client=admin)
    assert isinstance(balance, Balance)
    assert (balance.available, balance.pending, balance.lifetime_earned) == (bought.points, 0, bought.points)
    assert isinstance(balance.as_of, datetime) and isinstance(coupon.valid_from, datetime)

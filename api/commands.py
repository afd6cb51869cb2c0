"""The command routes: one POST per operation, each running one command through the ledger."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from api.auth import ADMIN, CHECKOUT, PRINCIPAL, Handler, Principal
from api.context import LEDGER
from api.decoding import DRY_RUN, decode_command, idempotency_key, if_match, path_id
from api.problems import HttpProblem, outcome_response
from api.route import Route
from ledger import answers
from ledger import commands as cmd
from ledger.application import Outcome, new_id, request_hash


@dataclass(frozen=True)
class Operation:
    """One command endpoint: its name (also the batch ``op``), body and answer types, and path ids."""

    name: str
    method: str
    path: str
    body: type
    answer: Any
    roles: frozenset[str]
    path_fields: tuple[str, ...] = ()
    summary: str = ""
    in_batch: bool = True  # a line of POST /v1/batch may run it


OPERATIONS = [
    Operation("enrol", "POST", "/v1/members", cmd.Enrol, answers.EnrolAnswer, CHECKOUT, summary="Enrol a member"),
    Operation("purchase", "POST", "/v1/members/{member_id}/purchases", cmd.RecordPurchase, answers.PurchaseAnswer,
              CHECKOUT, summary="Record a purchase and earn points"),
    Operation("return", "POST", "/v1/members/{member_id}/returns", cmd.RecordReturn, answers.ReturnAnswer,
              CHECKOUT, summary="Return (part of) a purchase; claws points back"),
    Operation("redemption", "POST", "/v1/members/{member_id}/redemptions", cmd.Redeem, answers.RedemptionAnswer,
              CHECKOUT, summary="Burn points at checkout"),
    Operation("redemption_reversal", "POST", "/v1/members/{member_id}/redemptions/{redemption_id}/reversal",
              cmd.ReverseRedemption, answers.ReversalAnswer, CHECKOUT, ("redemption_id",),
              "Give back exactly the buckets a redemption took"),
    Operation("coupon_issue", "POST", "/v1/members/{member_id}/coupons", cmd.IssueCoupon, answers.CouponAnswer,
              CHECKOUT, summary="Issue a coupon (admin), or buy one with points_cost (checkout)"),
    Operation("coupon_redemption", "POST", "/v1/members/{member_id}/coupons/{coupon_id}/redemption",
              cmd.RedeemCoupon, answers.CouponAnswer, CHECKOUT, ("coupon_id",), "Redeem a coupon on an order"),
    Operation("coupon_redemption_reversal", "POST",
              "/v1/members/{member_id}/coupons/{coupon_id}/redemption/reversal",
              cmd.ReverseCouponRedemption, answers.CouponAnswer, CHECKOUT, ("coupon_id",),
              "Reverse a coupon redemption"),
    Operation("coupon_void", "POST", "/v1/members/{member_id}/coupons/{coupon_id}/void", cmd.VoidCoupon,
              answers.CouponAnswer, ADMIN, ("coupon_id",), "Void an issued coupon (admin)", in_batch=False),
    Operation("adjustment", "POST", "/v1/members/{member_id}/adjustments", cmd.Adjust, answers.AdjustmentAnswer,
              ADMIN, summary="Adjust points by hand (admin; reason required)"),
    Operation("activity", "POST", "/v1/members/{member_id}/activities", cmd.RecordActivity, answers.ActivityAnswer,
              CHECKOUT, summary="Record a growth task (check-in, review, ...): its points and growth"),
]
OPERATIONS_BY_NAME = {op.name: op for op in OPERATIONS}


def prepare_command(
    operation: Operation, member_id: str | None, command: cmd.Command, principal: Principal
) -> tuple[str, cmd.Command, str]:
    """The member, the command with its server-made ids, and the request's fingerprint."""
    if isinstance(command, cmd.IssueCoupon) and command.points_cost is None and principal.role != "admin":
        raise HttpProblem(403, "forbidden", "only admin issues coupons without points_cost")
    # Fingerprinted before the ids are made: a retry without them is the same request.
    fingerprint = request_hash(operation.name, member_id or "", command)
    if isinstance(command, cmd.Enrol):
        member_id = command.member_id or new_id("m")
        command = msgspec.structs.replace(command, member_id=member_id)
    if isinstance(command, cmd.IssueCoupon) and command.coupon_id is None:
        command = msgspec.structs.replace(command, coupon_id=new_id("c"))
    assert member_id is not None
    return member_id, command, fingerprint


async def run_operation(
    app: web.Application,
    operation: Operation,
    member_id: str | None,
    command: cmd.Command,
    principal: Principal,
    key: str | None,
    expected_version: int | None = None,
    dry_run: bool = False,
) -> Outcome:
    """Run one decoded HTTP command through the ledger."""
    member_id, command, fingerprint = prepare_command(operation, member_id, command, principal)
    outcome = await app[LEDGER].execute(
        operation.name,
        member_id,
        command,
        actor=principal.name,
        idempotency_key=key,
        expected_version=expected_version,
        fingerprint=fingerprint,
        dry_run=dry_run,
    )
    return outcome


def command_handler(operation: Operation) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        member_id = path_id(request, "member_id") if "{member_id}" in operation.path else None
        path_fields = {name: path_id(request, name) for name in operation.path_fields}
        command = await decode_command(request, operation.name, operation.body, member_id or "", **path_fields)
        outcome = await run_operation(
            request.app, operation, member_id, command, request[PRINCIPAL], idempotency_key(request),
            if_match(request), request[DRY_RUN],
        )
        return outcome_response(outcome)

    handle.operation = operation  # type: ignore[attr-defined]
    return handle


ROUTES = [
    Route(op.method, op.path, command_handler(op), op.roles, op.summary, status=201, body=op.body, answer=op.answer,
          headers=("Idempotency-Key", "If-Match"), errors=(400, 401, 403, 404, 408, 409, 412, 413, 415, 422, 429, 503),
          operation_id=op.name, dry_run=True)
    for op in OPERATIONS
]

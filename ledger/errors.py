"""Refusals: how a decision says no, with the contract's machine codes."""

from __future__ import annotations

from typing import Any


class Refusal(Exception):
    """A command the rules refuse. Nothing is appended."""

    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.extra = extra


class DuplicateCommand(Exception):
    """The command's natural id was used before on this member.

    The application answers with the first answer when the body is the same,
    else 409 ``duplicate_id``.
    """

    def __init__(self, natural_key: str) -> None:
        super().__init__(natural_key)
        self.natural_key = natural_key


def not_found(code: str, what: str) -> Refusal:
    return Refusal(404, code, f"{what} does not exist; check the id")


TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    412: "Precondition failed",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}


def problem(status: int, code: str, detail: str, **extra: Any) -> dict[str, Any]:
    """An RFC 9457 problem body with the contract's machine ``code``."""
    return {
        "type": f"https://loyalty-ledger.dev/problems/{code}",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }

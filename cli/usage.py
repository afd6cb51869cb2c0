"""What the command line refuses as the user's mistake: one line on standard error and exit 2, never a traceback.

argparse checks what it can while it parses (``time_argument`` here), and says
so with its usage line. What only running finds out (a named file that cannot
be read or parsed, a ``LOYALTY_PROGRAMME`` that cannot load) is a
``UsageError``, which ``cli.commands.run`` prints as
``loyalty <command>: <message>``.
"""

from __future__ import annotations

import argparse
import tomllib
from datetime import datetime, timezone
from typing import IO, Any

import msgspec

from events.codec import parse_time
from ledger.clock import as_of_problem

EXIT_USAGE = 2  # as argparse exits on a bad command line, and service.py on a bad setting


class UsageError(Exception):
    """A mistake in what the user gave; the message says what is wrong and what to do about it."""


def time_argument(text: str) -> datetime:
    """The argparse type of every time option: an RFC 3339 time with an offset, in the range the views reach."""
    try:
        moment = parse_time(text)
    except OverflowError:  # an offset carried it past year 1 or 9999 in UTC, so past any range allowed too
        moment = datetime.max.replace(tzinfo=timezone.utc)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an RFC 3339 time with an offset (e.g. 2025-01-31T00:00:00Z)") from None
    if (why := as_of_problem(moment)) is not None:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range: give a time that {why}")
    return moment


def open_file(path: str, mode: str = "rb", **options: Any) -> IO:
    """``open`` for a file the user named: one it cannot open is a ``UsageError`` naming it."""
    try:
        return open(path, mode, **options)
    except OSError as error:
        reading = "r" in mode
        doing, remedy = ("read", "give the path of a readable file") if reading else ("write", "give a writable path")
        raise UsageError(f"cannot {doing} {path} ({error.strerror}); {remedy}") from None


def read_file(path: str) -> bytes:
    with open_file(path) as file:
        return file.read()


def toml_file(path: str) -> dict[str, Any]:
    """The table a TOML file the user named holds; a file that is not UTF-8 TOML is a ``UsageError``."""
    try:
        return tomllib.loads(read_file(path).decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise UsageError(f"{path} is not valid TOML ({error}); correct the file") from None


def json_file(path: str, decoded_as: Any) -> Any:
    """A JSON file the user named, decoded as ``decoded_as``: a file that is not JSON at all is a ``UsageError``.

    JSON of the wrong shape stays a ``msgspec.ValidationError``, for the caller
    to refuse as the matching HTTP request would be refused.
    """
    try:
        return msgspec.json.decode(read_file(path), type=decoded_as)
    except msgspec.ValidationError:
        raise
    except msgspec.DecodeError as error:
        raise UsageError(f"{path} is not valid JSON ({error}); correct the file") from None

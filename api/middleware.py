"""Around every request: problems for every exception, a deadline, and the HTTP metrics."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Any, Coroutine, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from api.context import SETTINGS
from api.problems import Answered, HttpProblem, outcome_response, problem_response, unexpected_failure
from ledger.application import Ledger
from ledger.store import MAX_WAIT_MS, EventStore

log = logging.getLogger("loyalty.service")

METRICS = web.AppKey("metrics", "Metrics")
# The registered handlers of the routes that may answer from memory (Route.from_memory).
FROM_MEMORY = web.AppKey("from_memory", frozenset)

# Every request answers within Settings.request_deadline_s (LOYALTY_REQUEST_DEADLINE_S,
# default 10), whatever the database does; a long poll gets its wait on top.
# Long jobs (batch, verify, time jobs, rebuilds, simulations) are not bounded.
_UNBOUNDED_PATHS = ("/v1/batch", "/v1/audit/verify", "/v1/jobs/", "/v1/projections/", "/v1/simulations")

T = TypeVar("T")

# Labelled metric children kept per (method, route, status): prometheus_client's ``labels()`` takes a
# lock and builds a key on every call. Methods are whatever clients send, so the cache is bounded.
LABELLED_CHILDREN_MAX = 1_000


class Metrics:
    def __init__(self, ledger: Ledger) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "loyalty_http_requests_total", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "loyalty_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.registry.register(_AppendedEvents(ledger.store))
        # Set from the log at each scrape (api/health.py): every process's appends, not only this one's.
        self.head = Gauge("loyalty_log_head_position", "The log's head: its last position", registry=self.registry)
        # Read at scrape time. The cache fills up to its bound, then stays
        # there: RSS that grows with these is the cache, not a leak.
        Gauge("loyalty_member_cache_members", "Member states cached in this process",
              registry=self.registry).set_function(lambda: ledger.cached_members)
        Gauge("loyalty_member_cache_events", "Events folded into the cached member states (bounded by "
              "LOYALTY_CACHE_EVENTS)", registry=self.registry).set_function(lambda: ledger.cached_events)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: int, duration_s: float) -> None:
        """Count one answered request and its latency."""
        children = self._children.get((method, route, status))
        if children is None:
            children = self.requests.labels(method, route, str(status)), self.latency.labels(method, route)
            if len(self._children) >= LABELLED_CHILDREN_MAX:
                self._children.clear()
            self._children[method, route, status] = children
        children[0].inc()
        children[1].observe(duration_s)


class _AppendedEvents:
    """``loyalty_events_appended_total``: the events this process appended, read from the store at scrape time."""

    def __init__(self, store: EventStore) -> None:
        self.store = store

    def collect(self):
        yield CounterMetricFamily("loyalty_events_appended", "Events appended by this process",
                                  value=self.store.appended_events)


def route_name(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


@web.middleware
async def problems_and_metrics(request: web.Request, handler):
    metrics: Metrics = request.app[METRICS]
    started = time.perf_counter()
    try:
        in_place = request.match_info.handler in request.app[FROM_MEMORY]
        response = await bounded(handler(request), request_deadline_s(request), in_place)
    except HttpProblem as failure:
        response = problem_response(failure.status, failure.code, failure.detail, failure.headers, **failure.extra)
    except Answered as answered:
        response = outcome_response(answered.outcome)
    except web.HTTPException as http:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(http.status, "http_error")
        detail = {
            404: f"no route {request.path}; see /openapi.json",
            405: f"{request.method} is not allowed on {request.path}",
            413: "the body is larger than allowed (64 KiB; batch 8 MiB)",
        }.get(http.status, http.reason or "error")
        allow_header = {"Allow": http.headers["Allow"]} if "Allow" in http.headers else None  # RFC 9110 on 405
        response = problem_response(http.status, code, detail, allow_header)
    except RequestTimeout:
        log.warning("%s %s did not finish within its deadline: answered 503", request.method, request.path)
        response = problem_response(503, "request_timeout", "the request did not finish in time (the database is slow "
                                    "or unreachable); retry with the same Idempotency-Key", {"Retry-After": "1"})
    except Exception as failure:  # the last line of defence: a 5xx is never stored as an answer
        answer = unexpected_failure(failure, f"{request.method} {request.path}", reading=request.method == "GET")
        response = problem_response(answer.status, answer.code, answer.detail, answer.headers)
    metrics.observe(request.method, route_name(request), response.status, time.perf_counter() - started)
    return response


class RequestTimeout(Exception):
    pass


def request_deadline_s(request: web.Request) -> float | None:
    if request.path.startswith(_UNBOUNDED_PATHS):
        return None
    deadline_s = request.app[SETTINGS].request_deadline_s
    if request.path == "/v1/events":
        return deadline_s + MAX_WAIT_MS / 1000
    return deadline_s


async def bounded(work: Coroutine[Any, Any, T], deadline_s: float | None, first_step_in_place: bool = False) -> T:
    """``work``'s result, or RequestTimeout after ``deadline_s``.

    The work runs in a task of its own, raced against the deadline. With
    ``first_step_in_place`` its first step runs here, at once, and only work
    that suspends goes on in a task: a member read served from memory (its
    key's principal cached) ends in that step and costs no task, no timer and
    no extra turn of the loop. That step runs as part of the caller's task
    (``asyncio.current_task()``), so it must not enter a scope bound to the
    current task (``asyncio.timeout``, a ``TaskGroup``, asyncpg's
    ``pool.acquire(timeout=...)`` on Python 3.11): on expiry it would cancel
    the request instead of the work. Hence only for the routes that ask for it
    (``Route.from_memory``), whose paths have none.

    On time-out the work is cancelled but not waited for: asyncpg returns a
    connection cut off mid-query to its pool only after a cancel request that
    can itself hang on a silent database (tests/test_database_faults.py), so
    waiting for the cancellation would hold the answer just as long. A command
    that still commits after its 503 is found by the retry's Idempotency-Key.
    """
    if deadline_s is None:
        return await work
    if first_step_in_place:
        context = contextvars.copy_context()  # the task below runs the rest in the same context
        try:
            waiting_on = context.run(work.send, None)
        except StopIteration as finished:
            return finished.value
        task = asyncio.get_running_loop().create_task(_Resumed(work, waiting_on), context=context)
    else:
        task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=deadline_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_forget_result)
        raise RequestTimeout()
    return task.result()


_STARTED = object()


class _Resumed:
    """A coroutine whose first step ran by hand, for a task to drive on from where it suspended.

    The task's first step gets what the coroutine yielded (the future it waits on, or None for a
    bare yield) and waits on it as it would have; every later step, and a cancellation (thrown into
    the coroutine at its await), goes to the coroutine itself. It has ``send``, ``throw``, ``close``
    and ``__await__``, so asyncio takes it as a coroutine.
    """

    __slots__ = ("_coroutine", "_waiting_on")

    def __init__(self, coroutine: Coroutine[Any, Any, Any], waiting_on: Any) -> None:
        self._coroutine = coroutine
        self._waiting_on = waiting_on

    def send(self, value: Any) -> Any:
        if self._waiting_on is not _STARTED:
            waiting_on, self._waiting_on = self._waiting_on, _STARTED
            return waiting_on
        return self._coroutine.send(value)

    def throw(self, *exception: Any) -> Any:
        self._waiting_on = _STARTED
        return self._coroutine.throw(*exception)

    def close(self) -> None:
        self._coroutine.close()

    def __await__(self):
        return self

    def __next__(self) -> Any:
        return self.send(None)


def _forget_result(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved

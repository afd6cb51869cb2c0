"""The request deadline (api.middleware.bounded): work is raced against the deadline in a task of its own;
with its first step in place (the member reads), work that waits on nothing is answered in the caller's
task, and work that waits goes on in a task with its result, failures, context and cancellation as if it
had run in that task from the start."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from api.middleware import RequestTimeout, bounded

DEADLINE_S = 10.0
SHORT_DEADLINE_S = 0.01
GUARD_S = 5.0  # a test that waited for the abandoned work would hang: fail it instead
IN_PLACE = True

seen = contextvars.ContextVar("seen", default="unset")


async def test_work_that_waits_on_nothing_runs_in_the_callers_task():
    async def work():
        return asyncio.current_task()

    assert await bounded(work(), DEADLINE_S, IN_PLACE) is asyncio.current_task()


async def test_work_that_waits_is_finished_in_its_own_task_in_one_context():
    later = asyncio.get_running_loop().create_future()

    async def work():
        seen.set("before the wait")
        first = asyncio.current_task()
        value = await later
        return value, seen.get(), asyncio.current_task() is not first

    asyncio.get_running_loop().call_soon(later.set_result, 42)
    assert await bounded(work(), DEADLINE_S, IN_PLACE) == (42, "before the wait", True)
    assert seen.get() == "unset"  # the work's context is its own, as in a task


async def test_work_that_yields_bare_is_resumed():
    async def work():
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return "done"

    assert await bounded(work(), DEADLINE_S, IN_PLACE) == "done"


@pytest.mark.parametrize("waits_first", [False, True])
async def test_a_failure_of_the_work_is_raised_to_the_caller(waits_first):
    async def work():
        if waits_first:
            await asyncio.sleep(0)
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        await bounded(work(), DEADLINE_S, IN_PLACE)


async def test_work_past_its_deadline_is_cancelled_and_not_waited_for():
    cancelled, never = asyncio.Event(), asyncio.get_running_loop().create_future()

    async def work():
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            cancelled.set()
            await never  # a cancellation that hangs, as asyncpg's cancel request on a silent database

    with pytest.raises(RequestTimeout):
        await asyncio.wait_for(bounded(work(), SHORT_DEADLINE_S, IN_PLACE), GUARD_S)
    await asyncio.wait_for(cancelled.wait(), GUARD_S)
    never.set_result(None)


@pytest.mark.parametrize("task_stepped", [False, True])
async def test_cancelling_the_caller_cancels_the_work(task_stepped):
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def work():
        started.set()
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    caller = asyncio.ensure_future(bounded(work(), DEADLINE_S, IN_PLACE))
    await started.wait()  # the work's task is created, its first step not taken yet
    if task_stepped:
        await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.wait_for(cancelled.wait(), GUARD_S)


@pytest.mark.parametrize("first_step_in_place", [False, True])
async def test_the_work_fails_alone_past_a_timeout_it_sets_itself_after_its_first_wait(first_step_in_place):
    async def work():
        await asyncio.sleep(0)
        async with asyncio.timeout(SHORT_DEADLINE_S):  # bound to the work's own task
            await asyncio.get_running_loop().create_future()

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(bounded(work(), DEADLINE_S, first_step_in_place), GUARD_S)


async def test_work_not_in_place_runs_in_its_own_task_from_the_start():
    """As /readyz's probe does (asyncpg's ``pool.acquire(timeout=...)`` on Python 3.11): a timeout scope
    entered before the first wait must expire in the work's task, not in the request's."""

    async def work():
        async with asyncio.timeout(SHORT_DEADLINE_S):
            await asyncio.get_running_loop().create_future()

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(bounded(work(), DEADLINE_S), GUARD_S)

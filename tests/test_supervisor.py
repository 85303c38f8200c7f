"""Tests for the OTP-style supervisor: restarts, intensity, escalation and ordered teardown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from hermes_actors._errors import HermesError, RuntimeStopped
from hermes_actors.runtime._supervisor import (
    ChildAlreadyStarted,
    ChildInfo,
    ChildSpec,
    NoSuchChild,
    Supervisor,
    SupervisorEscalation,
)

Behaviour = Callable[[int], Awaitable[None]]


class Boom(Exception):
    """A child's crash."""


@attrs.define
class Journal:
    """What the children did, stamped with the virtual time."""

    events: list[tuple[float, str, str]] = attrs.field(factory=list)

    def add(self, name: str, event: str) -> None:
        self.events.append((trio.current_time(), name, event))

    def of(self, event: str) -> list[tuple[float, str]]:
        return [(at, name) for at, name, what in self.events if what == event]


async def worker(
    journal: Journal,
    name: str,
    behaviour: Behaviour,
    *,
    task_status: trio.TaskStatus[str],
) -> None:
    """A child: hands out `name#incarnation` as its handle, then runs `behaviour`."""
    incarnation = len([event for event in journal.events if event[1:] == (name, "started")])
    journal.add(name, "started")
    task_status.started(f"{name}#{incarnation}")
    try:
        await behaviour(incarnation)
    finally:
        journal.add(name, "ended")


def crash_after(seconds: float) -> Behaviour:
    async def behaviour(incarnation: int) -> None:
        await trio.sleep(seconds)
        raise Boom(f"crash of incarnation {incarnation}")

    return behaviour


def return_after(seconds: float) -> Behaviour:
    async def behaviour(incarnation: int) -> None:
        await trio.sleep(seconds)

    return behaviour


async def forever(incarnation: int) -> None:
    await trio.sleep_forever()


def slow_to_stop(seconds: float) -> Behaviour:
    """Runs until cancelled, then spends `seconds` in shielded cleanup (ignoring cancellation)."""

    async def behaviour(incarnation: int) -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(seconds)

    return behaviour


def spec(
    journal: Journal,
    name: str,
    behaviour: Behaviour,
    shutdown_s: float = 5.0,
) -> ChildSpec:
    return ChildSpec(
        name=name, start=partial(worker, journal, name, behaviour), shutdown_s=shutdown_s
    )


@attrs.define
class Outcome:
    error: BaseException | None = None
    at: float | None = None


async def run_recording(
    supervisor: Supervisor, outcome: Outcome, *, task_status: trio.TaskStatus[None]
) -> None:
    """Run the supervisor; record how and when `run` ended."""
    try:
        await supervisor.run(task_status=task_status)
    except SupervisorEscalation as exc:
        outcome.error = exc
        outcome.at = trio.current_time()
    except trio.Cancelled:
        outcome.at = trio.current_time()
        raise
    except BaseExceptionGroup as group:
        # A cancelled nursery inside `run` reports Cancelled in a group.
        outcome.at = trio.current_time()
        raise group


@asynccontextmanager
async def supervising(
    supervisor: Supervisor, outcome: Outcome | None = None, *, until_it_ends: bool = False
) -> AsyncIterator[None]:
    """Run `supervisor` while the block runs (recording how `run` ended in `outcome`, when
    given), then cancel it and wait for its teardown; `until_it_ends`: wait for `run` to end
    by itself (an escalation) instead."""
    async with trio.open_nursery() as nursery:
        if outcome is None:
            await nursery.start(supervisor.run)
        else:
            await nursery.start(run_recording, supervisor, outcome)
        yield
        if not until_it_ends:
            nursery.cancel_scope.cancel()


# Starting and looking up -----------------------------------------------------------------------


async def test_start_child_returns_handle_and_lists_children(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """start_child returns the started handle; lookups and the snapshot reflect the children."""
    journal = Journal()
    supervisor = Supervisor("root")
    async with supervising(supervisor):
        assert await supervisor.start_child(spec(journal, "a", forever)) == "a#0"
        assert await supervisor.start_child(spec(journal, "b", forever)) == "b#0"
        assert supervisor.child_handle("b") == "b#0"
        assert supervisor.which_children() == [
            ChildInfo(name="a", restarts=0, alive=True),
            ChildInfo(name="b", restarts=0, alive=True),
        ]
        with pytest.raises(ChildAlreadyStarted, match="'a'"):
            await supervisor.start_child(spec(journal, "a", forever))
        with pytest.raises(NoSuchChild):
            supervisor.child_handle("nope")
    assert journal.of("started") == [(0, "a"), (0, "b")]


async def test_start_child_requires_a_running_supervisor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """start_child before run raises RuntimeStopped, and so does it after shutdown."""
    journal = Journal()
    supervisor = Supervisor("root")
    with pytest.raises(RuntimeStopped, match="not running"):
        await supervisor.start_child(spec(journal, "a", forever))
    async with supervising(supervisor):
        pass
    with pytest.raises(RuntimeStopped):
        await supervisor.start_child(spec(journal, "a", forever))
    with pytest.raises(RuntimeError, match="already run"):
        await supervisor.run()
    assert journal.events == []


async def test_child_failing_before_started_raises_to_caller_and_is_forgotten(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A child that fails while starting raises to start_child, is not restarted or kept."""
    supervisor = Supervisor("root", max_restarts=0)
    attempts: list[float] = []

    async def broken(*, task_status: trio.TaskStatus[str]) -> None:
        attempts.append(trio.current_time())
        await trio.sleep(1)
        raise Boom("cannot start")

    async with supervising(supervisor):
        with pytest.raises(Boom, match="cannot start"):
            await supervisor.start_child(ChildSpec(name="x", start=broken))
        assert supervisor.which_children() == []
        # The name is free again and the failure did not use up the restart budget.
        await trio.sleep(5)
        journal = Journal()
        assert await supervisor.start_child(spec(journal, "x", forever)) == "x#0"
    assert attempts == [0]


async def test_cancelled_start_child_leaves_nothing_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancelling start_child while the child starts cancels the child and forgets it."""
    supervisor = Supervisor("root")
    ended: list[float] = []

    async def slow_starter(*, task_status: trio.TaskStatus[str]) -> None:
        try:
            await trio.sleep(10)
            task_status.started("late")
            await trio.sleep_forever()
        finally:
            ended.append(trio.current_time())

    async with supervising(supervisor):
        with trio.move_on_after(3):
            await supervisor.start_child(ChildSpec(name="slow", start=slow_starter))
        assert ended == [3]
        assert supervisor.which_children() == []


async def test_child_started_after_start_child_was_cancelled_dies_with_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A child that calls started() after its start_child was cancelled is not kept alive."""
    supervisor = Supervisor("root")
    ended: list[float] = []

    async def shielded_starter(*, task_status: trio.TaskStatus[str]) -> None:
        try:
            with trio.CancelScope(shield=True):
                await trio.sleep(5)
            task_status.started("too late")
            await trio.sleep_forever()
        finally:
            ended.append(trio.current_time())

    # A child wrongly shielded would never end: the virtual clock then jumps to this limit.
    with trio.fail_after(1000):
        async with supervising(supervisor):
            with trio.move_on_after(2):
                await supervisor.start_child(ChildSpec(name="late", start=shielded_starter))
            assert trio.current_time() == 5
            assert ended == [5]
            assert supervisor.which_children() == []


async def test_shutdown_cancels_a_child_still_starting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A shutdown during start_child stops that child and start_child raises RuntimeStopped."""
    supervisor = Supervisor("root")
    outcome = Outcome()
    ended: list[float] = []
    start_errors: list[tuple[float, BaseException]] = []

    async def slow_starter(*, task_status: trio.TaskStatus[str]) -> None:
        try:
            await trio.sleep(10)
            task_status.started("never")
        finally:
            ended.append(trio.current_time())

    async def starter() -> None:
        try:
            await supervisor.start_child(ChildSpec(name="slow", start=slow_starter))
        except RuntimeStopped as exc:
            start_errors.append((trio.current_time(), exc))

    async with trio.open_nursery() as nursery:
        supervisor_scope = trio.CancelScope()

        async def supervise(*, task_status: trio.TaskStatus[None]) -> None:
            with supervisor_scope:
                await run_recording(supervisor, outcome, task_status=task_status)

        await nursery.start(supervise)
        nursery.start_soon(starter)
        await trio.sleep(2)
        supervisor_scope.cancel()
    assert ended == [2]
    assert outcome.at == 2
    assert [at for at, _ in start_errors] == [2]
    assert "was starting" in str(start_errors[0][1])


# Restarts ----------------------------------------------------------------------------------------


async def test_crashed_child_is_restarted_with_a_new_handle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A crashing permanent child is restarted at once, with a new handle reported by callback."""
    journal = Journal()
    restarted: list[tuple[float, str, Any]] = []
    supervisor = Supervisor(
        "root",
        on_restarted=lambda name, handle: restarted.append((trio.current_time(), name, handle)),
    )
    behaviours = iter([crash_after(2), forever])

    async def crash_once(incarnation: int) -> None:
        await next(behaviours)(incarnation)

    async with supervising(supervisor):
        assert await supervisor.start_child(spec(journal, "w", crash_once)) == "w#0"
        await trio.sleep(5)
        assert supervisor.child_handle("w") == "w#1"
        assert supervisor.which_children() == [ChildInfo(name="w", restarts=1, alive=True)]
    assert restarted == [(2, "w", "w#1")]
    assert journal.of("started") == [(0, "w"), (2, "w")]


async def test_permanent_child_is_restarted_after_returning(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A permanent child that returns normally is restarted too."""
    journal = Journal()
    supervisor = Supervisor("root", max_restarts=10)
    async with supervising(supervisor):
        await supervisor.start_child(spec(journal, "p", return_after(3)))
        await trio.sleep(7)
        assert supervisor.child_handle("p") == "p#2"
    assert journal.of("started") == [(0, "p"), (3, "p"), (6, "p")]


async def test_crash_while_restarting_counts_and_is_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A restart whose start fails before started() is itself a crash and is retried."""
    supervisor = Supervisor("root", max_restarts=5)
    calls: list[float] = []

    async def flaky(*, task_status: trio.TaskStatus[int]) -> None:
        calls.append(trio.current_time())
        if len(calls) == 1:
            task_status.started(1)
            await trio.sleep(1)
            raise Boom("first incarnation dies")
        if len(calls) == 2:
            await trio.sleep(1)
            raise Boom("restart fails before started")
        task_status.started(len(calls))
        await trio.sleep_forever()

    async with supervising(supervisor):
        assert await supervisor.start_child(ChildSpec(name="f", start=flaky)) == 1
        await trio.sleep(5)
        assert supervisor.child_handle("f") == 3
        assert supervisor.which_children()[0].restarts == 2
    assert calls == [0, 1, 2]


# Intensity and escalation ------------------------------------------------------------------------


async def test_restart_intensity_exceeded_escalates_after_stopping_all_children(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The 4th crash within the period stops every child and raises SupervisorEscalation."""
    journal = Journal()
    outcome = Outcome()
    supervisor = Supervisor("root", max_restarts=3, period_s=5)
    async with supervising(supervisor, outcome, until_it_ends=True):
        await supervisor.start_child(spec(journal, "steady", forever))
        await supervisor.start_child(spec(journal, "flaky", crash_after(1)))
        await supervisor.start_child(spec(journal, "late", forever))
    assert outcome.at == 4
    assert isinstance(outcome.error, SupervisorEscalation)
    assert isinstance(outcome.error, HermesError)
    assert outcome.error.child == "flaky"
    assert isinstance(outcome.error.__cause__, Boom)
    assert str(outcome.error.__cause__) == "crash of incarnation 3"
    assert "more than 3 restart(s) within 5 s" in str(outcome.error)
    assert journal.of("started").count((0, "steady")) == 1
    assert [at for at, name in journal.of("started") if name == "flaky"] == [0, 1, 2, 3]
    # Everyone is stopped at the moment of escalation, the others in reverse start order.
    assert [event for event in journal.of("ended") if event[0] == 4] == [
        (4, "flaky"),
        (4, "late"),
        (4, "steady"),
    ]
    assert all(not info.alive for info in supervisor.which_children())


async def test_zero_restarts_escalates_on_first_crash(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With max_restarts=0 the first crash escalates."""
    journal = Journal()
    outcome = Outcome()
    supervisor = Supervisor("root", max_restarts=0)
    async with supervising(supervisor, outcome, until_it_ends=True):
        await supervisor.start_child(spec(journal, "once", crash_after(2.5)))
    assert outcome.at == 2.5
    assert isinstance(outcome.error, SupervisorEscalation)


async def test_escalation_with_normal_returns_has_no_cause(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Too many restarts of a permanent child that keeps returning escalate with no cause."""
    journal = Journal()
    outcome = Outcome()
    supervisor = Supervisor("root", max_restarts=2, period_s=10)
    async with supervising(supervisor, outcome, until_it_ends=True):
        await supervisor.start_child(spec(journal, "ret", return_after(1)))
    assert outcome.at == 3
    assert isinstance(outcome.error, SupervisorEscalation)
    assert outcome.error.__cause__ is None


async def test_escalation_propagates_out_of_run(autojump_clock: trio.testing.MockClock) -> None:
    """run itself raises SupervisorEscalation, not an exception group."""
    journal = Journal()
    supervisor = Supervisor("root", max_restarts=0)

    async def start_crasher() -> None:
        await supervisor.start_child(spec(journal, "c", crash_after(1)))

    async with trio.open_nursery() as nursery:
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(start_crasher)
        with pytest.raises(SupervisorEscalation):
            await supervisor.run()
    assert trio.current_time() == 1


@pytest.mark.parametrize(
    ("period_s", "escalated_at"),
    [(6.0, None), (6.5, 8.0)],
    ids=["restart-leaves-window-exactly", "window-holds-four"],
)
async def test_restart_window_slides(
    autojump_clock: trio.testing.MockClock, period_s: float, escalated_at: float | None
) -> None:
    """Restarts spread out over time leave the window; only a burst within it escalates."""
    journal = Journal()
    outcome = Outcome()
    supervisor = Supervisor("root", max_restarts=3, period_s=period_s)
    async with supervising(supervisor, outcome):
        await supervisor.start_child(spec(journal, "every2", crash_after(2)))
        await trio.sleep(29)
    assert outcome.at == (escalated_at if escalated_at is not None else 29)
    if escalated_at is None:
        assert outcome.error is None
        # Crashes at 2, 4, ..., 28: each one restarted.
        assert supervisor.which_children()[0].restarts == 14
    else:
        assert isinstance(outcome.error, SupervisorEscalation)


# Termination and cancellation ---------------------------------------------------------------------


async def test_child_swallowing_cancellation_is_not_restarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A child that catches its shutdown's cancellation and returns is neither restarted nor a
    crash."""
    journal = Journal()
    outcome = Outcome()
    supervisor = Supervisor("root", max_restarts=0)

    async def swallow(incarnation: int) -> None:
        with trio.CancelScope() as inner:
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                # Pretend nothing happened: end normally instead of propagating.
                inner.cancel()

    async with supervising(supervisor, outcome):
        await supervisor.start_child(spec(journal, "s", swallow))
        await trio.sleep(1)
    assert supervisor.which_children() == [ChildInfo(name="s", restarts=0, alive=False)]
    assert (outcome.error, outcome.at) == (None, 1)
    assert journal.of("started") == [(0, "s")]


async def test_shutdown_stops_children_in_reverse_start_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancelling run stops children one by one, last started first, waiting for each."""
    journal = Journal()
    outcome = Outcome()
    supervisor = Supervisor("root", max_restarts=0)
    async with supervising(supervisor, outcome):
        for name in ("first", "second", "third"):
            await supervisor.start_child(spec(journal, name, slow_to_stop(1)))
        await trio.sleep(10)
    assert journal.of("ended") == [(11, "third"), (12, "second"), (13, "first")]
    assert outcome.at == 13
    assert outcome.error is None


async def test_shutdown_moves_on_from_a_child_that_ignores_cancellation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A child still stopping after its shutdown_s is left behind; the next one is stopped."""
    journal = Journal()
    outcome = Outcome()
    supervisor = Supervisor("root")
    async with supervising(supervisor, outcome):
        await supervisor.start_child(spec(journal, "polite", forever))
        await supervisor.start_child(spec(journal, "stubborn", slow_to_stop(100), shutdown_s=2))
        await trio.sleep(10)
    assert journal.of("ended") == [(12, "polite"), (110, "stubborn")]
    # trio cannot abandon a task: run returns once the stubborn child has exited.
    assert outcome.at == 110


async def test_child_failing_while_stopping_does_not_break_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An error raised by a child during its shutdown is not a crash and the others still stop."""
    journal = Journal()
    outcome = Outcome()
    supervisor = Supervisor("root", max_restarts=0)

    async def fail_on_stop(incarnation: int) -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise Boom("cleanup failed")

    async with supervising(supervisor, outcome):
        await supervisor.start_child(spec(journal, "a", forever))
        await supervisor.start_child(spec(journal, "b", fail_on_stop))
        await trio.sleep(1)
    assert journal.of("ended") == [(1, "b"), (1, "a")]
    assert outcome.error is None
    assert [at for at, name in journal.of("started")] == [0, 0]


async def test_invalid_settings_are_refused() -> None:
    """Negative restart budgets, empty periods and unbounded shutdowns are refused."""
    with pytest.raises(ValueError, match="max_restarts"):
        Supervisor("x", max_restarts=-1)
    with pytest.raises(ValueError, match="period_s"):
        Supervisor("x", period_s=0)
    with pytest.raises(ValueError, match="shutdown_s"):
        ChildSpec(name="c", start=partial(worker, Journal(), "c", forever), shutdown_s=float("inf"))

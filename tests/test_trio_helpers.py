"""Tests for the general trio helpers: replies, calls, cleanup, group collapsing, portal hosts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import traceback
from functools import partial

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

from hermes_actors._errors import HermesError, RuntimeStopped, SandboxLost
from hermes_actors._trio import (
    PortalHost,
    Reply,
    bounded_cleanup,
    call,
    close_mailbox,
    collapse,
    collapse_exception_groups,
    fail_pending,
)


@attrs.frozen(kw_only=True)
class Ask:
    question: str
    reply: Reply[str]


async def make_cancelled() -> trio.Cancelled:
    """A real `trio.Cancelled`, as trio raises it (it has no public constructor)."""
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as exc:
            return exc
    raise AssertionError("the checkpoint was not cancelled")


def origin_of_failure() -> SandboxLost:
    try:
        raise SandboxLost("sb-1", "agent exited")
    except SandboxLost as exc:
        return exc


# Reply ------------------------------------------------------------------------------------


async def test_reply_set_then_wait_returns_value(autojump_clock: trio.testing.MockClock) -> None:
    """A value set before waiting is returned by wait, and the cell reports done."""
    reply: Reply[int] = Reply()
    assert not reply.done
    assert reply.set(7) is True
    assert reply.done
    assert await reply.wait() == 7
    assert not reply.abandoned


async def test_reply_wait_blocks_until_set(autojump_clock: trio.testing.MockClock) -> None:
    """wait blocks until the actor sets the value, then returns it."""
    reply: Reply[str] = Reply()
    woke_at: list[float] = []

    async def waiter() -> None:
        assert await reply.wait() == "slot"
        woke_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(3)
        assert reply.set("slot")
    assert woke_at == [3]


async def test_reply_fail_raises_same_error_with_original_traceback_each_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A failed cell raises its error on every wait, keeping the frames where it was raised."""
    error = origin_of_failure()
    reply: Reply[int] = Reply()
    assert reply.fail(error) is True
    frame_counts = []
    for _ in range(2):
        with pytest.raises(SandboxLost) as info:
            await reply.wait()
        assert info.value is error
        names = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
        assert "origin_of_failure" in names
        frame_counts.append(len(names))
    assert frame_counts[0] == frame_counts[1]


async def test_reply_second_resolution_is_a_noop_returning_false(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Once resolved, set and fail return False and the first resolution stands."""
    reply: Reply[int] = Reply()
    assert reply.set(1)
    assert reply.set(2) is False
    assert reply.fail(ValueError("late")) is False
    assert await reply.wait() == 1

    failed: Reply[int] = Reply()
    assert failed.fail(KeyError("first"))
    assert failed.set(3) is False
    with pytest.raises(KeyError, match="first"):
        await failed.wait()


async def test_reply_cancelled_waiter_with_value_ready_gives_it_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A waiter cancelled while a value is already set gives it back via on_abandoned once."""
    given_back: list[str] = []
    reply: Reply[str] = Reply(given_back.append)
    assert reply.set("slot-1")
    with trio.CancelScope() as scope:
        scope.cancel()
        await reply.wait()
    assert scope.cancelled_caught
    assert reply.abandoned
    assert given_back == ["slot-1"]
    reply.abandon()
    assert given_back == ["slot-1"]


async def test_reply_waiter_cancelled_after_set_before_it_runs_gives_value_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A waiter woken by set but cancelled before it runs gives the value back, not takes it."""
    given_back: list[str] = []
    reply: Reply[str] = Reply(given_back.append)
    results: list[str] = []
    scope = trio.CancelScope()

    async def waiter() -> None:
        with scope:
            results.append(await reply.wait())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        # Both happen before the waiter gets to run again: it was woken, then cancelled.
        assert reply.set("slot-2")
        scope.cancel()
    assert results == []
    assert scope.cancelled_caught
    assert reply.abandoned
    assert given_back == ["slot-2"]


async def test_reply_set_after_abandon_returns_false_without_callback(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A set that comes after the waiter gave up returns False and does not call back."""
    given_back: list[str] = []
    reply: Reply[str] = Reply(given_back.append)
    with trio.move_on_after(2):
        await reply.wait()
    assert trio.current_time() == 2
    assert reply.abandoned
    assert not reply.done
    assert reply.set("slot-3") is False
    assert reply.fail(RuntimeError("late")) is False
    assert given_back == []


async def test_reply_cancelled_after_fail_abandons_without_callback(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A waiter cancelled with an error waiting abandons the cell and nothing is given back."""
    given_back: list[str] = []
    reply: Reply[str] = Reply(given_back.append)
    assert reply.fail(ValueError("no"))
    with trio.CancelScope() as scope:
        scope.cancel()
        await reply.wait()
    assert scope.cancelled_caught
    assert reply.abandoned
    assert given_back == []


async def test_reply_taken_value_is_not_given_back_on_later_abandon(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After wait returned the value, a later cancelled wait gives nothing back."""
    given_back: list[int] = []
    reply: Reply[int] = Reply(given_back.append)
    reply.set(5)
    assert await reply.wait() == 5
    with trio.CancelScope() as scope:
        scope.cancel()
        await reply.wait()
    assert reply.abandoned
    assert given_back == []


async def test_reply_on_abandoned_error_is_logged_and_cancellation_still_propagates(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    """An on_abandoned that raises is logged; the caller's cancellation is not replaced."""

    def broken(value: int) -> None:
        raise RuntimeError(f"cannot take back {value}")

    reply: Reply[int] = Reply(broken)
    reply.set(9)
    with caplog.at_level(logging.ERROR), trio.CancelScope() as scope:
        scope.cancel()
        await reply.wait()
    assert scope.cancelled_caught
    assert "on_abandoned callback" in caplog.text
    assert "cannot take back 9" in caplog.text


# call ---------------------------------------------------------------------------------------


async def test_call_returns_actor_reply(autojump_clock: trio.testing.MockClock) -> None:
    """call delivers the message and returns what the actor set."""
    send, receive = trio.open_memory_channel[Ask](1)

    async def actor() -> None:
        async with receive:
            async for message in receive:
                message.reply.set(message.question.upper())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor)
        async with send:
            answer: str = await call(send, lambda reply: Ask(question="hi", reply=reply))
    assert answer == "HI"


async def test_call_raises_actor_error(autojump_clock: trio.testing.MockClock) -> None:
    """call raises the error the actor failed the reply with."""
    send, receive = trio.open_memory_channel[Ask](1)

    async def actor() -> None:
        message = await receive.receive()
        message.reply.fail(SandboxLost("sb-9", "gone"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor)
        with pytest.raises(SandboxLost, match="sb-9"):
            await call(send, lambda reply: Ask(question="q", reply=reply))


async def test_call_on_mailbox_closed_by_actor_raises_runtime_stopped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """call on a mailbox whose actor closed it raises RuntimeStopped."""
    send, receive = trio.open_memory_channel[Ask](1)
    receive.close()
    with pytest.raises(RuntimeStopped, match="mailbox is closed") as info:
        await call(send, lambda reply: Ask(question="q", reply=reply))
    assert isinstance(info.value.__cause__, trio.BrokenResourceError)


async def test_call_on_closed_send_channel_raises_runtime_stopped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """call on a send channel that was closed raises RuntimeStopped and abandons the reply."""
    send, _receive = trio.open_memory_channel[Ask](1)
    send.close()
    made: list[Reply[str]] = []

    def make(reply: Reply[str]) -> Ask:
        made.append(reply)
        return Ask(question="q", reply=reply)

    with pytest.raises(RuntimeStopped):
        await call(send, make)
    assert made[0].abandoned


async def test_call_cancelled_while_mailbox_full_sends_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A call cancelled while blocked on a full mailbox sends nothing and abandons its reply."""
    send, receive = trio.open_memory_channel[Ask](0)
    made: list[Reply[str]] = []

    def make(reply: Reply[str]) -> Ask:
        made.append(reply)
        return Ask(question="q", reply=reply)

    with trio.move_on_after(4):
        await call(send, make)
    assert trio.current_time() == 4
    assert made[0].abandoned
    with pytest.raises(trio.WouldBlock):
        receive.receive_nowait()


async def test_call_cancelled_after_actor_answered_gives_value_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A caller cancelled after the actor set its reply gives the value back via on_abandoned."""
    send, receive = trio.open_memory_channel[Ask](1)
    given_back: list[str] = []
    scope = trio.CancelScope()

    async def actor() -> None:
        message = await receive.receive()
        assert message.reply.set("lease")
        scope.cancel()

    async def caller() -> None:
        with scope:
            await call(
                send,
                lambda reply: Ask(question="q", reply=reply),
                on_abandoned=given_back.append,
            )
            raise AssertionError("the call returned a value to a cancelled caller")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller)
        nursery.start_soon(actor)
    assert given_back == ["lease"]


async def test_call_cancelled_before_actor_answers_makes_set_return_false(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A caller that times out first makes the actor's later set return False."""
    send, receive = trio.open_memory_channel[Ask](1)
    set_results: list[bool] = []

    async def slow_actor() -> None:
        message = await receive.receive()
        await trio.sleep(10)
        set_results.append(message.reply.set("late"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_actor)
        with trio.move_on_after(1):
            await call(send, lambda reply: Ask(question="q", reply=reply))
        assert trio.current_time() == 1
    assert set_results == [False]
    assert trio.current_time() == 10


# fail_pending / close_mailbox -------------------------------------------------------------------


async def test_fail_pending_fails_only_unresolved_replies_with_fresh_errors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """fail_pending fails each pending reply with its own error and leaves the others alone."""
    pending_a: Reply[int] = Reply()
    pending_b: Reply[int] = Reply()
    resolved: Reply[int] = Reply()
    resolved.set(1)
    abandoned: Reply[int] = Reply()
    abandoned.abandon()

    count = fail_pending(
        [pending_a, resolved, abandoned, pending_b],
        lambda: RuntimeStopped("actor stopped"),
    )
    assert count == 2
    errors = []
    for reply in (pending_a, pending_b):
        with pytest.raises(RuntimeStopped) as info:
            await reply.wait()
        errors.append(info.value)
    assert errors[0] is not errors[1]
    assert await resolved.wait() == 1
    assert not abandoned.done


async def test_close_mailbox_fails_queued_requests_and_refuses_new_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Closing a mailbox fails the replies of queued requests; later calls raise."""
    send, receive = trio.open_memory_channel[Ask](4)
    outcomes: list[str] = []

    async def caller(question: str) -> None:
        try:
            await call(send, lambda reply: Ask(question=question, reply=reply))
        except RuntimeStopped:
            outcomes.append(f"{question}: stopped")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller, "a")
        nursery.start_soon(caller, "b")
        await trio.testing.wait_all_tasks_blocked()
        failed = close_mailbox(
            receive, lambda message: [message.reply], lambda: RuntimeStopped("pool stopped")
        )
        assert failed == 2
    assert sorted(outcomes) == ["a: stopped", "b: stopped"]
    with pytest.raises(RuntimeStopped, match="mailbox is closed"):
        await call(send, lambda reply: Ask(question="c", reply=reply))


# bounded_cleanup -------------------------------------------------------------------------------


async def test_bounded_cleanup_graceful_in_time_skips_forceful(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A graceful cleanup that finishes within the limit returns True; forceful never runs."""
    forced: list[float] = []
    done = await bounded_cleanup(5, partial(trio.sleep, 2), lambda: forced.append(1))
    assert done is True
    assert trio.current_time() == 2
    assert forced == []


async def test_bounded_cleanup_runs_forceful_at_exact_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A graceful cleanup still running at the limit is cut off and forceful runs then."""
    forced_at: list[float] = []
    done = await bounded_cleanup(
        3, partial(trio.sleep, 100), lambda: forced_at.append(trio.current_time())
    )
    assert done is False
    assert forced_at == [3]
    assert trio.current_time() == 3


async def test_bounded_cleanup_graceful_error_is_logged_and_escalates(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    """A graceful cleanup that raises is logged and the forceful path runs immediately."""
    forced_at: list[float] = []

    async def graceful() -> None:
        await trio.sleep(1)
        raise OSError("pipe broke")

    with caplog.at_level(logging.ERROR):
        done = await bounded_cleanup(5, graceful, lambda: forced_at.append(trio.current_time()))
    assert done is False
    assert forced_at == [1]
    assert "pipe broke" in caplog.text


async def test_bounded_cleanup_is_shielded_from_outer_cancellation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An already cancelled caller still gets its cleanup run, up to the limit."""
    finished_at: list[float] = []

    async def graceful() -> None:
        await trio.sleep(2)
        finished_at.append(trio.current_time())

    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.sleep_forever()
        finally:
            assert await bounded_cleanup(5, graceful) is True
    assert finished_at == [2]

    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.sleep_forever()
        finally:
            assert await bounded_cleanup(3, trio.sleep_forever) is False
    assert trio.current_time() == 2 + 3


async def test_bounded_cleanup_forceful_error_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    """A forceful path that raises is logged, and the result is still False."""

    def forceful() -> None:
        raise ProcessLookupError("already gone")

    with caplog.at_level(logging.ERROR):
        assert await bounded_cleanup(1, partial(trio.sleep, 2), forceful) is False
    assert "already gone" in caplog.text
    assert trio.current_time() == 1


async def test_bounded_cleanup_runs_forceful_then_propagates_base_exceptions(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A KeyboardInterrupt in graceful runs the forceful path and propagates."""
    forced: list[bool] = []

    async def graceful() -> None:
        await trio.sleep(1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await bounded_cleanup(5, graceful, lambda: forced.append(True))
    assert forced == [True]


# collapse --------------------------------------------------------------------------------------


async def test_collapse_one_error_among_cancellations_wins(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One HermesError beside Cancelled leaves, even nested, collapses to that error."""
    error = HermesError("the one")
    group = BaseExceptionGroup(
        "outer",
        [await make_cancelled(), BaseExceptionGroup("inner", [error, await make_cancelled()])],
    )
    assert collapse(group) is error


async def test_collapse_same_error_object_twice_collapses_to_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The same exception object reached through two branches counts once."""
    error = ValueError("shared")
    group = ExceptionGroup("g", [error, ExceptionGroup("h", [error])])
    assert collapse(group) is error


async def test_collapse_only_cancellations_gives_the_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A group of only Cancelled leaves collapses to the first Cancelled."""
    first = await make_cancelled()
    group = BaseExceptionGroup("g", [first, await make_cancelled()])
    assert collapse(group) is first


async def test_collapse_keyboard_interrupts_give_the_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Several KeyboardInterrupts (with cancellations) collapse to the first of them."""
    first = KeyboardInterrupt()
    group = BaseExceptionGroup("g", [await make_cancelled(), first, KeyboardInterrupt()])
    assert collapse(group) is first


async def test_collapse_two_different_errors_keeps_the_group(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two different meaningful errors cannot be collapsed: the group is returned unchanged."""
    group = BaseExceptionGroup("g", [HermesError("a"), HermesError("b"), await make_cancelled()])
    assert collapse(group) is group
    mixed = BaseExceptionGroup("m", [KeyboardInterrupt(), ValueError("v")])
    assert collapse(mixed) is mixed


async def test_collapse_exception_groups_reraises_the_one_error_without_group_context(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An error from one task of a nursery escapes as itself, with its own cause intact."""

    async def fails() -> None:
        try:
            raise KeyError("root cause")
        except KeyError as exc:
            raise SandboxLost("sb-2", "stream closed") from exc

    async def run_collapsed() -> None:
        with collapse_exception_groups():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                nursery.start_soon(fails)

    with pytest.raises(SandboxLost) as info:
        await run_collapsed()
    assert isinstance(info.value.__cause__, KeyError)
    assert not isinstance(info.value.__context__, BaseExceptionGroup)


async def test_collapse_exception_groups_leaves_real_groups_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A group of two different errors escapes unchanged; no error means nothing happens."""

    async def fail_with(exc: Exception) -> None:
        raise exc

    async def run_collapsed() -> None:
        with collapse_exception_groups():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fail_with, ValueError("one"))
                nursery.start_soon(fail_with, KeyError("two"))

    with pytest.raises(ExceptionGroup) as info:
        await run_collapsed()
    assert len(info.value.exceptions) == 2

    with collapse_exception_groups():
        await trio.lowlevel.checkpoint()


async def test_collapse_exception_groups_lets_a_cancelled_nursery_be_caught(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A cancelled nursery's group collapses to Cancelled, which the cancel scope absorbs."""
    with trio.move_on_after(1) as scope, collapse_exception_groups():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            nursery.start_soon(trio.sleep_forever)
    assert scope.cancelled_caught
    assert trio.current_time() == 1


def test_clone_exception_is_a_fresh_equal_error() -> None:
    """A clone has the class, message and attributes of the original but is another object."""
    from hermes_actors._errors import SandboxLost
    from hermes_actors._trio import clone_exception

    original = SandboxLost("sb-1", "agent died")
    try:
        raise original
    except SandboxLost:
        pass
    clone = clone_exception(original)
    assert clone is not original
    assert type(clone) is SandboxLost
    assert str(clone) == str(original)
    assert (clone.sandbox_id, clone.reason, clone.retryable) == ("sb-1", "agent died", True)
    assert clone.__traceback__ is None


async def test_on_abandon_runs_when_the_caller_gives_up_and_close_releases_wait_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A caller that gives up runs the actor's abandon hook; wait_closed returns on close."""
    reply: Reply[str] = Reply()
    hooked: list[float] = []
    reply.on_abandon(lambda: hooked.append(trio.current_time()))
    with trio.move_on_after(2):
        await reply.wait()
    assert hooked == [2]
    assert not reply.set("too late")

    async def close_later() -> None:
        await trio.sleep(3)
        reply.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close_later)
        await reply.wait_closed()
        assert trio.current_time() == 5


async def test_on_abandon_registered_after_the_caller_left_runs_at_once() -> None:
    """A hook registered on an already abandoned reply runs immediately."""
    reply: Reply[int] = Reply()
    reply.abandon()
    ran: list[bool] = []
    reply.on_abandon(lambda: ran.append(True))
    assert ran == [True]


# -- PortalHost -------------------------------------------------------------------------------


class Service:
    """An async context manager with a nursery, like the backend's core: a journal of its life."""

    def __init__(self, fail_enter: int = 0) -> None:
        self.journal: list[str] = []
        self.fail_enter = fail_enter
        self.thread: str | None = None
        self._nursery: trio.Nursery | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    async def __aenter__(self) -> Service:
        if self.fail_enter:
            self.fail_enter -= 1
            raise HermesError("cannot start")
        self._stack = contextlib.AsyncExitStack()
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        self.thread = threading.current_thread().name
        self.journal.append("enter")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.journal.append("exit")
        assert self._nursery is not None
        assert self._stack is not None
        self._nursery.cancel_scope.cancel()
        await self._stack.__aexit__(*exc_info)  # type: ignore[arg-type]

    async def echo(self, value: str) -> str:
        await trio.lowlevel.checkpoint()
        self.journal.append(value)
        return value

    async def crash(self) -> None:
        async def boom() -> None:
            raise HermesError("the service crashed")

        assert self._nursery is not None
        self._nursery.start_soon(boom)


def test_portal_host_enters_on_first_call_and_leaves_on_close() -> None:
    """The context is entered once, on the portal thread, at the first call; close leaves it."""
    service = Service()
    host = PortalHost(service, name="test-portal-host")
    host.start()
    assert service.journal == []
    assert host.call_blocking(service.echo, "a") == "a"
    assert asyncio.run(host.call(service.echo, "b")) == "b"
    assert service.thread == "test-portal-host"
    assert host.is_open
    host.close()
    assert service.journal == ["enter", "a", "b", "exit"]
    assert not host.running
    assert "test-portal-host" not in [thread.name for thread in threading.enumerate()]
    with pytest.raises(RuntimeStopped):
        host.call_blocking(service.echo, "late")


def test_portal_host_reports_a_failed_enter_and_tries_again_next_call() -> None:
    """A context that fails to enter raises to that call; the next call enters it afresh."""
    service = Service(fail_enter=1)
    host = PortalHost(service, name="test-portal-host-retry")
    host.start()
    try:
        with pytest.raises(HermesError, match="cannot start"):
            host.call_blocking(service.echo, "never")
        assert host.call_blocking(service.echo, "then") == "then"
    finally:
        host.close()
    assert service.journal == ["enter", "then", "exit"]


def test_portal_host_logs_a_crashed_context_and_enters_it_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A context that ends by crashing is logged; the next call enters it again."""
    service = Service()
    host = PortalHost(service, name="test-portal-host-crash")
    host.start()
    try:
        host.call_blocking(service.crash)
        for _ in range(200):
            if not host.is_open:
                break
            time.sleep(0.01)
        assert not host.is_open
        assert "ended by itself" in caplog.text
        assert host.call_blocking(service.echo, "again") == "again"
    finally:
        host.close()
    assert service.journal == ["enter", "exit", "enter", "again", "exit"]


class EagerService(Service):
    """A service with a task of its own that calls through the host the moment it is open."""

    host: PortalHost[Service] | None = None
    early: str | None = None

    async def __aenter__(self) -> Service:
        entered = await super().__aenter__()
        assert self._nursery is not None
        self._nursery.start_soon(self._call_when_open)
        return entered

    async def _call_when_open(self) -> None:
        assert self.host is not None
        while not self.host.is_open:
            await trio.lowlevel.checkpoint()
        self.early = await self.host.call(self.echo, "early")


def test_portal_host_serves_a_call_that_arrives_while_it_enters() -> None:
    """A call in the turn between the context's entry and the entering call's resumption gets
    the entered context. Trio orders that turn's tasks at random: many rounds catch both."""
    for _ in range(30):
        service = EagerService()
        host: PortalHost[Service] = PortalHost(service, name="test-portal-host-eager")
        service.host = host
        host.start()
        try:
            assert host.call_blocking(service.echo, "first") == "first"
            for _ in range(200):
                if service.early is not None:
                    break
                time.sleep(0.005)
            assert service.early == "early"
        finally:
            host.close()
        assert service.journal.count("enter") == 1

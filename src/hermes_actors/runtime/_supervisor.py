"""An Erlang/OTP-style supervisor on trio: start children, restart them, tear them down in order.

Roles: a `Supervisor` owns one nursery (inside `run`) and the children started in it from
`ChildSpec`s. A child is an async function run with `nursery.start`: it calls
`task_status.started(handle)` once it can serve, and the handle (typically its mailbox) is how
others address it. The supervisor knows nothing about what its children do.

Invariants:
* Every child is permanent (OTP's only restart type the runtime needs): a child whose task
  crashes with an `Exception` or returns is restarted, with a new handle (`child_handle`,
  `on_restarted`).
* Cancellation is never a crash: a child cancelled by shutdown is not restarted and does not
  count towards the restart intensity.
* Restart intensity: more than `max_restarts` restarts (of all children together) within
  `period_s` seconds of `trio.current_time()` make the supervisor give up: it stops every
  child and `run` raises `SupervisorEscalation`, whose `__cause__` is the last failure.
* Teardown (shutdown or escalation) stops children one at a time in reverse start order, each
  given at most its `shutdown_s` to finish after being cancelled. trio cancels a nursery's
  tasks all together, so each child runs in its own shielded cancel scope that only the
  supervisor cancels. A child that ignores cancellation for longer than `shutdown_s` is left
  behind (the next child is stopped anyway); since trio cannot abandon a task, `run` returns
  only once that child has finally exited.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import attrs
import trio

from hermes_actors._errors import HermesError, RuntimeStopped
from hermes_actors._trio import bounded_cleanup

__all__ = [
    "ChildAlreadyStarted",
    "ChildInfo",
    "ChildSpec",
    "NoSuchChild",
    "Supervisor",
    "SupervisorEscalation",
]

logger = logging.getLogger(__name__)


def _check_shutdown_s(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (0 <= value < math.inf):
        raise ValueError(f"'{attribute.name}' must be finite and >= 0: {value!r}")


@attrs.frozen(kw_only=True)
class ChildSpec:
    """How to run one child.

    `start` is an async function called as `start(task_status=...)`; it calls
    `task_status.started(handle)` once ready and then runs until it is done or cancelled.
    `shutdown_s` is how long it may take to finish once cancelled by the supervisor before the
    supervisor stops waiting for it.
    """

    name: str
    start: Callable[..., Awaitable[object]]
    shutdown_s: float = attrs.field(default=5.0, validator=_check_shutdown_s)


@attrs.frozen(kw_only=True)
class ChildInfo:
    """A snapshot of one child: `alive` is False once it has stopped for good."""

    name: str
    restarts: int
    alive: bool


class SupervisorEscalation(HermesError):
    """A supervisor exceeded its restart intensity, stopped all its children and gave up.

    `__cause__` is the child's last failure (None if it returned normally).
    """

    def __init__(self, supervisor: str, child: str, *, max_restarts: int, period_s: float) -> None:
        super().__init__(
            f"supervisor {supervisor!r} gave up: child {child!r} needed more than "
            f"{max_restarts} restart(s) within {period_s:g} s, so all children were stopped. "
            "See the cause for the last failure; fix it, then start the runtime again."
        )
        self.supervisor = supervisor
        self.child = child
        self.max_restarts = max_restarts
        self.period_s = period_s


class ChildAlreadyStarted(HermesError, ValueError):
    """A live child of that name already exists under this supervisor."""

    def __init__(self, supervisor: str, child: str) -> None:
        super().__init__(
            f"supervisor {supervisor!r} already runs a child named {child!r}; "
            "terminate it first or pick another name"
        )
        self.supervisor = supervisor
        self.child = child


class NoSuchChild(HermesError, LookupError):
    """No live child of that name exists under this supervisor."""

    def __init__(self, supervisor: str, child: str) -> None:
        super().__init__(f"supervisor {supervisor!r} has no live child named {child!r}")
        self.supervisor = supervisor
        self.child = child


class _Phase(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@attrs.define(eq=False)
class _Child:
    spec: ChildSpec
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    handle: Any = None
    restarts: int = 0
    alive: bool = True
    adopted: bool = False
    """True once the first start succeeded and the task lives in the supervisor's nursery."""
    stopped: trio.Event = attrs.field(factory=trio.Event)


class _ChildTaskStatus(trio.TaskStatus[Any]):
    """The `task_status` each incarnation of a child gets.

    The first `started()` is forwarded to `nursery.start` (so `start_child` returns the
    handle); later incarnations report their new handle through `on_restarted` instead.
    """

    def __init__(self, supervisor: Supervisor, child: _Child, first: trio.TaskStatus[Any]) -> None:
        self._supervisor = supervisor
        self._child = child
        self._first = first
        self._started_now = False

    def next_incarnation(self) -> None:
        self._started_now = False

    def started(self, value: Any = None) -> None:
        if self._started_now:
            raise RuntimeError("called 'started' twice on the same task status")
        self._started_now = True
        self._child.handle = value
        if self._child.adopted:
            self._supervisor._child_restarted(self._child)
        else:
            self._first.started(value)
            self._supervisor._child_adopted(self._child)


class Supervisor:
    """Supervises children started with `start_child`, with OTP restart semantics.

    `on_restarted(name, handle)` is called (synchronously, from the child's task) each time a
    child is restarted and has called `started(handle)` again.
    """

    def __init__(
        self,
        name: str,
        *,
        max_restarts: int = 3,
        period_s: float = 5.0,
        on_restarted: Callable[[str, Any], None] | None = None,
    ) -> None:
        if max_restarts < 0:
            raise ValueError(f"'max_restarts' must be >= 0: {max_restarts!r}")
        if not (0 < period_s < math.inf):
            raise ValueError(f"'period_s' must be finite and > 0: {period_s!r}")
        self.name = name
        self.max_restarts = max_restarts
        self.period_s = period_s
        self._on_restarted = on_restarted
        self._phase = _Phase.NEW
        self._nursery: trio.Nursery | None = None
        self._children: dict[str, _Child] = {}
        self._restart_times: collections.deque[float] = collections.deque()
        self._escalated = trio.Event()
        self._escalation: tuple[str, Exception | None] | None = None

    def __repr__(self) -> str:
        return f"<Supervisor {self.name!r} {self._phase.value}, {len(self._children)} children>"

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Supervise children until cancelled; signals `task_status.started()` once ready.

        Cancellation (shutdown): stops the children in reverse start order, each bounded by its
        `shutdown_s` (shielded, so the stop happens even though `run` is cancelled), then lets
        the cancellation propagate. Raises `SupervisorEscalation` after stopping all children
        the same way if the restart intensity is exceeded. A supervisor runs only once.
        """
        if self._phase is not _Phase.NEW:
            raise RuntimeError(f"supervisor {self.name!r} has already run; create a new one")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._phase = _Phase.RUNNING
                task_status.started()
                try:
                    await self._escalated.wait()
                finally:
                    self._phase = _Phase.STOPPING
                    await self._stop_children()
        finally:
            self._phase = _Phase.STOPPED
            self._nursery = None
        assert self._escalation is not None
        child_name, failure = self._escalation
        raise SupervisorEscalation(
            self.name, child_name, max_restarts=self.max_restarts, period_s=self.period_s
        ) from failure

    async def start_child(self, spec: ChildSpec) -> Any:
        """Start a child and return the handle it passed to `task_status.started()`.

        Raises `ChildAlreadyStarted` if a live child has that name (a stopped one is replaced
        and becomes the latest started), `RuntimeStopped` if the supervisor is not running, and
        whatever the child raised before calling `started()` (not counted as a crash).
        Cancellation while the child is starting cancels the child; nothing is left running.
        """
        nursery = self._running_nursery()
        existing = self._children.get(spec.name)
        if existing is not None:
            if existing.alive:
                raise ChildAlreadyStarted(self.name, spec.name)
            del self._children[spec.name]
        child = _Child(spec=spec)
        self._children[spec.name] = child
        handle = await nursery.start(self._supervise, child, name=f"{self.name}/{spec.name}")
        if self._phase is not _Phase.RUNNING:
            raise RuntimeStopped(
                f"supervisor {self.name!r} is shutting down; child {spec.name!r} was stopped"
            )
        return handle

    def child_handle(self, name: str) -> Any:
        """The latest handle of a live child (during a restart, the previous incarnation's).

        Raises `NoSuchChild` if there is no live child of that name.
        """
        child = self._children.get(name)
        if child is None or not child.alive:
            raise NoSuchChild(self.name, name)
        return child.handle

    def which_children(self) -> list[ChildInfo]:
        """A snapshot of the known children, in start order."""
        return [
            ChildInfo(name=child.spec.name, restarts=child.restarts, alive=child.alive)
            for child in self._children.values()
        ]

    def _running_nursery(self) -> trio.Nursery:
        if self._phase is not _Phase.RUNNING or self._nursery is None:
            raise RuntimeStopped(
                f"supervisor {self.name!r} is not running ({self._phase.value}); "
                "start its run() task first"
            )
        return self._nursery

    async def _supervise(self, child: _Child, *, task_status: trio.TaskStatus[Any]) -> None:
        status = _ChildTaskStatus(self, child, task_status)
        try:
            with child.scope:
                await self._keep_running(child, status)
            if not child.adopted:
                # Cancelled by the supervisor's shutdown before it ever started.
                raise RuntimeStopped(
                    f"supervisor {self.name!r} stopped while child {child.spec.name!r} was starting"
                )
        finally:
            child.alive = False
            child.stopped.set()
            if not child.adopted and self._children.get(child.spec.name) is child:
                del self._children[child.spec.name]

    async def _keep_running(self, child: _Child, status: _ChildTaskStatus) -> None:
        name = child.spec.name
        while True:
            failure = await self._run_incarnation(child, status)
            if not child.adopted:
                if failure is not None:
                    raise failure
                raise RuntimeError(f"child {name!r} returned without calling task_status.started()")
            if child.scope.cancel_called or self._phase is not _Phase.RUNNING:
                if failure is not None:
                    logger.warning(
                        "child %r of supervisor %r failed while stopping",
                        name,
                        self.name,
                        exc_info=failure,
                    )
                return
            if failure is not None:
                logger.warning(
                    "child %r of supervisor %r crashed", name, self.name, exc_info=failure
                )
            if not self._admit_restart():
                logger.error(
                    "supervisor %r: restart intensity exceeded by child %r; escalating",
                    self.name,
                    name,
                )
                self._escalation = (name, failure)
                self._escalated.set()
                return
            child.restarts += 1
            status.next_incarnation()

    async def _run_incarnation(self, child: _Child, status: _ChildTaskStatus) -> Exception | None:
        """Run the child once: its crash, or None if it returned; cancellation propagates."""
        try:
            await child.spec.start(task_status=status)
        except Exception as exc:
            return exc
        except BaseExceptionGroup as group:
            # A crash that arrived together with a cancellation (from the child's own nursery)
            # is still a crash; only pure cancellations and BaseExceptions propagate.
            _, rest = group.split(trio.Cancelled)
            if isinstance(rest, Exception):
                return rest
            raise
        return None

    def _admit_restart(self) -> bool:
        """Record one more restart if the intensity allows it."""
        now = trio.current_time()
        while self._restart_times and now - self._restart_times[0] >= self.period_s:
            self._restart_times.popleft()
        if len(self._restart_times) >= self.max_restarts:
            return False
        self._restart_times.append(now)
        return True

    def _child_adopted(self, child: _Child) -> None:
        """The first `started()` of a child: it now lives in our nursery (unless cancelled)."""
        if trio.lowlevel.current_task().parent_nursery is not self._nursery:
            # `start_child` was cancelled meanwhile: the child stays with the caller and dies
            # with its cancellation; it must not be shielded from it.
            return
        child.adopted = True
        if self._phase is _Phase.RUNNING:
            # From now on only the supervisor cancels it, one child at a time.
            child.scope.shield = True
        else:
            child.scope.cancel(reason=f"supervisor {self.name!r} is shutting down")

    def _child_restarted(self, child: _Child) -> None:
        if self._on_restarted is None:
            return
        try:
            self._on_restarted(child.spec.name, child.handle)
        except Exception:
            logger.exception("on_restarted callback of supervisor %r failed", self.name)

    async def _stop_children(self) -> None:
        for child in reversed(list(self._children.values())):
            if child.alive:
                await self._stop_child(child)

    async def _stop_child(self, child: _Child) -> None:
        child.scope.cancel(reason=f"supervisor {self.name!r} is shutting down")

        def give_up() -> None:
            logger.warning(
                "child %r of supervisor %r did not stop within %g s; moving on",
                child.spec.name,
                self.name,
                child.spec.shutdown_s,
            )

        await bounded_cleanup(child.spec.shutdown_s, child.stopped.wait, give_up)

"""The profile pool actor: the sandboxes of one profile and who holds which slot.

Messages (`PoolMessage`): `Acquire` (reply: a `Lease`) and `Release` (reply: None). Status is a
sync snapshot (`statistics()`), since it only reads state.

Decisions are made in sync code on the pool's own state, then carried out by child tasks in the
pool's nursery, which report back through the pool's sync `_on_*` methods (they are the pool's
own tasks, so a report can never block):

* `acquire` is served FIFO: a free slot goes to the oldest waiter still waiting. A caller that
  gives up after a slot was handed over gives it back (`Reply.on_abandoned`), so no slot leaks.
  One exception: a trajectory whose slot was lost with its sandbox, asking again within
  `LOST_PRIORITY_S` under the same `trajectory_id`, goes ahead of every first-time acquire
  (FIFO among such), so lost capacity is made good before new growth: while a batch is still
  being created, it would otherwise wait for the whole batch's creates.
* Scale up: when waiters outnumber free and starting slots, sandboxes are started, never more
  than `max_sandboxes` in all and `max_starting` at once; `min_sandboxes` are kept warm.
* Scale down: a sandbox whose slots have all been free for `idle_timeout` is stopped while more
  than `min_sandboxes` remain. Rotation: a sandbox older than its lifetime budget takes no new
  slots and is stopped once its held slots come back, before the provider would kill it.
  Both run off one cancel scope whose absolute deadline is the next such event, recomputed on
  every state change. A sandbox storing checkpoints that have no copy outside it is stopped
  only once a child task gave each a copy (`_trees.preserve_checkpoints`; at rotation that
  starts at once, slots held or not, before the provider's limit); if copying fails, a local
  sandbox stays up for them until they are released, a Modal one stops (they are lost).
* Images: each sandbox runs one image, the profile's own or one an `acquire` named; a waiter
  gets a slot of its image only, and one image's waiters never hold up another's. All images
  share `max_sandboxes` and `max_starting`; `min_sandboxes` warms the profile's image only;
  other images' sandboxes stop after `idle_timeout` whatever `min_sandboxes` says, or at once
  when another image's waiters need the room. Start failures and backoff are kept per image.
* `release` resets the slot (processes killed, workspace wiped) before it is free again; a
  release without reset ends only the slot's persistent shell, so the next lease starts clean.
* A sandbox that dies is dropped at once (it never counts against capacity), its held slots fail
  with `SandboxLost` through the sandbox actor, and `_scale` replaces it. Start failures back off.
  The waiters fail with the start error (the provider's cause, never an `AcquireTimeout`) when
  it cannot heal (no bubblewrap, modal missing, a bad image...), when the driver's own retries
  are spent (their budget is `CREATE_RETRY_SHARE` of the acquire deadline) and no other start of
  that image is under way or has come up since (at scale one create in thousands runs out of
  retries by bad luck), after
  `MAX_START_FAILURES` in a row, or when their deadline passes after a failed start. While the
  backoff that follows runs, new callers get that error at once; after it, a caller's acquire
  tries again.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
from collections.abc import Iterator
from typing import assert_never

import attrs
import trio

from hermes_actors._config import SandboxConfig
from hermes_actors._errors import (
    AcquireTimeout,
    ConfigError,
    HermesError,
    InfrastructureError,
    IsolationUnavailable,
    RuntimeStopped,
    SandboxStartFailed,
)
from hermes_actors._status import PoolStatus, SandboxStatus
from hermes_actors._trio import Reply, call, clone_exception, close_mailbox
from hermes_actors._values import Command, CommandResult, EndShell
from hermes_actors.drivers._base import SandboxDriver
from hermes_actors.runtime._sandbox import SandboxActor
from hermes_actors.runtime._trees import CLEANUP_LIMIT_S, CheckpointLedger, preserve_checkpoints

logger = logging.getLogger("hermes_actors.pool")

MAILBOX_SIZE = 4096
#: Start failures in a row after which waiters are failed instead of left waiting.
MAX_START_FAILURES = 3
START_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
#: Share of the acquire deadline a driver may spend retrying one create. The rest covers the
#: last attempt itself, the agent's start, and callers that began waiting while a create was
#: already retrying, so a create that keeps failing reaches them as its cause, in time.
CREATE_RETRY_SHARE = 0.5
#: Tries at copying a sandbox's checkpoints out before stopping it (a copy streamed through
#: the agent fails if the slot it runs in is reset meanwhile).
PRESERVE_ATTEMPTS = 2
#: How long after a loss a trajectory's next acquire goes ahead of first-time acquires: time
#: enough to notice the loss at its next command after thinking.
LOST_PRIORITY_S = 900.0


@attrs.frozen(kw_only=True)
class Lease:
    """A slot handed to one trajectory: the address of its sandbox and its index there."""

    slot_id: str
    profile: str
    sandbox_id: str
    index: int
    trajectory_id: str | None
    #: The image of the slot's sandbox (the profile's own unless `acquire` named another).
    image: str = ""
    sandbox: SandboxActor = attrs.field(repr=False, eq=False)

    async def exec(self, command: Command) -> CommandResult:
        """Run a command in this slot (see `SandboxActor.call`)."""
        return await self.sandbox.exec(self.index, command)


@attrs.frozen(kw_only=True)
class Acquire:
    trajectory_id: str | None
    reply: Reply[Lease]
    #: The image the slot's sandbox must run.
    image: str
    #: Prefer a slot of this sandbox (a fork's source) when it has one free.
    near: SandboxActor | None = None
    #: Set by the pool: the trajectory lost its slot with a sandbox, so it goes first.
    after_loss: bool = False


@attrs.frozen(kw_only=True)
class Release:
    lease: Lease
    reset: bool
    reply: Reply[None]


PoolMessage = Acquire | Release


class _State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"  # rotating out: takes no new slot, stops once its slots are back
    STOPPING = "stopping"


@attrs.define(eq=False)
class _Member:
    """The pool's view of one of its sandboxes."""

    actor: SandboxActor
    image: str
    state: _State = _State.STARTING
    free: list[int] = attrs.field(factory=list)
    held: dict[int, Lease] = attrs.field(factory=dict)
    resetting: set[int] = attrs.field(factory=set)
    idle_since: float | None = None
    ready_at: float = 0.0
    #: When its start began: a sandbox of its image that came up after that shows that starts
    #: of this image work, so this one failing is bad luck, not a reason to fail the waiters.
    started_at: float = attrs.field(factory=trio.current_time)
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    stop_reason: str | None = None
    #: Its checkpoints are being copied out (`_preserve`), or that failed.
    preserving: bool = False
    preserve_failed: bool = False

    @property
    def busy(self) -> bool:
        return bool(self.held or self.resetting)


@attrs.define
class _Starts:
    """How starting sandboxes of one image goes: failures in a row, backoff, last error."""

    failures: int = 0
    blocked_until: float = -math.inf
    last_error: BaseException | None = None
    #: The last failure left no hope for the waiters: they were failed, new callers fail fast.
    gave_up: bool = False


def _describe_limits(handle: object) -> str:
    """The limits a sandbox's driver says it enforces (`enforced_limits`; local sandboxes)."""
    describe = getattr(getattr(handle, "enforced_limits", None), "describe", None)
    return str(describe()) if callable(describe) else ""


def _rotate_after_s(config: SandboxConfig) -> float:
    """Age at which a sandbox stops taking slots: a margin before the provider's limit."""
    return config.max_lifetime - min(60.0, config.max_lifetime * 0.1)


def _is_permanent(error: BaseException) -> bool:
    """Start failures that retrying cannot fix (the user must change something)."""
    if isinstance(error, IsolationUnavailable | ConfigError):
        return True
    return isinstance(error, InfrastructureError) and not error.retryable


class ProfilePool:
    """The pool actor of one profile. Run with `await nursery.start(pool.run)`."""

    def __init__(self, config: SandboxConfig, driver: SandboxDriver) -> None:
        self.config = config
        self._driver = driver
        # What the driver is asked to start: the profile, with a create retry budget that fits
        # inside the acquire deadline.
        self._create_config = attrs.evolve(
            config,
            create_retry_budget_s=min(
                config.create_retry_budget_s, config.acquire_timeout_s * CREATE_RETRY_SHARE
            ),
        )
        self._send, self._receive = trio.open_memory_channel[PoolMessage](MAILBOX_SIZE)
        self._members: dict[int, _Member] = {}
        self._member_ids = 0
        # Indexes over `_members`, kept in step by the `_set_*` / `_*_free` / `_*_idle` helpers,
        # so that no event costs a scan of every sandbox (pools run thousands of them):
        self._by_actor: dict[SandboxActor, _Member] = {}
        self._state_counts: collections.Counter[_State] = collections.Counter()
        self._free_count = 0  # free slots of all READY members
        self._with_free: dict[_Member, None] = {}  # READY members with a free slot
        self._idle: dict[_Member, None] = {}  # idle READY members, oldest idle_since first
        self._by_ready_at: dict[_Member, None] = {}  # READY members, oldest ready_at first
        # Waiters after a loss (`after_loss`) form the head of the queue, the others follow.
        self._waiters: collections.deque[Acquire] = collections.deque()
        #: Trajectories whose slots were lost with their sandbox: (when, how many slots), the
        #: oldest loss first.
        self._lost_slots: dict[str, tuple[float, int]] = {}
        #: Leases held, by trajectory: a trajectory may hear of its sandbox's death and ask
        #: again before the pool hears of the exit.
        self._held_by_trajectory: dict[str, list[Lease]] = {}
        self._nursery: trio.Nursery | None = None
        self._housekeeping: trio.CancelScope | None = None
        #: Per image: a broken image must not hold back the profile's own.
        self._starts: dict[str, _Starts] = collections.defaultdict(_Starts)
        #: When a sandbox of each image last came up (starts of that image work).
        self._ready_at: dict[str, float] = {}
        # Per image: members by state, and free slots (the global counts are above).
        self._image_states: collections.Counter[tuple[str, _State]] = collections.Counter()
        self._image_free: collections.Counter[str] = collections.Counter()
        self._stopped = False
        self.sandboxes_started = 0
        self.sandboxes_stopped = 0
        self.sandboxes_lost = 0
        self.infra_failures = 0
        self._finished_commands = 0
        self._finished_failures = 0
        self.checkpoints = CheckpointLedger(
            config.name,
            max_count=config.max_checkpoints,
            max_bytes=config.max_checkpoint_bytes,
            root_dir=getattr(driver, "root_dir", None),
        )

    # -- the caller side ------------------------------------------------------------------------

    async def acquire(
        self,
        trajectory_id: str | None = None,
        *,
        timeout_s: float | None = None,
        near: SandboxActor | None = None,
        image: str | None = None,
    ) -> Lease:
        """Wait (FIFO) for a free slot and hold it until `release`.

        Raises `AcquireTimeout` after `timeout_s` (default: the profile's `acquire_timeout_s`),
        the start error (the provider's cause) when sandboxes cannot be started, also when the
        deadline passes while the last start failed, `RuntimeStopped` when the pool stopped.
        Cancellation gives back a slot that was already handed over. With `near`, a free slot
        of that sandbox is taken first (a fork lands next to its source when it can). With
        `image`, the slot is in a sandbox of that image (None: the profile's); every image's
        sandboxes count against the profile's `max_sandboxes`.
        """
        limit = self.config.acquire_timeout_s if timeout_s is None else timeout_s
        wanted = image or self.config.image
        with trio.move_on_after(limit):
            return await call(
                self._send,
                lambda reply: Acquire(
                    trajectory_id=trajectory_id, reply=reply, near=near, image=wanted
                ),
                on_abandoned=self._take_back,
            )
        if self._starts[wanted].last_error is not None:
            # No slot came because sandboxes fail to start: that, not capacity, is the answer.
            raise clone_exception(self._start_error(wanted))
        raise AcquireTimeout(self.config.name, limit)

    async def release(self, lease: Lease, *, reset: bool = True) -> None:
        """Give a slot back; with `reset` its processes are killed and its workspace wiped first.

        Idempotent: releasing a slot twice, or a slot whose sandbox died, does nothing. Returns
        once the slot is reset (the reset continues if the caller is cancelled meanwhile).
        """
        await call(self._send, lambda reply: Release(lease=lease, reset=reset, reply=reply))

    # -- the actor ------------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[ProfilePool] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve the mailbox until cancelled; pre-warming starts at once.

        On cancellation every sandbox of the pool is terminated (each bounded, all at once) and
        every waiting caller fails with `RuntimeStopped`.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._housekeeper, name=f"pool-housekeeper:{self.config.name}")
                self._scale()
                task_status.started(self)
                async for message in self._receive:
                    try:
                        self._handle(message)
                    except BaseException:
                        # A bug crashes the pool (its supervisor restarts it); the caller of
                        # the message being handled must still get an answer.
                        message.reply.fail(self._stopped_error())
                        raise
        finally:
            self._stopped = True
            self._fail_waiters(self._stopped_error())
            close_mailbox(self._receive, lambda message: [message.reply], self._stopped_error)
            # The copies of checkpoints go with the pool (their sandboxes went before).
            with trio.move_on_after(CLEANUP_LIMIT_S, shield=True):
                await self.checkpoints.aclose()

    def _stopped_error(self) -> RuntimeStopped:
        return RuntimeStopped(
            f"the pool of profile {self.config.name!r} stopped; if the runtime is still "
            "running, its supervisor restarts the pool: try again"
        )

    def _handle(self, message: PoolMessage) -> None:
        match message:
            case Acquire():
                if self._failing_fast(message.image):
                    message.reply.fail(clone_exception(self._start_error(message.image)))
                    return
                self._enqueue(message)
                self._serve_waiters()
                self._scale()
            case Release():
                self._release(message)
            case _:
                assert_never(message)

    # -- slots ----------------------------------------------------------------------------------

    def _enqueue(self, waiter: Acquire) -> None:
        """Queue a waiter: last, or after the other waiters after a loss if it is one."""
        if not self._had_loss(waiter.trajectory_id):
            self._waiters.append(waiter)
            return
        position = 0
        for queued in self._waiters:
            if not queued.after_loss:
                break
            position += 1
        self._waiters.insert(position, attrs.evolve(waiter, after_loss=True))

    def _had_loss(self, trajectory_id: str | None) -> bool:
        """Whether `trajectory_id` lost a slot with its sandbox lately (and count that slot
        as asked for again)."""
        if trajectory_id is None:
            return False
        for lease in list(self._held_by_trajectory.get(trajectory_id, ())):
            member = self._member_of(lease)
            if member is not None and self._died_unheard(member):
                self._drop_dead_lease(member, lease)
        self._forget_old_losses()
        lost = self._lost_slots.get(trajectory_id)
        if lost is None:
            return False
        lost_at, slots = lost
        if slots > 1:
            self._lost_slots[trajectory_id] = (lost_at, slots - 1)  # keeps its place in time
        else:
            del self._lost_slots[trajectory_id]
        return True

    @staticmethod
    def _died_unheard(member: _Member) -> bool:
        """Whether `member`'s sandbox died (not stopped by the pool) and the pool has not
        heard of its exit yet: its holders may already know and ask again."""
        started = member.state is not _State.STARTING
        return started and member.stop_reason is None and not member.actor.alive

    def _drop_dead_lease(self, member: _Member, lease: Lease) -> None:
        """A slot of a sandbox that died: nothing is left to reset; its holder goes first."""
        self._unhold(member, lease)
        self.infra_failures += 1
        self._note_lost_slot(lease)

    def _note_lost_slot(self, lease: Lease) -> None:
        self._forget_old_losses()
        if lease.trajectory_id is None:
            return
        now = trio.current_time()
        _, slots = self._lost_slots.pop(lease.trajectory_id, (now, 0))
        self._lost_slots[lease.trajectory_id] = (now, slots + 1)  # the newest loss goes last

    def _forget_old_losses(self) -> None:
        horizon = trio.current_time() - LOST_PRIORITY_S
        while self._lost_slots:
            oldest = next(iter(self._lost_slots))
            if self._lost_slots[oldest][0] >= horizon:
                break
            del self._lost_slots[oldest]

    def _serve_waiters(self) -> None:
        """Hand free slots to waiters, oldest first within each image: one image's waiters
        never hold up another's. Stops as soon as no slot is free (the common case under load)."""
        kept: collections.deque[Acquire] = collections.deque()
        blocked: set[str] = set()
        while self._waiters and self._free_count:
            waiter = self._waiters.popleft()
            if waiter.reply.abandoned:
                continue
            member = None if waiter.image in blocked else self._pick_member(waiter)
            if member is None:
                blocked.add(waiter.image)
                kept.append(waiter)
                continue
            index = self._take_free(member)
            actor = member.actor
            lease = Lease(
                slot_id=f"{self.config.name}/{actor.sandbox_id}/{index}",
                profile=self.config.name,
                sandbox_id=actor.sandbox_id,
                index=index,
                trajectory_id=waiter.trajectory_id,
                image=member.image,
                sandbox=actor,
            )
            self._hold(member, lease)
            self._set_busy(member)
            if not waiter.reply.set(lease):
                self._take_back(lease)
        kept.extend(self._waiters)
        self._waiters = kept
        self._reschedule()

    def _pick_member(self, waiter: Acquire) -> _Member | None:
        """A sandbox of the waiter's image: its `near` one if that has a free slot, else the
        ready one with the fewest free slots (packing lets the others go idle)."""
        if not self._image_free[waiter.image]:
            return None
        candidates = [
            m
            for m in self._with_free
            # A sandbox whose agent just died may not have reported its exit yet: skip it.
            if m.actor.alive and m.image == waiter.image
        ]
        for member in candidates:
            if member.actor is waiter.near:
                return member
        return min(candidates, key=lambda m: len(m.free), default=None)

    def _member_of(self, lease: Lease) -> _Member | None:
        return self._by_actor.get(lease.sandbox)

    # Every change to a member's state, free slots or idleness goes through these helpers, which
    # keep the pool's indexes in step.

    def _set_state(self, member: _Member, state: _State) -> None:
        self._state_counts[member.state] -= 1
        self._state_counts[state] += 1
        self._image_states[member.image, member.state] -= 1
        self._image_states[member.image, state] += 1
        member.state = state
        if state is not _State.READY:
            self._clear_free(member)
            self._idle.pop(member, None)
            self._by_ready_at.pop(member, None)

    def _add_member(self, key: int, member: _Member) -> None:
        self._members[key] = member
        self._by_actor[member.actor] = member
        self._state_counts[member.state] += 1
        self._image_states[member.image, member.state] += 1

    def _remove_member(self, key: int, member: _Member) -> None:
        for lease in member.held.values():
            self._forget_holder(lease)
        self._clear_free(member)
        self._idle.pop(member, None)
        self._by_ready_at.pop(member, None)
        self._state_counts[member.state] -= 1
        self._image_states[member.image, member.state] -= 1
        del self._members[key]
        del self._by_actor[member.actor]

    def _hold(self, member: _Member, lease: Lease) -> None:
        member.held[lease.index] = lease
        if lease.trajectory_id is not None:
            self._held_by_trajectory.setdefault(lease.trajectory_id, []).append(lease)

    def _unhold(self, member: _Member, lease: Lease) -> None:
        del member.held[lease.index]
        self._forget_holder(lease)

    def _forget_holder(self, lease: Lease) -> None:
        if lease.trajectory_id is None:
            return
        leases = self._held_by_trajectory[lease.trajectory_id]
        leases.remove(lease)
        if not leases:
            del self._held_by_trajectory[lease.trajectory_id]

    def _take_free(self, member: _Member) -> int:
        index = member.free.pop(0)
        self._free_count -= 1
        self._image_free[member.image] -= 1
        if not member.free:
            del self._with_free[member]
        return index

    def _add_free(self, member: _Member, index: int) -> None:
        member.free.append(index)
        member.free.sort()
        self._free_count += 1
        self._image_free[member.image] += 1
        self._with_free[member] = None

    def _clear_free(self, member: _Member) -> None:
        self._free_count -= len(member.free)
        self._image_free[member.image] -= len(member.free)
        member.free = []
        self._with_free.pop(member, None)

    def _set_idle(self, member: _Member) -> None:
        member.idle_since = trio.current_time()
        self._idle.pop(member, None)
        if member.state is _State.READY:
            self._idle[member] = None  # the newest idle_since goes last

    def _set_busy(self, member: _Member) -> None:
        member.idle_since = None
        self._idle.pop(member, None)

    def _take_back(self, lease: Lease) -> None:
        """A lease handed to a caller that gave up: the slot was never used, so free it as is."""
        member = self._member_of(lease)
        if member is None or member.held.get(lease.index) is not lease:
            return
        self._unhold(member, lease)
        self._slot_freed(member, lease.index)

    def _release(self, message: Release) -> None:
        lease = message.lease
        member = self._member_of(lease)
        if member is None or member.held.get(lease.index) is not lease:
            message.reply.set(None)
            return
        if self._died_unheard(member):
            self._drop_dead_lease(member, lease)
            message.reply.set(None)
            return
        self._unhold(member, lease)
        member.resetting.add(lease.index)
        assert self._nursery is not None
        self._nursery.start_soon(
            self._reset_slot, member, lease.index, message.reply, message.reset
        )

    async def _reset_slot(
        self, member: _Member, index: int, reply: Reply[None], reset: bool = True
    ) -> None:
        try:
            keep_shell = self.config.reuse_shell
            if reset:
                await member.actor.reset_slot(index, keep_shell=keep_shell)
            else:
                # Files and processes stay for the next holder; the slot's persistent shell
                # (its cwd, variables, functions) does not: the next lease starts a clean one.
                await member.actor.call(index, EndShell(keep_shell=keep_shell))
        except (HermesError, RuntimeStopped) as exc:
            # The sandbox is dying; its exit report drops it. The caller's release still holds.
            logger.warning("reset of %s slot %d failed: %s", member.actor.sandbox_id, index, exc)
            member.resetting.discard(index)
        else:
            member.resetting.discard(index)
            self._slot_freed(member, index)
        finally:
            # Also when the pool stops mid-reset: the slot is released either way (its sandbox
            # is terminated with the pool), and the caller must hear so.
            reply.set(None)

    def _slot_freed(self, member: _Member, index: int) -> None:
        if member.state is _State.READY:
            self._add_free(member, index)
        if not member.busy:
            self._set_idle(member)
            if member.state is _State.DRAINING:
                self._retire(member, "rotated before its maximum lifetime")
        self._serve_waiters()
        self._scale()

    # -- sandboxes ------------------------------------------------------------------------------

    def _live_count(self) -> int:
        return len(self._members) - self._state_counts[_State.STOPPING]

    def _own_live(self) -> int:
        """Live sandboxes of the profile's own image."""
        own = self.config.image
        return sum(
            self._image_states[own, state] for state in _State if state is not _State.STOPPING
        )

    def _scale(self) -> None:
        """Start sandboxes for the waiters that free and starting slots will not cover.

        Images are served in the order of their oldest waiter, then the profile's own image
        is topped up to `min_sandboxes`; all share `max_sandboxes` and `max_starting`. When the
        bound leaves no room for waiters of one image, idle sandboxes of other images are
        stopped to make it.
        """
        if self._stopped or self._nursery is None:
            return
        config = self.config
        now = trio.current_time()
        slots = config.slots_per_sandbox
        room = min(
            config.max_sandboxes - self._live_count(),
            config.max_starting - self._state_counts[_State.STARTING],
        )
        # Insertion order: images by their oldest waiter.
        waiting = collections.Counter(w.image for w in self._waiters if not w.reply.abandoned)
        own = config.image
        for image in [*waiting, *([] if own in waiting else [own])]:
            if now < self._starts[image].blocked_until:
                continue
            starting = self._image_states[image, _State.STARTING]
            uncovered = waiting[image] - self._image_free[image] - starting * slots
            for_waiters = math.ceil(uncovered / slots)
            wanted = for_waiters
            if image == own:
                warm = self._image_states[own, _State.READY] + starting
                wanted = max(wanted, config.min_sandboxes - warm)
            count = max(0, min(wanted, room))
            for _ in range(count):
                self._start_member(image)
            room -= count
            if for_waiters > count and config.max_sandboxes <= self._live_count():
                self._make_room(image, for_waiters - count)
        self._reschedule()

    def _make_room(self, image: str, count: int) -> None:
        """Stop up to `count` idle sandboxes of other images (longest idle first), counting
        those that stop once their checkpoints are copied out."""
        coming = sum(1 for m in self._idle if m.preserving and m.image != image)
        others = [m for m in self._stoppable_idle() if m.image != image][: max(0, count - coming)]
        for member in others:
            self._retire(member, f"making room for image {image!r}")

    def _start_member(self, image: str) -> None:
        assert self._nursery is not None
        self._member_ids += 1
        key = self._member_ids
        config = self._create_config
        actor = SandboxActor(
            driver=self._driver,
            config=config if image == config.image else attrs.evolve(config, image=image),
            on_ready=lambda _actor: self._on_ready(member),
        )
        member = _Member(actor=actor, image=image)
        self._add_member(key, member)
        self._nursery.start_soon(
            self._run_member, key, member, name=f"sandbox:{self.config.name}/{key}"
        )

    async def _run_member(self, key: int, member: _Member) -> None:
        error: Exception | None = None
        try:
            with member.scope:
                await member.actor.run()
        except Exception as exc:
            error = exc
        except BaseException:
            # The pool itself is stopping: the actor has terminated its sandbox on the way out.
            self._remove_member(key, member)
            raise
        self._on_exit(key, member, error)

    def _on_ready(self, member: _Member) -> None:
        if member.state is not _State.STARTING:
            return
        self._set_state(member, _State.READY)
        member.ready_at = trio.current_time()
        self._by_ready_at[member] = None
        for index in range(self.config.slots_per_sandbox):
            self._add_free(member, index)
        self._set_idle(member)
        self.sandboxes_started += 1
        self._starts.pop(member.image, None)
        self._ready_at[member.image] = member.ready_at
        self._serve_waiters()
        self._scale()

    def _on_exit(self, key: int, member: _Member, error: BaseException | None) -> None:
        self._remove_member(key, member)
        self.checkpoints.forget_sandbox(member.actor, self._ended_because(member, error))
        self._finished_commands += member.actor.commands_run
        self._finished_failures += member.actor.command_failures
        if member.state is _State.STARTING and member.stop_reason is None:
            self._start_failed(
                member, error or SandboxStartFailed("the sandbox stopped while starting")
            )
        elif member.stop_reason is not None:
            self.sandboxes_stopped += 1
        else:
            self.sandboxes_lost += 1
            self.infra_failures += len(member.held) + len(member.resetting)
            for lease in member.held.values():
                self._note_lost_slot(lease)
            logger.warning(
                "sandbox %s of profile %r was lost (%s); replacing it",
                member.actor.sandbox_id,
                self.config.name,
                died.reason if (died := member.actor.died) is not None else repr(error),
            )
        member.state = _State.STOPPING  # no longer a member: the indexes do not count it
        self._serve_waiters()
        self._scale()

    def _ended_because(self, member: _Member, error: BaseException | None) -> str:
        """How a sandbox ended, for the checkpoints stored there (see `CheckpointLost`)."""
        if member.stop_reason is not None:
            why = f"was stopped ({member.stop_reason})"
        else:
            died = member.actor.died
            why = f"was lost ({died.reason if died is not None else error!r})"
        if self.config.backend == "modal":
            # The pool copies checkpoints out of a sandbox it stops, not out of one the
            # provider ends first: at its max lifetime (rotation copies them just before).
            why += (
                "; Modal ends a sandbox at its max_lifetime "
                f"({self.config.max_lifetime:g} s; at most 24 h) whatever the pool does: raise "
                "it for searches that outlive it"
            )
        return why

    def _start_failed(self, member: _Member, error: BaseException) -> None:
        image = member.image
        starts = self._starts[image]
        starts.failures += 1
        starts.last_error = error
        self.infra_failures += 1
        logger.warning(
            "could not start a sandbox of profile %r (image %r): %s", self.config.name, image, error
        )
        starts.gave_up = self._gave_up(member, error)
        if starts.gave_up:
            self._fail_waiters(self._start_error(image), image)
        backoff = START_BACKOFF_S[min(starts.failures, len(START_BACKOFF_S)) - 1]
        starts.blocked_until = trio.current_time() + backoff

    def _gave_up(self, member: _Member, error: BaseException) -> bool:
        """Whether waiting longer cannot help the waiters of `member`'s image.

        A start error the user must fix, or too many failures in a row, always ends the wait. A
        create whose driver spent its retries ends it only when nothing else says starts of this
        image work: at scale (a 2% failure rate, thousands of creates) one create in a long run
        runs out of retries by bad luck, and failing every waiter for it would be wrong while
        other creates of the image are under way or have just succeeded.
        """
        image = member.image
        if _is_permanent(error) or self._starts[image].failures >= MAX_START_FAILURES:
            return True
        if not (isinstance(error, SandboxStartFailed) and error.attempts > 1):
            return False
        others_starting = self._image_states[image, _State.STARTING] > 0
        came_up_since = self._ready_at.get(image, -math.inf) >= member.started_at
        return not (others_starting or came_up_since)

    def _failing_fast(self, image: str) -> bool:
        """Whether a new caller gets the start error at once: the pool gave up and backs off."""
        starts = self._starts.get(image)
        return starts is not None and starts.gave_up and trio.current_time() < starts.blocked_until

    def _start_error(self, image: str) -> BaseException:
        error = self._starts[image].last_error
        if isinstance(error, HermesError):
            return error
        return SandboxStartFailed(
            f"sandboxes of profile {self.config.name!r} (image {image!r}) fail to start: {error!r}"
        )

    def _fail_waiters(self, error: BaseException, image: str | None = None) -> None:
        """Fail the waiters of `image` (None: all of them) with copies of `error`."""
        if image is None:
            failing, self._waiters = self._waiters, collections.deque()
        else:
            failing = collections.deque(w for w in self._waiters if w.image == image)
            self._waiters = collections.deque(w for w in self._waiters if w.image != image)
        for waiter in failing:
            waiter.reply.fail(clone_exception(error))

    def _stop_member(self, member: _Member, reason: str) -> None:
        if member.state is _State.STOPPING:
            return
        logger.info("stopping sandbox %s: %s", member.actor.sandbox_id, reason)
        self._set_state(member, _State.STOPPING)
        member.stop_reason = reason
        member.scope.cancel(reason=reason)

    # -- housekeeping: idle timeouts, rotation, start backoff ------------------------------------

    def _next_event(self) -> float:
        config = self.config
        now = trio.current_time()
        events = [s.blocked_until for s in self._starts.values() if s.blocked_until > now]
        longest_idle = next((m for m in self._stoppable_idle() if self._may_idle_stop(m)), None)
        if longest_idle is not None:
            assert longest_idle.idle_since is not None
            events.append(longest_idle.idle_since + config.idle_timeout)
        if self._by_ready_at:
            events.append(next(iter(self._by_ready_at)).ready_at + _rotate_after_s(config))
        return min(events, default=math.inf)

    def checkpoints_changed(self) -> None:
        """A checkpoint was taken, released or copied out: a sandbox may have become
        (un)stoppable."""
        for member in list(self._members.values()):
            if member.state is not _State.DRAINING:
                continue
            if not member.busy:
                self._retire(member, "rotated before its maximum lifetime")
            elif self.checkpoints.in_sandbox(member.actor) and not member.preserve_failed:
                # Taken after the rotation's copy: copied at once too (the provider may end
                # the sandbox at its limit before its slots come back).
                self._preserve(member)
        self._reschedule()

    def _retire(self, member: _Member, reason: str) -> None:
        """Stop `member` on purpose, once the checkpoints it stores have copies outside it.

        Until then a child task copies them out (`_preserve`). If that failed, a local sandbox
        stays up for them (nothing else ends it, so they stay restorable) until they are
        released; a Modal sandbox stops (its provider ends it at its timeout whatever we do:
        `CheckpointLost` then)."""
        if self.checkpoints.in_sandbox(member.actor):
            if not member.preserve_failed:
                self._preserve(member)
                return
            if self.config.backend == "local":
                return
        self._stop_member(member, reason)

    def _preserve(self, member: _Member) -> None:
        """Copy the checkpoints stored in `member` out of it, in a child task (once at a time)."""
        if member.preserving or self._nursery is None or member.state is _State.STOPPING:
            return
        member.preserving = True  # not stoppable meanwhile (`_stoppable_idle`)
        self._nursery.start_soon(
            self._run_preserve, member, name=f"preserve:{member.actor.sandbox_id}"
        )

    async def _run_preserve(self, member: _Member) -> None:
        error: Exception | None = None
        for _ in range(PRESERVE_ATTEMPTS):
            try:
                copied = await preserve_checkpoints(self.checkpoints, member.actor)
            except Exception as exc:
                error = exc
                if not member.actor.alive:
                    break
                continue
            error = None
            logger.info(
                "copied %d checkpoint(s) out of sandbox %s before stopping it",
                copied,
                member.actor.sandbox_id,
            )
            break
        self._on_preserved(member, error)

    def _on_preserved(self, member: _Member, error: Exception | None) -> None:
        member.preserving = False
        if error is not None:
            member.preserve_failed = True
            logger.warning(
                "could not copy the checkpoints of sandbox %s out of it (%s); %s",
                member.actor.sandbox_id,
                error,
                "it stays up until they are released"
                if self.config.backend == "local"
                else "they are lost when it stops",
            )
        # An idle one kept its place in `_idle`: due at once if its idle timeout has passed.
        self.checkpoints_changed()
        self._scale()  # waiters of another image may wait for it to stop

    def _reschedule(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.deadline = self._next_event()

    async def _housekeeper(self) -> None:
        while True:
            with trio.CancelScope(deadline=self._next_event()) as scope:
                self._housekeeping = scope
                await trio.sleep_forever()
            self._housekeeping = None
            self._housekeep()

    def _stoppable_idle(self) -> Iterator[_Member]:
        """Ready sandboxes with every slot free, longest idle first, but those whose checkpoints
        are being copied out, or failed to be (locally they stay up for them)."""
        return (
            m
            for m in self._idle
            if not m.preserving and not (m.preserve_failed and self.checkpoints.in_sandbox(m.actor))
        )

    def _may_idle_stop(self, member: _Member) -> bool:
        """Whether the idle timeout may stop `member`: any of another image than the
        profile's, the profile's own above `min_sandboxes`."""
        return member.image != self.config.image or self._own_live() > self.config.min_sandboxes

    def _housekeep(self) -> None:
        now = trio.current_time()
        config = self.config
        # Both indexes are in time order: only their heads can be due.
        for member in list(self._by_ready_at):
            if now < member.ready_at + _rotate_after_s(config):
                break
            self._set_state(member, _State.DRAINING)
            if self.checkpoints.in_sandbox(member.actor) and not member.preserve_failed:
                # Now, slots held or not: the provider may end it at its limit before they
                # come back.
                self._preserve(member)
            elif not member.busy:
                self._retire(member, "rotated before its maximum lifetime")
        due = []
        for member in self._stoppable_idle():
            assert member.idle_since is not None
            if now < member.idle_since + config.idle_timeout:
                break
            due.append(member)
        for member in due:
            if self._may_idle_stop(member):
                self._retire(member, f"idle for {config.idle_timeout:g} s")
        self._scale()

    # -- inspection -----------------------------------------------------------------------------

    def statistics(self) -> PoolStatus:
        """A frozen snapshot of the pool."""
        now = trio.current_time()
        sandboxes = tuple(
            SandboxStatus(
                sandbox_id=m.actor.sandbox_id,
                image=m.image,
                state=m.state.value,
                slots_free=len(m.free),
                slots_held=len(m.held),
                age_s=now - m.ready_at if m.state is not _State.STARTING else 0.0,
                commands_run=m.actor.commands_run,
                limits=_describe_limits(m.actor.handle),
            )
            for m in self._members.values()
        )
        members = list(self._members.values())
        return PoolStatus(
            profile=self.config.name,
            backend=self.config.backend,
            sandboxes=sandboxes,
            slots_free=sum(len(m.free) for m in members),
            slots_held=sum(len(m.held) for m in members),
            waiters=sum(1 for waiter in self._waiters if not waiter.reply.abandoned),
            starting=sum(1 for m in members if m.state is _State.STARTING),
            commands_run=self._finished_commands + sum(m.actor.commands_run for m in members),
            command_failures=self._finished_failures
            + sum(m.actor.command_failures for m in members),
            infra_failures=self.infra_failures,
            sandboxes_started=self.sandboxes_started,
            sandboxes_stopped=self.sandboxes_stopped,
            sandboxes_lost=self.sandboxes_lost,
        )

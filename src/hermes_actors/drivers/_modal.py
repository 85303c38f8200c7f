"""The modal driver: sandboxes are Modal Sandboxes, driven through the real `modal` client.

Per app (cached): `App.lookup(app_name, create_if_missing=True)`. Per image and per secret
(cached): `Image.from_registry(image)`, `Secret.from_name(name)` (hydrated once here, so an
unknown secret is reported by name). Each sandbox: `Sandbox.create` with cpu, memory, gpu,
`timeout=max_lifetime`, `idle_timeout`, `workdir=workspace_base`, env, secrets, tags and
`block_network` always explicit, then the agent is started as ONE long-lived exec
(`python3 -c BOOTSTRAP`) whose stdin/stdout are the stream the client speaks over. A command
then costs one stdin write; its reply rides the already open stdout stream.

Why an exec and not the sandbox's entrypoint: exec stdio works the same on both of Modal's
sandbox paths (the `gpu=` path has no entrypoint stdio), the agent's exit code is readable, and
a running exec is what Modal's `idle_timeout` counts as activity. So a sandbox whose slots are
held never idles out between commands (the client's heartbeat writes stdin too), sandboxes
nobody holds are stopped by the pool's own idle policy, and a sandbox whose host crashed ends
twice over: the agent's dead-man switch ends the exec, then `idle_timeout` reclaims the sandbox.

No modal call blocks the trio loop (see `_modal_stream.call_modal`); cancellation reaches the
server call. Death is detected by the end of the agent's stdout (pumped by a dedicated thread)
and by a long-poll `Sandbox.wait` future, whichever comes first.

Creation is throttled driver-wide (`CreateThrottle`: creates per second, and a cap on sandboxes
starting at once; Modal's limits are per account), and retried with backoff on rate limits
(`ResourceExhaustedError`) and transient errors. Every create attempt carries a unique
`hermes-create-id` tag: an attempt that was cancelled or failed after the server may have
accepted it is swept by that tag (listed and terminated), so a retry never duplicates a sandbox
and a cancelled create never leaves one running.

Errors are mapped here and only here, to `hermes_actors._errors`, and say what to do.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import functools
import logging
import math
import posixpath
import secrets
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import trio

from hermes_actors._agent import BOOTSTRAP, SLOT_UID_BASE
from hermes_actors._config import SandboxConfig
from hermes_actors._errors import (
    BackendUnavailable,
    HermesError,
    SandboxStartFailed,
    TransferFailed,
)
from hermes_actors.drivers._modal_stream import (
    FUTURES_SUPPORTED,
    StdinStream,
    StdoutPump,
    await_future,
    call_modal,
)

__all__ = [
    "CreateThrottle",
    "ModalDriver",
    "ModalSandbox",
    "ReapedSandbox",
]

logger = logging.getLogger("hermes_actors.drivers.modal")

_Created = TypeVar("_Created")

#: The environment variable that marks every process of a sandbox (as the local driver does).
SANDBOX_MARKER_VAR = "HERMES_SANDBOX_ID"
#: Tags the driver sets on every sandbox (user tags cannot override them).
TAG_APP = "hermes-app"
TAG_PROFILE = "hermes-profile"
TAG_RUN = "hermes-run"
TAG_CREATED_AT = "hermes-created-at"
TAG_CREATE_ID = "hermes-create-id"

#: Modal's observed account limits are 5 to 30 sandbox creations per second; stay under the lowest.
DEFAULT_CREATES_PER_SECOND = 4.0
#: Sandboxes starting at once, driver-wide. Large RL users had to stay at or below 128 to avoid
#: "did not start within 299s"; a smaller default keeps a first run well clear of it.
DEFAULT_MAX_STARTING = 32
#: Delays before each retry of a create refused by a rate limit or a transient failure. Not
#: jittered: the throttle already spaces creates, and every refusal pushes it back for all.
DEFAULT_RETRY_DELAYS_S: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
#: How long the agent may take to end its commands and exit once its stdin is closed.
GRACEFUL_EXIT_S = 3.0
#: Bound on a sandbox terminate RPC, and on the stdout pump finishing after it.
TERMINATE_RPC_S = 15.0
PUMP_STOP_S = 5.0
#: How long `ModalSandbox.wait_exited` waits for the sandbox's own status once its agent's
#: stream ended (the sandbox may have ended it).
SANDBOX_STATUS_GRACE_S = 1.0
#: Bound on sweeping (listing and terminating) what a failed or cancelled create left behind.
SWEEP_S = 30.0
#: How long Modal keeps a directory snapshot made to move a tree between sandboxes (it is
#: mounted within seconds; after this it expires by itself, so none outlives a crash for long).
SNAPSHOT_TTL_S = 3600
#: Bound on one snapshot or mount call (Modal's own default for snapshots is 55 s).
SNAPSHOT_TIMEOUT_S = 120


def import_modal() -> Any:
    """The `modal` module, or `BackendUnavailable` saying how to install it."""
    try:
        import modal
    except ImportError as exc:
        raise BackendUnavailable(
            "the modal backend needs the `modal` package, which is not installed: run "
            "`pip install 'hermes-actors[modal]'`, then authenticate with `modal token new`"
        ) from exc
    _quiet_modal_at_exit()
    return modal


_quieted = False


def _quiet_modal_at_exit() -> None:
    """Keep modal's interpreter-shutdown noise (loop teardown, pending RPCs) away from users.

    At exit modal's background loop may log tracebacks for calls cut short by the shutdown;
    they say nothing a user can act on. Registered once, after modal's own handlers were (atexit
    runs in reverse order, so this runs first).
    """
    global _quieted
    if _quieted:
        return
    _quieted = True

    def silence() -> None:
        for name in ("modal", "modal-client", "modal.client", "synchronicity", "grpclib"):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)

    atexit.register(silence)


# -- errors ---------------------------------------------------------------------------------------


def _modal_exception(modal: Any, name: str) -> type[BaseException]:
    found = getattr(modal.exception, name, None)
    return found if isinstance(found, type) else _NeverRaised


class _NeverRaised(Exception):
    """Stands in for a modal exception class this modal version does not have."""


def _is(modal: Any, exc: BaseException, *names: str) -> bool:
    return any(isinstance(exc, _modal_exception(modal, name)) for name in names)


def _is_rate_limit(modal: Any, exc: BaseException) -> bool:
    return _is(modal, exc, "ResourceExhaustedError")


def _is_transient(modal: Any, exc: BaseException) -> bool:
    return _is(
        modal, exc, "ServiceError", "InternalError", "ConnectionError", "InternalFailure"
    ) or (_is(modal, exc, "TimeoutError") and not _is(modal, exc, "SandboxTimeoutError"))


def _auth_error(exc: BaseException) -> BackendUnavailable:
    return BackendUnavailable(
        f"Modal did not accept the credentials ({exc}); run `modal token new` (or set "
        "MODAL_TOKEN_ID and MODAL_TOKEN_SECRET) and try again"
    )


def map_create_error(
    modal: Any, exc: BaseException, spec: SandboxConfig, *, attempts: int = 1, spent_s: float = 0.0
) -> HermesError:
    """The hermes error for a modal failure while starting a sandbox of `spec`.

    `attempts` and `spent_s` say how long the driver tried: the message and the error's
    `attempts` carry them, so the pool knows the retries are spent.
    """
    if isinstance(exc, HermesError):
        return exc
    tried = f" (gave up after {attempts} attempts in {spent_s:.1f} s)" if attempts > 1 else ""
    if _is(modal, exc, "AuthError", "PermissionDeniedError"):
        return _auth_error(exc)
    if _is(modal, exc, "ImageBuildError", "RemoteError"):
        return SandboxStartFailed(
            f"Modal could not pull or build the image {spec.image!r} of profile "
            f"{spec.name!r}: {exc}. Check the image reference (and registry access), or set "
            "another `image` in the profile",
            retryable=False,
        )
    if _is_rate_limit(modal, exc):
        return SandboxStartFailed(
            f"Modal refused to start a sandbox of profile {spec.name!r} because of a quota "
            f"or rate limit ({exc}){tried}; retry later, lower `creates_per_second`/"
            "`max_starting`, or raise the account's limits",
            retryable=True,
            attempts=attempts,
        )
    if _is(modal, exc, "InvalidError", "NotFoundError", "AlreadyExistsError"):
        return SandboxStartFailed(
            f"Modal rejected the sandbox of profile {spec.name!r}: {exc}. Fix the profile "
            "(image, gpu, cpu, memory, timeouts) and try again",
            retryable=False,
        )
    return SandboxStartFailed(
        f"starting a Modal sandbox of profile {spec.name!r} failed: {exc!r}{tried}; retry "
        "later, and if it persists check https://status.modal.com",
        retryable=True,
        attempts=attempts,
    )


# -- the create throttle --------------------------------------------------------------------------


class CreateThrottle:
    """Spaces sandbox creations (`per_second`) and caps those in progress (`max_in_flight`).

    `async with throttle.slot():` waits for a place among the creates in flight, then for its
    turn (arrival order), then for the next start time, `1 / current_per_second` after the last.
    `penalize` (a rate-limit refusal, which is account-wide) pushes the next start back for
    everyone and halves the pace, also for creates already waiting; each `accepted` create
    raises it again by a fiftieth of `per_second`, up to `per_second` (additive increase,
    multiplicative decrease, as TCP does):
    a limit lower than configured is found and then kept to, instead of hit again at full pace
    after every penalty. The pace never drops below `per_second / MIN_PACE_DIVISOR`. With
    `adaptive=False` the pace stays fixed (a penalty only pushes the next start back).
    Cancellation while waiting gives the place back; the reserved start time is simply skipped.
    """

    MIN_PACE_DIVISOR = 16.0

    def __init__(self, *, per_second: float, max_in_flight: int, adaptive: bool = True) -> None:
        if not per_second > 0:
            raise ValueError(f"per_second must be > 0: {per_second!r}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1: {max_in_flight!r}")
        self.per_second = per_second
        self.max_in_flight = max_in_flight
        self.adaptive = adaptive
        self.current_per_second = per_second
        self._next_start = -math.inf
        self._in_flight = trio.Semaphore(max_in_flight)
        self._turn = trio.Lock()  # fair: creates start in arrival order
        self.started = 0

    def slot(self) -> _ThrottleSlot:
        return _ThrottleSlot(self)

    def penalize(self, delay_s: float) -> None:
        """A create was refused for the rate: none starts within `delay_s`; halve the pace."""
        self._next_start = max(self._next_start, trio.current_time() + delay_s)
        if not self.adaptive:
            return
        floor = self.per_second / self.MIN_PACE_DIVISOR
        self.current_per_second = max(floor, self.current_per_second / 2)

    def accepted(self) -> None:
        """A create was accepted: raise the pace a step towards `per_second`."""
        self.current_per_second = min(
            self.per_second, self.current_per_second + self.per_second / 50
        )

    @property
    def in_flight(self) -> int:
        return self.max_in_flight - self._in_flight.value

    async def _enter(self) -> None:
        await self._in_flight.acquire()
        try:
            async with self._turn:
                # Only the head of the line waits for its start time, which a penalty may move
                # while it sleeps (so: sleep again until the new time).
                while (now := trio.current_time()) < self._next_start:  # noqa: ASYNC110
                    await trio.sleep_until(self._next_start)
                self._next_start = now + 1.0 / self.current_per_second
        except BaseException:
            self._in_flight.release()
            raise
        self.started += 1

    def _exit(self) -> None:
        self._in_flight.release()


#: Why a failed create is retried: a refusal for the rate (which also pushes the throttle back
#: for every create) or a transient failure. None: it is not retried.
RetryReason = Literal["rate limit", "transient"]


async def create_with_retries(
    create_once: Callable[[], Awaitable[_Created]],
    *,
    throttle: CreateThrottle,
    retry_delays_s: Sequence[float],
    budget_s: float,
    retry_reason: Callable[[Exception], RetryReason | None],
    on_retry: Callable[[Exception, float], None],
    give_up: Callable[[Exception, int, float], Exception],
) -> _Created:
    """The create loop both the modal and the simulated drivers follow: `create_once` in a slot
    of `throttle`, retried after each of `retry_delays_s` in turn while `retry_reason` gives a
    reason and the retry's wait ends within `budget_s` seconds of the first attempt.

    `on_retry(error, delay)` is told of each retry before its wait. When the retries are over,
    raises `give_up(error, attempts, seconds spent)` from the last error (or that error itself,
    when `give_up` returns it). Cancellation ends the loop at once.
    """
    delays = iter(retry_delays_s)
    started = trio.current_time()
    attempts = 0
    while True:
        attempts += 1
        try:
            async with throttle.slot():
                created = await create_once()
            throttle.accepted()
            return created
        except Exception as exc:
            reason = retry_reason(exc)
            delay = next(delays, None) if reason is not None else None
            spent = trio.current_time() - started
            if delay is not None and spent + delay > budget_s:
                delay = None
            if delay is None:
                failure = give_up(exc, attempts, spent)
                if failure is exc:
                    raise
                raise failure from exc
            on_retry(exc, delay)
            if reason == "rate limit":
                throttle.penalize(delay)
            await trio.sleep(delay)


class _ThrottleSlot:
    def __init__(self, throttle: CreateThrottle) -> None:
        self._throttle = throttle

    async def __aenter__(self) -> None:
        await self._throttle._enter()

    async def __aexit__(self, *exc_info: object) -> None:
        self._throttle._exit()


# -- one sandbox ----------------------------------------------------------------------------------


class ModalSandbox:
    """One Modal sandbox with the agent running in a long-lived exec (see the module docstring).

    `stream` is a `trio.StapledStream` of the exec's stdin (`StdinStream`) and stdout
    (`StdoutStream`). The sandbox counts as exited once the agent's exec ended or the sandbox
    itself ended, whichever is seen first.
    """

    def __init__(
        self,
        *,
        driver: ModalDriver,
        sandbox: Any,
        process: Any,
        spec: SandboxConfig,
    ) -> None:
        self._driver = driver
        self._sandbox = sandbox
        self._process = process
        self.spec = spec
        self.isolated = True
        self.network = spec.network  # `block_network` is always passed explicitly
        self._sandbox_id: str = sandbox.object_id
        self._pump = StdoutPump(
            process, name=f"hermes-modal-stdout:{self._sandbox_id}", on_end=self._agent_ended
        )
        self._stdin = StdinStream(process, sandbox_id=self._sandbox_id)
        self._stream = trio.StapledStream(self._stdin, self._pump.stream)
        self._agent_config: dict[str, object] = {
            # Relative to the agent's working directory, which is `workspace_base` inside the
            # sandbox (the exec's workdir): the same directory, and it keeps an emulated sandbox
            # (local processes) inside its own directory.
            "workspace_root": ".",
            # The agent is root in the container: each slot's commands, shell and file work
            # run as its own unprivileged uid in a 0700 workspace, named in /etc/passwd.
            "slot_uid_base": SLOT_UID_BASE,
            "slot_accounts": spec.slots_per_sandbox,
            "slots": spec.slots_per_sandbox,
            "warm_shells": spec.shell == "persistent",
            "env": {SANDBOX_MARKER_VAR: self._sandbox_id},
        }
        self._exited = trio.Event()
        self._pump_ended = trio.Event()
        self._sandbox_wait_finished = trio.Event()
        self._exit_status: int | None = None
        self._terminated = False
        self._wait_future: Any = None
        self._token = trio.lowlevel.current_trio_token()

    def _start_watching(self) -> None:
        self._pump.start()
        if FUTURES_SUPPORTED:
            self._wait_future = self._sandbox.wait(raise_on_termination=False, _future=True)
            self._wait_future.add_done_callback(self._sandbox_wait_done)

    # -- the SandboxHandle protocol --

    @property
    def sandbox_id(self) -> str:
        return self._sandbox_id

    @property
    def stream(self) -> trio.StapledStream[StdinStream, Any]:
        return self._stream

    @property
    def agent_config(self) -> Mapping[str, object]:
        return self._agent_config

    def is_alive(self) -> bool:
        return not self._exited.is_set() and not self._terminated

    # -- DirectorySnapshots: trees between sandboxes without streaming them through the host --

    def _container_path(self, path: str) -> str:
        # The agent's workspace root is the exec's workdir, `workspace_base` in the container.
        return posixpath.normpath(posixpath.join(self.spec.workspace_base, path))

    async def snapshot_directory(self, path: str, *, ttl_s: int = SNAPSHOT_TTL_S) -> object:
        """`Sandbox.snapshot_directory` of `path` (one call), kept `ttl_s` seconds."""
        return await self._snapshot_call(
            "snapshotting",
            path,
            self._sandbox.snapshot_directory,
            self._container_path(path),
            timeout=SNAPSHOT_TIMEOUT_S,
            ttl=ttl_s,
        )

    async def delete_snapshot(self, snapshot: object) -> None:
        """`modal.experimental.image_delete` of a snapshot (one control-plane call; the
        sandbox need not run any more)."""
        modal = import_modal()
        image_id = str(getattr(snapshot, "object_id", ""))
        try:
            await call_modal(modal.experimental.image_delete, image_id)
        except Exception as exc:
            raise TransferFailed(
                f"deleting snapshot {image_id} of Modal sandbox {self._sandbox_id} failed: "
                f"{exc!r}; it expires by itself at its ttl"
            ) from exc

    async def mount_snapshot(self, path: str, snapshot: object) -> None:
        """`Sandbox.mount_image` of `snapshot` at `path` (one call)."""
        await self._snapshot_call(
            "mounting a snapshot at",
            path,
            self._sandbox.mount_image,
            self._container_path(path),
            snapshot,
        )

    async def unmount_snapshot(self, path: str) -> None:
        """`Sandbox.unmount_image` at `path` (one call)."""
        await self._snapshot_call(
            "unmounting the snapshot at",
            path,
            self._sandbox.unmount_image,
            self._container_path(path),
        )

    async def _snapshot_call(
        self, doing: str, path: str, function: Any, *args: Any, **kwargs: Any
    ) -> Any:
        try:
            return await call_modal(function, *args, **kwargs)
        except Exception as exc:
            raise TransferFailed(
                f"{doing} {path!r} in Modal sandbox {self._sandbox_id} failed: {exc!r}; the "
                "tree was not moved, retry the fork (if it persists, check "
                "https://status.modal.com)"
            ) from exc

    async def wait_exited(self) -> int | None:
        """Wait until the agent's exec or the sandbox ended; its exit status when known.

        The status is the sandbox's return code when the sandbox ended (124 after its lifetime
        or idle timeout, 137 after terminate), else the agent's exit code. An agent killed by
        a signal was often killed by its sandbox ending, whose long poll answers just after the
        agent's stream ends: the poll gets `SANDBOX_STATUS_GRACE_S` to say so, or the status
        would be the killed agent's 137 for a sandbox that reached its lifetime.
        """
        await self._exited.wait()
        killed = self._exit_status is not None and (
            self._exit_status < 0 or self._exit_status == 128 + signal.SIGKILL
        )
        if killed and self._wait_future is not None and not self._wait_future.done():
            with trio.move_on_after(SANDBOX_STATUS_GRACE_S):
                await self._sandbox_wait_finished.wait()
            sandbox_code = self._sandbox_returncode()
            if sandbox_code is not None:
                return sandbox_code
        return self._exit_status

    async def terminate(self) -> None:
        """Stop the agent, then the sandbox, and the stdout pump. Idempotent.

        Graceful first: closing the agent's stdin makes it kill every command it started and
        exit (bounded by `GRACEFUL_EXIT_S`). Then forceful: the sandbox is terminated (one RPC,
        bounded by `TERMINATE_RPC_S`; if Modal does not answer, the sandbox is left to its
        `idle_timeout` and max lifetime, with a warning). Shielded, so safe to call from a
        cancelled scope.
        """
        if self._terminated:
            await trio.lowlevel.checkpoint()
            return
        self._terminated = True
        with trio.CancelScope(shield=True):
            if not self._pump_ended.is_set():
                with trio.move_on_after(GRACEFUL_EXIT_S):
                    await self._stdin.aclose()
                    await self._pump_ended.wait()
            with trio.move_on_after(TERMINATE_RPC_S) as rpc_scope:
                try:
                    await call_modal(self._sandbox.terminate)
                except Exception as exc:
                    logger.warning(
                        "terminating Modal sandbox %s failed (%r); it ends by itself when its "
                        "agent notices the host is gone, or at its idle/max lifetime timeout",
                        self._sandbox_id,
                        exc,
                    )
            if rpc_scope.cancelled_caught:
                logger.warning(
                    "Modal did not confirm terminating sandbox %s within %g s; it ends by "
                    "itself at its idle or max lifetime timeout",
                    self._sandbox_id,
                    TERMINATE_RPC_S,
                )
            # Unblocks a pump waiting on a reader that is gone; it stops once stdout ends.
            self._pump.stream.close()
            with trio.move_on_after(PUMP_STOP_S):
                await self._pump_ended.wait()
                if self._wait_future is not None:
                    # Let the long poll answer (the sandbox has ended) rather than reset it.
                    await self._sandbox_wait_finished.wait()
            if self._wait_future is not None and not self._wait_future.done():
                self._wait_future.cancel()
            self._mark_exited(self._sandbox_returncode())
            self._driver._forget(self)

    # -- internals --

    def _sandbox_returncode(self) -> int | None:
        try:
            code = self._sandbox.returncode
        except Exception:
            return None
        return code if isinstance(code, int) else None

    def _mark_exited(self, status: int | None) -> None:
        if not self._exited.is_set():
            self._exit_status = status
            self._exited.set()

    def _agent_ended(self, exit_code: int | None) -> None:
        self._pump_ended.set()
        sandbox_code = self._sandbox_returncode()
        self._mark_exited(sandbox_code if sandbox_code is not None else exit_code)

    def _sandbox_wait_done(self, future: Any) -> None:
        # Runs on modal's loop thread.
        if future.cancelled():
            return
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._sandbox_ended)

    def _sandbox_ended(self) -> None:
        self._sandbox_wait_finished.set()
        self._mark_exited(self._sandbox_returncode())


# -- reaping --------------------------------------------------------------------------------------


class ReapedSandbox:
    """A sandbox `reap` terminated: its id and the tags that identified it."""

    def __init__(self, sandbox_id: str, tags: Mapping[str, str]) -> None:
        self.sandbox_id = sandbox_id
        self.tags = dict(tags)

    def __repr__(self) -> str:
        return f"ReapedSandbox({self.sandbox_id!r}, run={self.tags.get(TAG_RUN)!r})"


def _list_sandboxes(modal: Any, app_id: str, tags: Mapping[str, str]) -> list[Any]:
    """Blocking: every running sandbox of the app with at least these tags (runs in a thread)."""
    return list(modal.Sandbox.list(app_id=app_id, tags=dict(tags)))


async def _in_dedicated_thread(function: Any, *args: Any) -> Any:
    """Run a blocking generator-based modal call in a thread of its own (not trio's cache)."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(function(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="hermes-modal-list", daemon=True).start()
    return await await_future(future)


# -- the driver -----------------------------------------------------------------------------------


class ModalDriver:
    """Starts sandboxes on Modal. One instance serves every modal profile of a runtime.

    `run_id` is tagged on every sandbox (`reap` tells this run's sandboxes from others' by it).
    `creates_per_second` and `max_starting` throttle creation driver-wide; `retry_delays_s`
    are the waits before each retry of a create refused by a rate limit or a transient
    failure. With `reap_on_start`, the first use of an app first reaps what other runs left in it.
    """

    name = "modal"

    def __init__(
        self,
        *,
        run_id: str,
        creates_per_second: float = DEFAULT_CREATES_PER_SECOND,
        max_starting: int = DEFAULT_MAX_STARTING,
        retry_delays_s: Sequence[float] = DEFAULT_RETRY_DELAYS_S,
        reap_on_start: bool = False,
        reap_min_age_s: float = 0.0,
    ) -> None:
        self.run_id = run_id
        self.throttle = CreateThrottle(per_second=creates_per_second, max_in_flight=max_starting)
        self.retry_delays_s = tuple(retry_delays_s)
        self.reap_on_start = reap_on_start
        self.reap_min_age_s = reap_min_age_s
        self._apps: dict[str, Any] = {}
        self._app_lock = trio.Lock()
        # Per app, image and added Python: a second sandbox of an image reuses the built one.
        self._images: dict[tuple[str, str, str | None], Any] = {}
        self._secrets: dict[str, Any] = {}
        self._reaped_apps: set[str] = set()
        self._live: dict[str, ModalSandbox] = {}
        self.sandboxes_started = 0
        self.create_retries = 0
        self.swept: list[str] = []
        self._closed = False

    # -- cached provider objects --

    async def _app(self, modal: Any, app_name: str) -> Any:
        async with self._app_lock:
            app = self._apps.get(app_name)
            if app is None:
                try:
                    app = await call_modal(modal.App.lookup, app_name, create_if_missing=True)
                except Exception as exc:
                    if _is(modal, exc, "AuthError", "PermissionDeniedError"):
                        raise _auth_error(exc) from exc
                    if _is(modal, exc, "InvalidError"):
                        raise SandboxStartFailed(
                            f"Modal rejected the app name {app_name!r}: {exc}; set a valid "
                            "`app_name` (letters, digits, '-', '_', '.')",
                            retryable=False,
                        ) from exc
                    raise
                self._apps[app_name] = app
            return app

    def _image(self, modal: Any, app_name: str, image: str, add_python: str | None) -> Any:
        """The image object for `image` (with Python `add_python` added, if given), built once
        per app: later sandboxes of the same image reuse it."""
        key = (app_name, image, add_python)
        cached = self._images.get(key)
        if cached is None:
            try:
                if add_python is None:
                    cached = modal.Image.from_registry(image)
                else:
                    cached = modal.Image.from_registry(image, add_python=add_python)
            except Exception as exc:
                raise SandboxStartFailed(
                    f"invalid image reference {image!r} (add_python={add_python!r}): {exc}",
                    retryable=False,
                ) from exc
            self._images[key] = cached
        return cached

    async def _secret(self, modal: Any, name: str, spec: SandboxConfig) -> Any:
        cached = self._secrets.get(name)
        if cached is None:
            secret = modal.Secret.from_name(name)
            try:
                await call_modal(secret.hydrate)
            except Exception as exc:
                if _is(modal, exc, "NotFoundError"):
                    raise SandboxStartFailed(
                        f"the Modal secret {name!r} (profile {spec.name!r}) does not exist: "
                        f"create it with `modal secret create {name} KEY=value`, or remove it "
                        "from the profile's `secrets`",
                        retryable=False,
                    ) from exc
                if _is(modal, exc, "AuthError", "PermissionDeniedError"):
                    raise _auth_error(exc) from exc
                raise map_create_error(modal, exc, spec) from exc
            cached = self._secrets[name] = secret
        return cached

    # -- create --

    def create_arguments(self, spec: SandboxConfig, *, create_id: str) -> dict[str, Any]:
        """The `Sandbox.create` keywords for `spec` (app, image and secrets added by `create`)."""
        tags = {
            **spec.tags,
            TAG_APP: spec.app_name,
            TAG_PROFILE: spec.name,
            TAG_RUN: self.run_id,
            TAG_CREATED_AT: str(int(time.time())),
            TAG_CREATE_ID: create_id,
        }
        return {
            "cpu": float(spec.cpu),
            "memory": int(spec.memory),
            "gpu": spec.gpu,
            "timeout": max(1, math.ceil(spec.max_lifetime)),
            "idle_timeout": max(1, math.ceil(spec.idle_timeout)),
            "workdir": spec.workspace_base,
            "env": dict(spec.env_vars),
            "tags": tags,
            "block_network": not spec.network,
        }

    async def create(self, spec: SandboxConfig) -> ModalSandbox:
        """Start one sandbox and its agent exec; see `SandboxDriver.create`.

        Retries rate-limit refusals and transient failures with backoff (`retry_delays_s`),
        within `spec.create_retry_budget_s` seconds (a retry whose wait would end past it is not
        made), sweeping what a failed attempt may have left, so a sandbox is never duplicated. If
        cancelled or failing once the server accepted the sandbox, terminates it before raising.
        Raises `BackendUnavailable` (modal missing, not authenticated) or `SandboxStartFailed`.
        """
        if self._closed:
            raise BackendUnavailable("the modal driver is closed")
        modal = import_modal()
        app = await self._app(modal, spec.app_name)
        if self.reap_on_start and spec.app_name not in self._reaped_apps:
            self._reaped_apps.add(spec.app_name)
            await self.reap(spec.app_name, min_age_s=self.reap_min_age_s)
        secret_objects = [await self._secret(modal, name, spec) for name in spec.secrets]
        image = self._image(modal, spec.app_name, spec.image, spec.add_python)

        def retry_reason(exc: Exception) -> RetryReason | None:
            if _is_rate_limit(modal, exc):
                return "rate limit"
            return "transient" if _is_transient(modal, exc) else None

        def on_retry(exc: Exception, delay: float) -> None:
            self.create_retries += 1
            logger.info(
                "creating a Modal sandbox of profile %r failed (%r); retrying in %g s",
                spec.name,
                exc,
                delay,
            )

        return await create_with_retries(
            functools.partial(self._create_once, modal, app, image, secret_objects, spec),
            throttle=self.throttle,
            retry_delays_s=self.retry_delays_s,
            budget_s=spec.create_retry_budget_s,
            retry_reason=retry_reason,
            on_retry=on_retry,
            give_up=lambda exc, attempts, spent: map_create_error(
                modal, exc, spec, attempts=attempts, spent_s=spent
            ),
        )

    async def _create_once(
        self, modal: Any, app: Any, image: Any, secret_objects: list[Any], spec: SandboxConfig
    ) -> ModalSandbox:
        create_id = secrets.token_hex(8)
        arguments = self.create_arguments(spec, create_id=create_id)
        try:
            sandbox = await call_modal(
                modal.Sandbox.create, app=app, image=image, secrets=secret_objects, **arguments
            )
        except BaseException as exc:
            # Refusals that cannot have created anything need no sweep.
            if not (
                isinstance(exc, Exception)
                and _is(
                    modal,
                    exc,
                    "ResourceExhaustedError",
                    "InvalidError",
                    "NotFoundError",
                    "AuthError",
                    "PermissionDeniedError",
                    "ImageBuildError",
                )
            ):
                await self._sweep(modal, app, create_id)
            raise
        try:
            process = await call_modal(
                sandbox.exec,
                "python3",
                "-c",
                BOOTSTRAP,
                text=False,
                stderr=modal.stream_type.StreamType.DEVNULL,
                workdir=spec.workspace_base,
                env={SANDBOX_MARKER_VAR: sandbox.object_id},
            )
            handle = ModalSandbox(driver=self, sandbox=sandbox, process=process, spec=spec)
            handle._start_watching()
        except BaseException:
            with trio.move_on_after(TERMINATE_RPC_S, shield=True):
                try:
                    await call_modal(sandbox.terminate)
                except Exception as exc:
                    logger.warning(
                        "terminating Modal sandbox %s after a failed start failed: %r",
                        sandbox.object_id,
                        exc,
                    )
            raise
        self._live[handle.sandbox_id] = handle
        self.sandboxes_started += 1
        return handle

    async def _sweep(self, modal: Any, app: Any, create_id: str) -> None:
        """Terminate whatever a failed or cancelled create attempt left (found by its tag)."""
        with trio.move_on_after(SWEEP_S, shield=True):
            try:
                found = await _in_dedicated_thread(
                    _list_sandboxes, modal, app.app_id, {TAG_CREATE_ID: create_id}
                )
                for sandbox in found:
                    self.swept.append(sandbox.object_id)
                    logger.info("terminating Modal sandbox %s of an aborted create", sandbox)
                    await call_modal(sandbox.terminate)
            except Exception as exc:
                logger.warning(
                    "could not check for a sandbox left by an aborted create (tag %s=%s): %r; "
                    "`reap` finds it later",
                    TAG_CREATE_ID,
                    create_id,
                    exc,
                )

    # -- orphans --

    async def reap(
        self,
        app_name: str,
        *,
        min_age_s: float = 0.0,
        spare_runs: Collection[str] = (),
        dry_run: bool = False,
    ) -> list[ReapedSandbox]:
        """Terminate running sandboxes of `app_name` left by other runs; return what was reaped.

        Found by tag (`hermes-app`); spared: this driver's own run, the runs in `spare_runs`
        (known to be alive), and sandboxes younger than `min_age_s` (by their
        `hermes-created-at` tag). Use `min_age_s` when other live runs may share the app. With
        `dry_run`, nothing is terminated: the result is what would be. Raises
        `BackendUnavailable` when modal is missing or not authenticated.
        """
        modal = import_modal()
        app = await self._app(modal, app_name)
        found = await _in_dedicated_thread(_list_sandboxes, modal, app.app_id, {TAG_APP: app_name})
        now = time.time()
        reaped: list[ReapedSandbox] = []
        for sandbox in found:
            if sandbox.object_id in self._live:
                continue
            tags: dict[str, str] = dict(await call_modal(sandbox.get_tags))
            if tags.get(TAG_RUN) == self.run_id or tags.get(TAG_RUN) in spare_runs:
                continue
            created_at = _float_or_none(tags.get(TAG_CREATED_AT))
            if min_age_s > 0 and (created_at is None or now - created_at < min_age_s):
                continue
            if dry_run:
                reaped.append(ReapedSandbox(sandbox.object_id, tags))
                continue
            with trio.move_on_after(TERMINATE_RPC_S) as scope:
                await call_modal(sandbox.terminate)
            if scope.cancelled_caught:
                logger.warning("Modal did not confirm terminating orphan %s", sandbox.object_id)
                continue
            logger.info(
                "reaped Modal sandbox %s left by run %s", sandbox.object_id, tags.get(TAG_RUN)
            )
            reaped.append(ReapedSandbox(sandbox.object_id, tags))
        return reaped

    # -- lifecycle --

    def live_sandboxes(self) -> Iterable[ModalSandbox]:
        return list(self._live.values())

    def _forget(self, handle: ModalSandbox) -> None:
        self._live.pop(handle.sandbox_id, None)

    async def aclose(self) -> None:
        """Stop the driver's threads: sandboxes still running are terminated (with a warning).

        Their owners normally terminated them already; one still running here would keep its
        stdout thread (and the provider's bill) going. Idempotent.
        """
        self._closed = True
        leftovers = list(self._live.values())
        if leftovers:
            logger.warning(
                "modal driver closing with %d sandbox(es) still running: terminating them",
                len(leftovers),
            )
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for handle in leftovers:
                    nursery.start_soon(handle.terminate)


def _float_or_none(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None

"""The one error hierarchy of hermes-actors.

Infrastructure failures (a sandbox lost, a start that failed, a backend that is unavailable, an
acquire that timed out) are kept apart from command failures (non-zero exit, command timeout,
which are results, not exceptions): a trainer masks the former instead of scoring them as a
policy failure, and `retryable` says whether trying again can help. Every message says what to
do next.
"""

from __future__ import annotations


class HermesError(Exception):
    """Base of every error raised by hermes-actors."""


class ConfigError(HermesError, ValueError):
    """A configuration value is wrong; the message names the source and the path."""


class IsolationUnavailable(HermesError, RuntimeError):
    """The requested local isolation (bubblewrap) cannot be used on this machine."""


class AgentError(HermesError):
    """The in-sandbox agent refused or failed one operation; the sandbox itself is fine.

    `code` is a stable machine-readable reason (`path_escape`, `not_found`, `bad_request`, ...).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.detail = message


class InfrastructureError(HermesError):
    """The sandbox infrastructure failed, not the command: mask it rather than score it."""

    kind: str = "infrastructure"
    retryable: bool = True


class SandboxLost(InfrastructureError):
    """The sandbox (or its agent) died or its stream broke; work in flight there is lost."""

    kind = "sandbox_lost"

    def __init__(self, sandbox_id: str, reason: str) -> None:
        super().__init__(
            f"sandbox {sandbox_id} was lost ({reason}); the command did not complete. "
            "Retry on a fresh slot: the pool replaces the sandbox."
        )
        self.sandbox_id = sandbox_id
        self.reason = reason

    def again(self) -> SandboxLost:
        """A fresh error for the same loss (one error object must not be raised in two tasks)."""
        return SandboxLost(self.sandbox_id, self.reason)


class SandboxStartFailed(InfrastructureError):
    """A sandbox could not be started.

    `attempts` is how many times the driver tried before giving up: above 1, the driver's own
    retries are spent, so the pool reports the failure to its waiters at once.
    """

    kind = "start_failed"

    def __init__(self, message: str, *, retryable: bool = True, attempts: int = 1) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.attempts = attempts


class BackendUnavailable(InfrastructureError):
    """The backend cannot be used at all (not installed, not authenticated, ...)."""

    kind = "backend_unavailable"
    retryable = False


class AcquireTimeout(InfrastructureError, TimeoutError):
    """No slot became free before the acquire deadline."""

    kind = "acquire_timeout"

    def __init__(self, profile: str, timeout_s: float) -> None:
        super().__init__(
            f"no slot of profile {profile!r} became free within {timeout_s:g} s; raise "
            "max_sandboxes or slots_per_sandbox, release slots sooner, or raise acquire_timeout_s"
        )
        self.profile = profile
        self.timeout_s = timeout_s


class RuntimeStopped(InfrastructureError):
    """The runtime (or the actor that held the request) stopped before answering."""

    kind = "runtime_stopped"
    retryable = False


class CheckpointLimitExceeded(HermesError):
    """A pool already holds as many checkpoints (or checkpoint bytes) as it may."""

    def __init__(self, profile: str, what: str, limit: int) -> None:
        super().__init__(
            f"the pool of profile {profile!r} holds its limit of {limit} checkpoint {what}; "
            "release checkpoints you no longer need (`release_checkpoint`) or raise the limit"
        )
        self.profile = profile
        self.what = what
        self.limit = limit


class CheckpointLost(InfrastructureError):
    """A checkpoint is gone: released, or its sandbox (where it was stored) stopped."""

    kind = "checkpoint_lost"
    retryable = False

    def __init__(self, checkpoint_id: str, reason: str) -> None:
        super().__init__(
            f"checkpoint {checkpoint_id} cannot be used: {reason}; take a new checkpoint"
        )
        self.checkpoint_id = checkpoint_id
        self.reason = reason


class TransferFailed(HermesError):
    """A directory upload or download failed (tar in the sandbox or on the host refused it)."""

"""hermes-actors: pools of isolated sandboxes for AI agents and RL trainers, run by trio actors.

Trainers use `ToolBackend` (alias `ModalToolBackend`): acquire a `Slot` per trajectory, run
tool calls for many slots at once with `execute_batch`, release. Agents use `terminal_tool` and
`cleanup_vm`. Both read the same profiles (`SandboxConfig`, `load_profiles`).
"""

import hermes_actors._logging  # noqa: F401  (the layer loggers' filters)
from hermes_actors._config import (
    ModalSandboxConfig,
    Profiles,
    SandboxConfig,
    load_profiles,
    profiles_from_mapping,
)
from hermes_actors._errors import (
    AcquireTimeout,
    AgentError,
    BackendUnavailable,
    CheckpointLimitExceeded,
    CheckpointLost,
    ConfigError,
    HermesError,
    InfrastructureError,
    IsolationUnavailable,
    RuntimeStopped,
    SandboxLost,
    SandboxStartFailed,
    TransferFailed,
)
from hermes_actors._output import OutputBuffer, OutputChunk
from hermes_actors._progress import Progress
from hermes_actors.cli._render import format_status
from hermes_actors.facades import (
    ArtifactTooLarge,
    ExecutionResult,
    ModalToolBackend,
    Slot,
    SlotState,
    ToolBackend,
    ToolResult,
)
from hermes_actors.runtime._trees import Checkpoint
from hermes_actors.terminal_tool import (
    cleanup_vm,
    register_task_image,
    shutdown_terminal_backend,
    terminal_tool,
)

__all__ = [
    "AcquireTimeout",
    "AgentError",
    "ArtifactTooLarge",
    "BackendUnavailable",
    "Checkpoint",
    "CheckpointLimitExceeded",
    "CheckpointLost",
    "ConfigError",
    "ExecutionResult",
    "HermesError",
    "InfrastructureError",
    "IsolationUnavailable",
    "ModalSandboxConfig",
    "ModalToolBackend",
    "OutputBuffer",
    "OutputChunk",
    "Profiles",
    "Progress",
    "RuntimeStopped",
    "SandboxConfig",
    "SandboxLost",
    "SandboxStartFailed",
    "Slot",
    "SlotState",
    "ToolBackend",
    "ToolResult",
    "TransferFailed",
    "cleanup_vm",
    "format_status",
    "load_profiles",
    "profiles_from_mapping",
    "register_task_image",
    "shutdown_terminal_backend",
    "terminal_tool",
]

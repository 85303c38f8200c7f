"""The gRPC side of the Modal emulator: control plane and task command router handlers.

Both services are served from one grpclib server on the emulator's asyncio loop. Handlers are
looked up by RPC name; every RPC the emulator does not implement answers `UNIMPLEMENTED` with a
message naming it (never an exception: the client retries handlers that raise). A bug inside a
handler is also answered with an explicit non-retryable status and recorded in
`internal_errors()`, so a test sees it at once instead of waiting out the client's retries.

Thread model: the loop owns apps, images and sandboxes. The call log, counters, secrets and
fault settings are shared with the test thread under one lock.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar, cast

import attrs
import grpclib.const
import h2.exceptions

# protobuf ships no type stubs here (types-protobuf is not a dev dependency).
from google.protobuf import empty_pb2  # type: ignore[import-untyped]
from grpclib import GRPCError, Status
from grpclib.exceptions import ProtocolError, StreamTerminatedError
from grpclib.server import Stream
from modal_proto import api_pb2
from modal_proto import task_command_router_pb2 as sr_pb2
from modal_proto.api_grpc import ModalClientBase
from modal_proto.task_command_router_grpc import TaskCommandRouterBase

from ._emulator_sandbox import LocalProcess, LocalSandbox, OutputBuffer, StdinGapError
from ._emulator_snapshots import SnapshotStore, container_path, copy_tree, is_directory

logger = logging.getLogger("hermes_actors.testing.modal_emulator")

KillReason = Literal["timeout", "idle_timeout", "terminated", "internal_failure"]
AnyStream: TypeAlias = Stream[Any, Any]
Handler: TypeAlias = Callable[[AnyStream], Awaitable[None]]

_STREAM_CHUNK = 64 * 1024
_LIST_PAGE_SIZE = 100
_ENVIRONMENT_ID = "en-emulator00000000000000"
_IMAGE_BUILDER_VERSION = "2025.06"
_FROM_LINE = re.compile(r"^\s*FROM\s+(\S+)", re.IGNORECASE)
_KILL_STATUSES: dict[KillReason, tuple[api_pb2.GenericResult.GenericStatus.ValueType, str]] = {
    "timeout": (
        api_pb2.GenericResult.GENERIC_STATUS_TIMEOUT,
        "Sandbox reached its maximum lifetime",
    ),
    "idle_timeout": (
        api_pb2.GenericResult.GENERIC_STATUS_TIMEOUT,
        "Sandbox was idle past its idle_timeout",
    ),
    "terminated": (
        api_pb2.GenericResult.GENERIC_STATUS_TERMINATED,
        "Sandbox was terminated by the provider",
    ),
    "internal_failure": (
        api_pb2.GenericResult.GENERIC_STATUS_INTERNAL_FAILURE,
        "Sandbox's worker failed (emulated provider outage)",
    ),
}


@attrs.frozen(kw_only=True)
class EmulatorCall:
    """One RPC received by the emulator: its method name and the request fields that matter."""

    method: str
    fields: Mapping[str, object]
    at: float


@attrs.frozen(kw_only=True)
class SandboxState:
    """A snapshot of one emulated sandbox."""

    sandbox_id: str
    task_id: str
    app_id: str
    root: Path
    started: bool
    returncode: int | None
    live_pids: tuple[int, ...]
    #: Sandbox paths with an image mounted (`Sandbox.mount_image`), relative to its root.
    mounts: tuple[str, ...] = ()


def _new_id(prefix: str, length: int = 22) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:length]}"


def make_jwt(subject: str, lifetime_secs: float = 3600.0) -> str:
    """A JWT-shaped token with an `exp` claim (the client never checks the signature)."""

    def encode(payload: Mapping[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()

    header = encode({"alg": "none", "typ": "JWT"})
    claims = encode(
        {"sub": subject, "iss": "modal-emulator", "exp": int(time.time() + lifetime_secs)}
    )
    return f"{header}.{claims}.{encode({'sig': 'unsigned'})}"


@attrs.define(kw_only=True)
class _Image:
    image_id: str
    tag: str | None
    commands: tuple[str, ...]
    #: What made it when it is a snapshot ("directory" or "filesystem"); its tree is in the
    #: service's `SnapshotStore`.
    snapshot: str | None = None


@attrs.define(kw_only=True)
class _Secret:
    secret_id: str
    name: str | None
    env: dict[str, str]


class _MethodTable:
    """Stands in for a generated service base so its `__mapping__` binds our dispatchers."""

    def __init__(self, resolve: Callable[[str], Handler]) -> None:
        self._resolve = resolve

    def __getattr__(self, name: str) -> Handler:
        return self._resolve(name)


class EmulatorService:
    """State and RPC handlers of the emulator (see the module docstring for the thread model)."""

    def __init__(
        self, *, root: Path, secrets: Mapping[str, Mapping[str, str]], failing_images: Iterable[str]
    ) -> None:
        self.root = root
        self.router_url = ""
        self._lock = threading.Lock()
        self._calls: list[EmulatorCall] = []
        self._counts: collections.Counter[str] = collections.Counter()
        self._internal_errors: list[str] = []
        self._secrets_by_name: dict[str, _Secret] = {}
        self._secrets_by_id: dict[str, _Secret] = {}
        self._failing_images = set(failing_images)
        # Registry images emulated as having no python3 (unless Python was added to them).
        self._images_without_python: set[str] = set()
        self._latency = 0.0
        self._slow_start = 0.0
        self._create_failures: collections.deque[tuple[Status, str]] = collections.deque()
        self._create_rate_limit: float | None = None
        self._create_times: collections.deque[float] = collections.deque()
        # Per RPC name: failures the next calls of that name answer with.
        self._call_failures: dict[str, collections.deque[tuple[Status, str]]] = {}
        # Owned by the loop.
        self.snapshots = SnapshotStore(root / ".snapshots")
        self._apps: dict[str, str] = {}
        self._images: dict[str, _Image] = {}
        self._image_keys: dict[tuple[tuple[str, ...], tuple[str, ...]], str] = {}
        self.sandboxes: dict[str, LocalSandbox] = {}
        self._sandboxes_by_task: dict[str, LocalSandbox] = {}
        self._last_created_at = 0.0
        for name, env in secrets.items():
            self.define_secret(name, env)

    # -- shared with the test thread --

    def define_secret(self, name: str, env: Mapping[str, str]) -> str:
        with self._lock:
            existing = self._secrets_by_name.get(name)
            secret = _Secret(
                secret_id=existing.secret_id if existing else _new_id("st"),
                name=name,
                env=dict(env),
            )
            self._secrets_by_name[name] = secret
            self._secrets_by_id[secret.secret_id] = secret
            return secret.secret_id

    def add_failing_image(self, tag: str) -> None:
        with self._lock:
            self._failing_images.add(tag)

    def add_image_without_python(self, tag: str) -> None:
        with self._lock:
            self._images_without_python.add(tag)

    def _lacks_python(self, sandbox: LocalSandbox) -> bool:
        """Whether the sandbox's image is one without python3 that had none added."""
        image = self._images.get(sandbox.definition.image_id)
        with self._lock:
            bare = image is not None and image.tag in self._images_without_python
        return (
            bare
            and image is not None
            and not any(line.startswith("COPY /python/") for line in image.commands)
        )

    def set_latency(self, seconds: float) -> None:
        with self._lock:
            self._latency = seconds

    def set_slow_start(self, seconds: float) -> None:
        with self._lock:
            self._slow_start = seconds

    def fail_next_creates(self, count: int, status: Status, message: str) -> None:
        with self._lock:
            self._create_failures.extend([(status, message)] * count)

    def fail_next_calls(self, method: str, count: int, status: Status, message: str) -> None:
        with self._lock:
            queue = self._call_failures.setdefault(method, collections.deque())
            queue.extend([(status, message)] * count)

    def set_create_rate_limit(self, per_second: float | None) -> None:
        with self._lock:
            self._create_rate_limit = per_second
            self._create_times.clear()

    def clear_faults(self) -> None:
        with self._lock:
            self._latency = 0.0
            self._slow_start = 0.0
            self._create_failures.clear()
            self._call_failures.clear()
            self._create_rate_limit = None
            self._create_times.clear()
            self._images_without_python.clear()

    def calls(self, method: str | None = None) -> list[EmulatorCall]:
        with self._lock:
            return [call for call in self._calls if method is None or call.method == method]

    def call_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def internal_errors(self) -> list[str]:
        with self._lock:
            return list(self._internal_errors)

    def clear_log(self) -> None:
        with self._lock:
            self._calls.clear()
            self._counts.clear()
            self._internal_errors.clear()

    def record(self, method: str, fields: Mapping[str, object]) -> None:
        with self._lock:
            self._calls.append(
                EmulatorCall(method=method, fields=dict(fields), at=time.monotonic())
            )

    # -- loop-side helpers for the public API --

    async def kill_sandbox(self, sandbox_id: str, reason: KillReason) -> None:
        sandbox = self._sandbox(sandbox_id)
        status, message = _KILL_STATUSES[reason]
        await sandbox.finish(status, message=message)

    async def finish_all(self) -> None:
        await asyncio.gather(
            *(
                sandbox.finish(
                    api_pb2.GenericResult.GENERIC_STATUS_TERMINATED,
                    message="Modal emulator stopped",
                )
                for sandbox in self.sandboxes.values()
            )
        )

    def forget_sandboxes(self) -> None:
        self.sandboxes.clear()
        self._sandboxes_by_task.clear()

    def sandbox_states(self) -> list[SandboxState]:
        return [
            SandboxState(
                sandbox_id=sandbox.sandbox_id,
                task_id=sandbox.task_id,
                app_id=sandbox.app_id,
                root=sandbox.root,
                started=sandbox.started,
                returncode=_returncode(sandbox.result) if sandbox.finished.is_set() else None,
                live_pids=tuple(sandbox.live_pids()),
                mounts=tuple(
                    str(point.relative_to(sandbox.root)) for point in sandbox.mounts.mounted()
                ),
            )
            for sandbox in self.sandboxes.values()
        ]

    # -- dispatch --

    def mapping(self) -> dict[str, grpclib.const.Handler]:
        """The grpclib handler table for both services."""
        control_plane = _MethodTable(
            lambda name: self._dispatcher("ModalClient", name, f"cp_{name}")
        )
        router = _MethodTable(
            lambda name: self._dispatcher("TaskCommandRouter", name, f"tcr_{name}")
        )
        table: dict[str, grpclib.const.Handler] = {}
        table.update(ModalClientBase.__mapping__(cast(ModalClientBase, control_plane)))
        table.update(TaskCommandRouterBase.__mapping__(cast(TaskCommandRouterBase, router)))
        return table

    def _dispatcher(self, service: str, name: str, attribute: str) -> Handler:
        implementation: Handler | None = getattr(self, attribute, None)

        async def dispatch(stream: AnyStream) -> None:
            await self._serve(service, name, implementation, stream)

        return dispatch

    async def _serve(
        self, service: str, name: str, implementation: Handler | None, stream: AnyStream
    ) -> None:
        with self._lock:
            self._counts[name] += 1
            latency = self._latency
            failures = self._call_failures.get(name)
            failure = failures.popleft() if failures else None
        if latency > 0:
            await asyncio.sleep(latency)
        if failure is not None:
            self.record(name, {"injected_fault": failure[0].name})
            raise GRPCError(*failure)
        if implementation is None:
            self.record(name, {"unimplemented": True})
            raise GRPCError(
                Status.UNIMPLEMENTED, f"The Modal emulator does not implement {service}.{name}"
            )
        try:
            await implementation(stream)
        except (GRPCError, StreamTerminatedError, ProtocolError, ConnectionError):
            # An explicit status, or the client went away mid-stream.
            raise
        except h2.exceptions.StreamClosedError:
            # The client reset the stream between our last await and the reply: normal when it
            # gives up a call (a cancelled long poll of SandboxWait). Nobody is left to answer.
            logger.debug("Modal emulator: the client left %s before its reply", name)
        except Exception as exc:
            logger.exception("Modal emulator failed in %s", name)
            with self._lock:
                self._internal_errors.append(f"{name}: {exc!r}")
            # Not INTERNAL: the client would retry it for seconds before reporting anything.
            raise GRPCError(Status.UNIMPLEMENTED, f"Modal emulator bug in {name}: {exc!r}") from exc

    # -- lookups --

    def _sandbox(self, sandbox_id: str) -> LocalSandbox:
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is None:
            raise GRPCError(Status.NOT_FOUND, f"Sandbox {sandbox_id} not found")
        return sandbox

    def _task(self, task_id: str) -> LocalSandbox:
        sandbox = self._sandboxes_by_task.get(task_id)
        if sandbox is None:
            raise GRPCError(Status.NOT_FOUND, f"Task {task_id} not found")
        return sandbox

    def _secret_env(self, secret_id: str) -> dict[str, str]:
        with self._lock:
            secret = self._secrets_by_id.get(secret_id)
        if secret is None:
            raise GRPCError(Status.NOT_FOUND, f"Secret {secret_id} not found")
        return dict(secret.env)

    def _sources_env(
        self, secret_ids: Iterable[str], sources: Iterable[api_pb2.SecretSource]
    ) -> dict[str, str]:
        env: dict[str, str] = {}
        for secret_id in secret_ids:
            env.update(self._secret_env(secret_id))
        for source in sources:
            if source.secret_id:
                env.update(self._secret_env(source.secret_id))
            else:
                env.update(source.env.contents)
        return env

    def _inline_env(
        self, secret_ids: Iterable[str], sources: Iterable[api_pb2.SecretSource]
    ) -> dict[str, str]:
        """The env passed inline or as anonymous (from_dict) secrets: what `env=` became."""
        env: dict[str, str] = {}
        with self._lock:
            for secret_id in secret_ids:
                secret = self._secrets_by_id.get(secret_id)
                if secret is not None and secret.name is None:
                    env.update(secret.env)
        for source in sources:
            if not source.secret_id:
                env.update(source.env.contents)
        return env

    def _named_secret_ids(self, secret_ids: Iterable[str]) -> list[str]:
        with self._lock:
            return [
                secret_id
                for secret_id in dict.fromkeys(secret_ids)
                if (secret := self._secrets_by_id.get(secret_id)) is not None
                and secret.name is not None
            ]

    @staticmethod
    def _authorize(stream: AnyStream) -> None:
        if not str(stream.metadata.get("authorization", "") if stream.metadata else "").startswith(
            "Bearer "
        ):
            raise GRPCError(Status.UNAUTHENTICATED, "Missing command router bearer token")

    # -- control plane: apps, environments, images, secrets, auth --

    async def cp_ClientHello(self, stream: AnyStream) -> None:
        await stream.recv_message()
        self.record("ClientHello", {})
        await stream.send_message(api_pb2.ClientHelloResponse())

    async def cp_AuthTokenGet(self, stream: AnyStream) -> None:
        await stream.recv_message()
        self.record("AuthTokenGet", {})
        await stream.send_message(api_pb2.AuthTokenGetResponse(token=make_jwt("client")))

    async def cp_AppGetOrCreate(self, stream: AnyStream) -> None:
        request = await _receive(stream, api_pb2.AppGetOrCreateRequest)
        self.record(
            "AppGetOrCreate",
            {
                "app_name": request.app_name,
                "environment_name": request.environment_name,
                "create_if_missing": request.object_creation_type
                == api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING,
            },
        )
        app_id = self._apps.get(request.app_name)
        if app_id is None:
            if request.object_creation_type != api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING:
                raise GRPCError(Status.NOT_FOUND, f"App '{request.app_name}' not found")
            app_id = self._apps[request.app_name] = _new_id("ap")
        await stream.send_message(
            api_pb2.AppGetOrCreateResponse(
                app_id=app_id,
                handle_metadata=api_pb2.AppHandleMetadata(app_id=app_id, environment_name="main"),
            )
        )

    async def cp_EnvironmentGetOrCreate(self, stream: AnyStream) -> None:
        request = await _receive(stream, api_pb2.EnvironmentGetOrCreateRequest)
        self.record("EnvironmentGetOrCreate", {"deployment_name": request.deployment_name})
        await stream.send_message(
            api_pb2.EnvironmentGetOrCreateResponse(
                environment_id=_ENVIRONMENT_ID,
                metadata=api_pb2.EnvironmentMetadata(
                    name=request.deployment_name or "main",
                    settings=api_pb2.EnvironmentSettings(
                        image_builder_version=_IMAGE_BUILDER_VERSION
                    ),
                ),
            )
        )

    async def cp_ImageGetOrCreate(self, stream: AnyStream) -> None:
        request = await _receive(stream, api_pb2.ImageGetOrCreateRequest)
        commands = tuple(request.image.dockerfile_commands)
        bases = tuple(base.image_id for base in request.image.base_images)
        tag = next((match.group(1) for line in commands if (match := _FROM_LINE.match(line))), None)
        if tag is None and bases and bases[0] in self._images:
            tag = self._images[bases[0]].tag
        key = (commands, bases)
        image_id = self._image_keys.get(key)
        if image_id is None:
            image_id = self._image_keys[key] = _new_id("im")
            self._images[image_id] = _Image(image_id=image_id, tag=tag, commands=commands)
        self.record(
            "ImageGetOrCreate",
            {"image_id": image_id, "tag": tag, "dockerfile_commands": list(commands)},
        )
        with self._lock:
            failing = tag in self._failing_images
        if failing:
            result = api_pb2.GenericResult(
                status=api_pb2.GenericResult.GENERIC_STATUS_FAILURE,
                exception=f"Failed to pull image {tag}: manifest unknown (emulated pull failure)",
            )
        else:
            result = api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS)
        await stream.send_message(
            api_pb2.ImageGetOrCreateResponse(image_id=image_id, result=result)
        )

    async def cp_ImageDelete(self, stream: AnyStream) -> None:
        """`modal.experimental.image_delete`: the image is gone, a snapshot's tree with it."""
        request = await _receive(stream, api_pb2.ImageDeleteRequest)
        self.record("ImageDelete", {"image_id": request.image_id})
        if self._images.pop(request.image_id, None) is None:
            raise GRPCError(Status.NOT_FOUND, f"Image {request.image_id} not found")
        await self.snapshots.expire(request.image_id)
        await stream.send_message(empty_pb2.Empty())

    async def cp_MountGetOrCreate(self, stream: AnyStream) -> None:
        """Lookups of Modal's published mounts, such as the Python `add_python` copies in."""
        request = await _receive(stream, api_pb2.MountGetOrCreateRequest)
        self.record(
            "MountGetOrCreate",
            {
                "deployment_name": request.deployment_name or None,
                "object_creation_type": api_pb2.ObjectCreationType.Name(
                    request.object_creation_type
                ),
                "files": len(request.files),
            },
        )
        await stream.send_message(
            api_pb2.MountGetOrCreateResponse(
                mount_id=_new_id("mo"),
                handle_metadata=api_pb2.MountHandleMetadata(content_checksum_sha256_hex="0" * 64),
            )
        )

    async def cp_SecretGetOrCreate(self, stream: AnyStream) -> None:
        request = await _receive(stream, api_pb2.SecretGetOrCreateRequest)
        creation = request.object_creation_type
        self.record(
            "SecretGetOrCreate",
            {
                "deployment_name": request.deployment_name or None,
                "object_creation_type": api_pb2.ObjectCreationType.Name(creation),
                "env_keys": sorted(request.env_dict),
                "required_keys": list(request.required_keys),
            },
        )
        anonymous = (
            api_pb2.OBJECT_CREATION_TYPE_ANONYMOUS_OWNED_BY_APP,
            api_pb2.OBJECT_CREATION_TYPE_EPHEMERAL,
        )
        if creation in anonymous:
            secret = _Secret(secret_id=_new_id("st"), name=None, env=dict(request.env_dict))
            with self._lock:
                self._secrets_by_id[secret.secret_id] = secret
        elif creation == api_pb2.OBJECT_CREATION_TYPE_UNSPECIFIED:
            with self._lock:
                found = self._secrets_by_name.get(request.deployment_name)
            if found is None:
                raise GRPCError(
                    Status.NOT_FOUND,
                    f"Secret '{request.deployment_name}' not found in environment "
                    f"'{request.environment_name or 'main'}'",
                )
            missing = sorted(set(request.required_keys) - set(found.env))
            if missing:
                raise GRPCError(
                    Status.NOT_FOUND,
                    f"Secret '{request.deployment_name}' is missing keys: {', '.join(missing)}",
                )
            secret = found
        else:
            with self._lock:
                exists = request.deployment_name in self._secrets_by_name
            if exists and creation == api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS:
                raise GRPCError(
                    Status.ALREADY_EXISTS, f"Secret '{request.deployment_name}' already exists"
                )
            if not exists or creation == api_pb2.OBJECT_CREATION_TYPE_CREATE_OVERWRITE_IF_EXISTS:
                self.define_secret(request.deployment_name, dict(request.env_dict))
            with self._lock:
                secret = self._secrets_by_name[request.deployment_name]
        metadata = api_pb2.SecretMetadata(name=secret.name or "", keys=sorted(secret.env))
        await stream.send_message(
            api_pb2.SecretGetOrCreateResponse(secret_id=secret.secret_id, metadata=metadata)
        )

    async def cp_SecretGetInfo(self, stream: AnyStream) -> None:
        request = await _receive(stream, api_pb2.SecretGetInfoRequest)
        self.record("SecretGetInfo", {"secret_id": request.secret_id})
        with self._lock:
            secret = self._secrets_by_id.get(request.secret_id)
        if secret is None:
            raise GRPCError(Status.NOT_FOUND, f"Secret {request.secret_id} not found")
        metadata = api_pb2.SecretMetadata(name=secret.name or "", keys=sorted(secret.env))
        await stream.send_message(api_pb2.SecretGetInfoResponse(metadata=metadata))

    # -- control plane: sandboxes --

    def _check_create_faults(self) -> None:
        with self._lock:
            if self._create_failures:
                status, message = self._create_failures.popleft()
                raise GRPCError(status, message)
            limit = self._create_rate_limit
            if limit is not None:
                now = time.monotonic()
                while self._create_times and now - self._create_times[0] >= 1.0:
                    self._create_times.popleft()
                if len(self._create_times) >= limit:
                    raise GRPCError(
                        Status.RESOURCE_EXHAUSTED,
                        f"Sandbox creation rate limit exceeded ({limit:g} per second); retry later",
                    )
                self._create_times.append(now)

    def _describe_create(
        self,
        app_id: str,
        definition: api_pb2.Sandbox,
        tags: Iterable[api_pb2.SandboxTag],
        sources: Iterable[api_pb2.SecretSource],
    ) -> dict[str, object]:
        sources = list(sources)
        resources = definition.resources
        gpu_config = resources.gpu_config
        gpu = None
        if gpu_config.gpu_type:
            gpu = (
                gpu_config.gpu_type
                if gpu_config.count <= 1
                else f"{gpu_config.gpu_type}:{gpu_config.count}"
            )
        network = definition.network_access
        network_type = api_pb2.NetworkAccess.NetworkAccessType.Name(
            network.network_access_type
        ).lower()
        image = self._images.get(definition.image_id)
        allowlist = network.network_access_type == api_pb2.NetworkAccess.NetworkAccessType.ALLOWLIST
        return {
            "app_id": app_id,
            "name": definition.name or None,
            "entrypoint_args": list(definition.entrypoint_args),
            "image_id": definition.image_id,
            "image_tag": image.tag if image else None,
            "cpu": resources.milli_cpu / 1000 if resources.milli_cpu else None,
            "cpu_limit": resources.milli_cpu_max / 1000 if resources.milli_cpu_max else None,
            "memory_mb": resources.memory_mb or None,
            "memory_limit_mb": resources.memory_mb_max or None,
            "gpu": gpu,
            "timeout_secs": definition.timeout_secs,
            "idle_timeout_secs": definition.idle_timeout_secs
            if definition.HasField("idle_timeout_secs")
            else None,
            "workdir": definition.workdir if definition.HasField("workdir") else None,
            "secret_ids": self._named_secret_ids(
                [
                    *definition.secret_ids,
                    *(source.secret_id for source in sources if source.secret_id),
                ]
            ),
            "env": self._inline_env(definition.secret_ids, sources),
            "tags": {tag.tag_name: tag.tag_value for tag in tags},
            "network": network_type,
            "block_network": network_type == "blocked" or definition.block_network,
            "outbound_cidr_allowlist": list(network.allowed_cidrs) if allowlist else None,
            "outbound_domain_allowlist": list(network.allowed_domains) if allowlist else None,
            "regions": list(definition.scheduler_placement.regions),
            "cloud": definition.cloud_provider_str or None,
            "pty": definition.HasField("pty_info"),
        }

    async def _create_sandbox(
        self,
        method: str,
        *,
        version: Literal[1, 2],
        app_id: str,
        definition: api_pb2.Sandbox,
        tags: Iterable[api_pb2.SandboxTag],
        sources: Iterable[api_pb2.SecretSource],
    ) -> tuple[LocalSandbox, asyncio.Task[None]]:
        """Register a sandbox and start booting it (in a task the caller may stop waiting for)."""
        tags, sources = list(tags), list(sources)
        self.record(method, self._describe_create(app_id, definition, tags, sources))
        self._check_create_faults()
        if app_id not in self._apps.values():
            raise GRPCError(Status.NOT_FOUND, f"App {app_id} not found")
        if definition.image_id not in self._images:
            raise GRPCError(Status.NOT_FOUND, f"Image {definition.image_id} not found")
        env = self._sources_env(definition.secret_ids, sources)
        env.update(definition.environment_variables.contents)
        if version == 1:
            sandbox_id, task_id = _new_id("sb", 22), _new_id("ta", 22)
        else:
            # Not 22 characters after "sb-": the client routes such ids to its V2 implementation.
            sandbox_id, task_id = _new_id("sb", 24), _new_id("ta", 20) + "V"
        root = self.root / sandbox_id
        tree = self.snapshots.tree(definition.image_id)
        if tree is not None and self._images[definition.image_id].snapshot == "filesystem":
            await copy_tree(tree, root)  # the image's files are the sandbox's
        else:
            root.mkdir(parents=True)
        self._last_created_at = max(time.time(), self._last_created_at + 1e-6)
        sandbox = LocalSandbox(
            sandbox_id=sandbox_id,
            task_id=task_id,
            app_id=app_id,
            root=root,
            definition=definition,
            env=env,
            tags={tag.tag_name: tag.tag_value for tag in tags},
            created_at=self._last_created_at,
        )
        self.sandboxes[sandbox_id] = sandbox
        self._sandboxes_by_task[task_id] = sandbox
        with self._lock:
            slow_start = self._slow_start
        boot = asyncio.get_running_loop().create_task(_boot(sandbox, slow_start))
        return sandbox, boot

    async def cp_SandboxCreateV2(self, stream: AnyStream) -> None:
        request = await _receive(stream, api_pb2.SandboxCreateV2Request)
        sandbox, boot = await self._create_sandbox(
            "SandboxCreateV2",
            version=2,
            app_id=request.app_id,
            definition=request.definition,
            tags=request.tags,
            sources=request.secret_sources,
        )
        # Shielded: a caller that gives up after this point still leaves a running sandbox.
        await asyncio.shield(boot)
        await stream.send_message(
            api_pb2.SandboxCreateV2Response(
                sandbox_id=sandbox.sandbox_id,
                task_id=sandbox.task_id,
                metadata=api_pb2.SandboxHandleMetadata(app_id=sandbox.app_id),
                command_router_access=api_pb2.CommandRouterAccess(
                    url=self.router_url, jwt=make_jwt(sandbox.task_id)
                ),
            )
        )

    async def cp_SandboxCreate(self, stream: AnyStream) -> None:
        request = await _receive(stream, api_pb2.SandboxCreateRequest)
        sandbox, _ = await self._create_sandbox(
            "SandboxCreate",
            version=1,
            app_id=request.app_id,
            definition=request.definition,
            tags=request.tags,
            sources=(),
        )
        await stream.send_message(
            api_pb2.SandboxCreateResponse(
                sandbox_id=sandbox.sandbox_id,
                metadata=api_pb2.SandboxHandleMetadata(app_id=sandbox.app_id),
            )
        )

    async def _get_task_id(self, method: str, stream: AnyStream) -> None:
        request = await _receive(stream, api_pb2.SandboxGetTaskIdRequest)
        self.record(method, {"sandbox_id": request.sandbox_id})
        sandbox = self._sandbox(request.sandbox_id)
        response = api_pb2.SandboxGetTaskIdResponse()
        if sandbox.started:
            response.task_id = sandbox.task_id
        if sandbox.result is not None:
            response.task_result.CopyFrom(sandbox.result)
        await stream.send_message(response)

    async def cp_SandboxGetTaskId(self, stream: AnyStream) -> None:
        await self._get_task_id("SandboxGetTaskId", stream)

    async def cp_SandboxGetTaskIdV2(self, stream: AnyStream) -> None:
        await self._get_task_id("SandboxGetTaskIdV2", stream)

    async def cp_TaskGetCommandRouterAccess(self, stream: AnyStream) -> None:
        request = await _receive(stream, api_pb2.TaskGetCommandRouterAccessRequest)
        self.record("TaskGetCommandRouterAccess", {"task_id": request.task_id})
        sandbox = self._task(request.task_id)
        await stream.send_message(
            api_pb2.TaskGetCommandRouterAccessResponse(
                url=self.router_url, jwt=make_jwt(sandbox.task_id)
            )
        )

    async def cp_SandboxGetCommandRouterAccess(self, stream: AnyStream) -> None:
        request = await _receive(stream, api_pb2.SandboxGetCommandRouterAccessRequest)
        self.record(
            "SandboxGetCommandRouterAccess",
            {"sandbox_id": request.sandbox_id, "task_id": request.task_id},
        )
        sandbox = (
            self._sandbox(request.sandbox_id) if request.sandbox_id else self._task(request.task_id)
        )
        await stream.send_message(
            api_pb2.SandboxGetCommandRouterAccessResponse(
                url=self.router_url, jwt=make_jwt(sandbox.task_id)
            )
        )

    async def _wait(self, method: str, stream: AnyStream) -> None:
        request = await _receive(stream, api_pb2.SandboxWaitRequest)
        self.record(method, {"sandbox_id": request.sandbox_id, "timeout": request.timeout})
        sandbox = self._sandbox(request.sandbox_id)
        if not sandbox.finished.is_set() and request.timeout > 0:
            # Not `asyncio.wait_for`, which (before 3.12) may swallow the cancellation grpclib
            # sends when the client gives up the long poll.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(request.timeout):
                    await sandbox.finished.wait()
        response = api_pb2.SandboxWaitResponse(
            metadata=api_pb2.SandboxHandleMetadata(app_id=sandbox.app_id)
        )
        if sandbox.finished.is_set() and sandbox.result is not None:
            response.result.CopyFrom(sandbox.result)
            response.metadata.result.CopyFrom(sandbox.result)
        await stream.send_message(response)

    async def cp_SandboxWait(self, stream: AnyStream) -> None:
        await self._wait("SandboxWait", stream)

    async def cp_SandboxWaitV2(self, stream: AnyStream) -> None:
        await self._wait("SandboxWaitV2", stream)

    async def _terminate(self, method: str, stream: AnyStream) -> None:
        request = await _receive(stream, api_pb2.SandboxTerminateRequest)
        self.record(method, {"sandbox_id": request.sandbox_id})
        sandbox = self._sandbox(request.sandbox_id)
        response = api_pb2.SandboxTerminateResponse()
        if sandbox.result is not None:
            response.existing_result.CopyFrom(sandbox.result)
        await sandbox.finish(
            api_pb2.GenericResult.GENERIC_STATUS_TERMINATED, message="Sandbox terminated"
        )
        await stream.send_message(response)

    async def cp_SandboxTerminate(self, stream: AnyStream) -> None:
        await self._terminate("SandboxTerminate", stream)

    async def cp_SandboxTerminateV2(self, stream: AnyStream) -> None:
        await self._terminate("SandboxTerminateV2", stream)

    async def _tags_set(self, method: str, stream: AnyStream) -> None:
        request = await _receive(stream, api_pb2.SandboxTagsSetRequest)
        tags = {tag.tag_name: tag.tag_value for tag in request.tags}
        self.record(method, {"sandbox_id": request.sandbox_id, "tags": tags})
        self._sandbox(request.sandbox_id).tags = tags
        await stream.send_message(empty_pb2.Empty())

    async def cp_SandboxTagsSet(self, stream: AnyStream) -> None:
        await self._tags_set("SandboxTagsSet", stream)

    async def cp_SandboxTagsSetV2(self, stream: AnyStream) -> None:
        await self._tags_set("SandboxTagsSetV2", stream)

    async def _tags_get(self, method: str, stream: AnyStream) -> None:
        request = await _receive(stream, api_pb2.SandboxTagsGetRequest)
        self.record(method, {"sandbox_id": request.sandbox_id})
        sandbox = self._sandbox(request.sandbox_id)
        await stream.send_message(
            api_pb2.SandboxTagsGetResponse(
                tags=[
                    api_pb2.SandboxTag(tag_name=name, tag_value=value)
                    for name, value in sandbox.tags.items()
                ]
            )
        )

    async def cp_SandboxTagsGet(self, stream: AnyStream) -> None:
        await self._tags_get("SandboxTagsGet", stream)

    async def cp_SandboxTagsGetV2(self, stream: AnyStream) -> None:
        await self._tags_get("SandboxTagsGetV2", stream)

    async def _list(self, method: str, stream: AnyStream) -> None:
        request = await _receive(stream, api_pb2.SandboxListRequest)
        wanted = {tag.tag_name: tag.tag_value for tag in request.tags}
        self.record(
            method,
            {
                "app_id": request.app_id or None,
                "tags": wanted,
                "include_finished": request.include_finished,
                "before_timestamp": request.before_timestamp or None,
            },
        )
        matching = sorted(
            (
                sandbox
                for sandbox in self.sandboxes.values()
                if (not request.app_id or sandbox.app_id == request.app_id)
                and wanted.items() <= sandbox.tags.items()
                and (request.include_finished or sandbox.result is None)
                and (not request.before_timestamp or sandbox.created_at < request.before_timestamp)
            ),
            key=lambda sandbox: sandbox.created_at,
            reverse=True,
        )[:_LIST_PAGE_SIZE]
        response = api_pb2.SandboxListResponse()
        for sandbox in matching:
            info = response.sandboxes.add(
                id=sandbox.sandbox_id,
                created_at=sandbox.created_at,
                app_id=sandbox.app_id,
                image_id=sandbox.definition.image_id,
                name=sandbox.definition.name,
                timeout_secs=sandbox.definition.timeout_secs,
                idle_timeout_secs=sandbox.definition.idle_timeout_secs,
                tags=[
                    api_pb2.SandboxTag(tag_name=name, tag_value=value)
                    for name, value in sandbox.tags.items()
                ],
                metadata=api_pb2.SandboxHandleMetadata(app_id=sandbox.app_id),
            )
            info.task_info.id = sandbox.task_id
            info.task_info.sandbox_id = sandbox.sandbox_id
            if sandbox.result is not None:
                info.task_info.result.CopyFrom(sandbox.result)
        await stream.send_message(response)

    async def cp_SandboxList(self, stream: AnyStream) -> None:
        await self._list("SandboxList", stream)

    async def cp_SandboxListV2(self, stream: AnyStream) -> None:
        await self._list("SandboxListV2", stream)

    # -- task command router --

    def _running_task(self, task_id: str) -> LocalSandbox:
        sandbox = self._task(task_id)
        if sandbox.result is not None:
            raise GRPCError(Status.NOT_FOUND, f"Task {task_id} has finished")
        return sandbox

    @staticmethod
    def _exec(sandbox: LocalSandbox, exec_id: str) -> LocalProcess:
        process = sandbox.execs.get(exec_id)
        if process is None:
            raise GRPCError(Status.NOT_FOUND, f"Exec {exec_id} not found in task {sandbox.task_id}")
        return process

    async def tcr_TaskExecStart(self, stream: AnyStream) -> None:
        request = await _receive(stream, sr_pb2.TaskExecStartRequest)
        self._authorize(stream)
        pipe = sr_pb2.TaskExecStdoutConfig.TASK_EXEC_STDOUT_CONFIG_PIPE
        pipe_stderr = sr_pb2.TaskExecStderrConfig.TASK_EXEC_STDERR_CONFIG_PIPE
        workdir = request.workdir if request.HasField("workdir") else None
        timeout_secs = request.timeout_secs if request.HasField("timeout_secs") else None
        self.record(
            "TaskExecStart",
            {
                "task_id": request.task_id,
                "exec_id": request.exec_id,
                "args": list(request.command_args),
                "workdir": workdir,
                "timeout_secs": timeout_secs,
                "stdout": "pipe" if request.stdout_config == pipe else "devnull",
                "stderr": "pipe" if request.stderr_config == pipe_stderr else "devnull",
                "secret_ids": self._named_secret_ids(
                    [
                        *request.secret_ids,
                        *(
                            source.secret_id
                            for source in request.secret_sources
                            if source.secret_id
                        ),
                    ]
                ),
                "env": {
                    **self._inline_env((), request.secret_sources),
                    **{e.key: e.value for e in request.env},
                },
                "pty": request.HasField("pty_info"),
            },
        )
        sandbox = self._running_task(request.task_id)
        if not request.command_args:
            raise GRPCError(Status.INVALID_ARGUMENT, "exec needs at least one argument")
        env = self._sources_env(request.secret_ids, request.secret_sources)
        env.update({entry.key: entry.value for entry in request.env})
        args = list(request.command_args)
        if os.path.basename(args[0]).startswith("python") and self._lacks_python(sandbox):
            # As in an image without Python: the program is not found (the shell's 127).
            args = [
                "sh",
                "-c",
                'echo "exec: \\"$0\\": executable file not found in \\$PATH" >&2; exit 127',
                args[0],
            ]
        await sandbox.exec(
            request.exec_id,
            args,
            workdir=workdir,
            env=env,
            pipe_stdout=request.stdout_config == pipe,
            pipe_stderr=request.stderr_config == pipe_stderr,
            timeout_secs=timeout_secs,
        )
        await stream.send_message(sr_pb2.TaskExecStartResponse())

    async def tcr_TaskExecStdioRead(self, stream: AnyStream) -> None:
        request = await _receive(stream, sr_pb2.TaskExecStdioReadRequest)
        self._authorize(stream)
        stdout = request.file_descriptor == sr_pb2.TASK_EXEC_STDIO_FILE_DESCRIPTOR_STDOUT
        self.record(
            "TaskExecStdioRead",
            {
                "exec_id": request.exec_id,
                "fd": "stdout" if stdout else "stderr",
                "offset": request.offset,
            },
        )
        process = self._exec(self._task(request.task_id), request.exec_id)
        buffer = process.stdout if stdout else process.stderr
        async for chunk in _chunks_from(buffer, request.offset):
            await stream.send_message(sr_pb2.TaskExecStdioReadResponse(data=chunk))

    async def tcr_TaskExecStdinWrite(self, stream: AnyStream) -> None:
        request = await _receive(stream, sr_pb2.TaskExecStdinWriteRequest)
        self._authorize(stream)
        self.record(
            "TaskExecStdinWrite",
            {
                "task_id": request.task_id,
                "exec_id": request.exec_id,
                "offset": request.offset,
                "length": len(request.data),
                "eof": request.eof,
            },
        )
        sandbox = self._running_task(request.task_id)
        process = self._exec(sandbox, request.exec_id)
        try:
            process.stdin.accept(request.offset, request.data, request.eof)
        except StdinGapError as exc:
            raise GRPCError(Status.OUT_OF_RANGE, str(exc)) from None
        sandbox.note_activity()
        await stream.send_message(sr_pb2.TaskExecStdinWriteResponse())

    async def tcr_TaskExecStdinStatus(self, stream: AnyStream) -> None:
        request = await _receive(stream, sr_pb2.TaskExecStdinStatusRequest)
        self._authorize(stream)
        self.record("TaskExecStdinStatus", {"exec_id": request.exec_id})
        process = self._exec(self._task(request.task_id), request.exec_id)
        await stream.send_message(
            sr_pb2.TaskExecStdinStatusResponse(
                num_bytes_written=process.stdin.accepted, closed=process.stdin.eof_requested
            )
        )

    async def tcr_TaskExecWait(self, stream: AnyStream) -> None:
        request = await _receive(stream, sr_pb2.TaskExecWaitRequest)
        self._authorize(stream)
        self.record("TaskExecWait", {"exec_id": request.exec_id})
        process = self._exec(self._task(request.task_id), request.exec_id)
        await process.exited.wait()
        await stream.send_message(_exit_status(sr_pb2.TaskExecWaitResponse(), process))

    async def tcr_TaskExecPoll(self, stream: AnyStream) -> None:
        request = await _receive(stream, sr_pb2.TaskExecPollRequest)
        self._authorize(stream)
        self.record("TaskExecPoll", {"exec_id": request.exec_id})
        process = self._exec(self._task(request.task_id), request.exec_id)
        await stream.send_message(_exit_status(sr_pb2.TaskExecPollResponse(), process))

    async def _snapshot(self, sandbox: LocalSandbox, source: Path, kind: str, ttl: int) -> str:
        if not is_directory(source):
            raise GRPCError(Status.NOT_FOUND, f"{source.name!r} is not a directory in the sandbox")
        image_id = _new_id("im")
        await self.snapshots.add(image_id, source, ttl)
        self._images[image_id] = _Image(image_id=image_id, tag=None, commands=(), snapshot=kind)
        return image_id

    async def tcr_TaskSnapshotDirectory(self, stream: AnyStream) -> None:
        request = await _receive(stream, sr_pb2.TaskSnapshotDirectoryRequest)
        self._authorize(stream)
        self.record(
            "TaskSnapshotDirectory",
            {
                "task_id": request.task_id,
                "path": request.path.decode(errors="replace"),
                "ttl_seconds": request.ttl_seconds,
            },
        )
        sandbox = self._running_task(request.task_id)
        source = container_path(sandbox.root, request.path, "snapshot")
        image_id = await self._snapshot(sandbox, source, "directory", request.ttl_seconds)
        await stream.send_message(sr_pb2.TaskSnapshotDirectoryResponse(image_id=image_id))

    async def tcr_TaskSnapshotFilesystem(self, stream: AnyStream) -> None:
        request = await _receive(stream, sr_pb2.TaskSnapshotFilesystemRequest)
        self._authorize(stream)
        self.record(
            "TaskSnapshotFilesystem",
            {"task_id": request.task_id, "ttl_seconds": request.ttl_seconds},
        )
        sandbox = self._running_task(request.task_id)
        image_id = await self._snapshot(sandbox, sandbox.root, "filesystem", request.ttl_seconds)
        await stream.send_message(sr_pb2.TaskSnapshotFilesystemResponse(image_id=image_id))

    async def tcr_TaskMountDirectory(self, stream: AnyStream) -> None:
        request = await _receive(stream, sr_pb2.TaskMountDirectoryRequest)
        self._authorize(stream)
        self.record(
            "TaskMountDirectory",
            {
                "task_id": request.task_id,
                "path": request.path.decode(errors="replace"),
                "image_id": request.image_id,
            },
        )
        sandbox = self._running_task(request.task_id)
        point = container_path(sandbox.root, request.path, "mount")
        if request.image_id not in self._images:
            raise GRPCError(Status.NOT_FOUND, f"Image {request.image_id} not found")
        tree = self.snapshots.tree(request.image_id)
        if tree is None:
            if self._images[request.image_id].snapshot is not None:
                raise GRPCError(Status.NOT_FOUND, f"Image {request.image_id} has expired")
            raise GRPCError(
                Status.UNIMPLEMENTED,
                "The Modal emulator mounts snapshot images only (it has no registry images' files)",
            )
        await sandbox.mounts.mount(point, tree)
        await stream.send_message(empty_pb2.Empty())

    async def tcr_TaskUnmountDirectory(self, stream: AnyStream) -> None:
        request = await _receive(stream, sr_pb2.TaskUnmountDirectoryRequest)
        self._authorize(stream)
        self.record(
            "TaskUnmountDirectory",
            {"task_id": request.task_id, "path": request.path.decode(errors="replace")},
        )
        sandbox = self._running_task(request.task_id)
        await sandbox.mounts.unmount(container_path(sandbox.root, request.path, "unmount"))
        await stream.send_message(empty_pb2.Empty())

    async def tcr_SandboxStdioReadV2(self, stream: AnyStream) -> None:
        request = await _receive(stream, sr_pb2.SandboxStdioReadV2Request)
        self._authorize(stream)
        stdout = request.file_descriptor == sr_pb2.SANDBOX_STDIO_FILE_DESCRIPTOR_STDOUT
        self.record(
            "SandboxStdioReadV2", {"fd": "stdout" if stdout else "stderr", "offset": request.offset}
        )
        sandbox = self._task(request.task_id)
        offset = request.offset
        async for chunk in _chunks_from(sandbox.stdout if stdout else sandbox.stderr, offset):
            await stream.send_message(
                sr_pb2.SandboxStdioReadV2Response(data=chunk, starting_offset=offset)
            )
            offset += len(chunk)

    async def tcr_SandboxStdinWriteV2(self, stream: AnyStream) -> None:
        request = await _receive(stream, sr_pb2.SandboxStdinWriteV2Request)
        self._authorize(stream)
        self.record(
            "SandboxStdinWriteV2",
            {"offset": request.offset, "length": len(request.data), "eof": request.eof},
        )
        sandbox = self._task(request.task_id)
        if sandbox.result is not None:
            raise GRPCError(
                Status.FAILED_PRECONDITION, f"Sandbox {sandbox.sandbox_id} has finished"
            )
        try:
            sandbox.stdin.accept(request.offset, request.data, request.eof)
        except StdinGapError as exc:
            raise GRPCError(Status.OUT_OF_RANGE, str(exc)) from None
        sandbox.note_activity()
        await stream.send_message(sr_pb2.SandboxStdinWriteV2Response())


_Request = TypeVar("_Request")


async def _receive(stream: AnyStream, kind: type[_Request]) -> _Request:
    request = await stream.recv_message()
    if not isinstance(request, kind):
        raise GRPCError(Status.INVALID_ARGUMENT, f"expected one {kind.__name__}")
    return request


def _returncode(result: api_pb2.GenericResult | None) -> int | None:
    """The code `Sandbox.returncode` reports for a result (124 timeout, 137 terminated)."""
    if result is None:
        return None
    if result.status == api_pb2.GenericResult.GENERIC_STATUS_TIMEOUT:
        return 124
    if result.status == api_pb2.GenericResult.GENERIC_STATUS_TERMINATED:
        return 137
    return result.exitcode


async def _boot(sandbox: LocalSandbox, slow_start: float) -> None:
    if slow_start > 0:
        await asyncio.sleep(slow_start)
    if sandbox.result is None:
        await sandbox.start()


async def _chunks_from(buffer: OutputBuffer, offset: int) -> AsyncIterator[bytes]:
    """Yield the buffer's bytes from `offset` on, as they arrive, until it is closed."""
    while True:
        await buffer.wait_beyond(offset)
        if len(buffer.data) > offset:
            chunk = bytes(buffer.data[offset : offset + _STREAM_CHUNK])
            offset += len(chunk)
            yield chunk
        elif buffer.closed:
            return


_ExitResponse = TypeVar("_ExitResponse", sr_pb2.TaskExecWaitResponse, sr_pb2.TaskExecPollResponse)


def _exit_status(response: _ExitResponse, process: LocalProcess) -> _ExitResponse:
    """Fill `code` or `signal` (the client reports 128 + signal) once the process has exited."""
    if process.returncode is not None:
        if process.returncode < 0:
            response.signal = -process.returncode
        else:
            response.code = process.returncode
    return response

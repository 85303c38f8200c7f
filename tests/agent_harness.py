"""Start the sandbox agent as a plain subprocess and talk frames to it (synchronously).

The agent is started exactly as a driver starts it: ``python3 -c BOOTSTRAP`` with the bootstrap
payload on stdin. Replies are read with a deadline, so a broken agent fails a test instead of
hanging it. Also helpers to find processes by an environment tag in /proc.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from hermes_actors._agent import BOOTSTRAP, FrameDecoder, bootstrap_payload, encode_frame

# The /proc readers under the names this harness's users know them by (re-exported).
from proc_support import is_alive as pid_alive
from proc_support import pids_with_argv as processes_with_argv
from proc_support import pids_with_env as processes_with_env

REPLY_TIMEOUT_S = 20.0

__all__ = [
    "REPLY_TIMEOUT_S",
    "AgentProcess",
    "escapee",
    "pid_alive",
    "processes_with_argv",
    "processes_with_env",
    "wait_no_processes_with_argv",
    "wait_no_processes_with_env",
    "wait_processes_with_argv",
]


class AgentProcess:
    """One running agent. `request` sends and waits; `send`/`wait_reply` split the two."""

    def __init__(
        self,
        workspace_root: str,
        *,
        python: str = sys.executable,
        ttl_s: float = 60.0,
        user: int | None = None,
        **config: Any,
    ) -> None:
        self.config: dict[str, Any] = {"workspace_root": workspace_root, "ttl_s": ttl_s, **config}
        self.process = subprocess.Popen(
            [python, "-c", BOOTSTRAP],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            user=user,
            group=user,
            extra_groups=None if user is None else [],
        )
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self._stdout_fd = self.process.stdout.fileno()
        os.set_blocking(self._stdout_fd, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._stdout_fd, selectors.EVENT_READ)
        self._decoder = FrameDecoder()
        # Replies by id, in arrival order (id 0 is used by the ready frame and bad_frame replies).
        self._pending: dict[int, list[dict[str, Any]]] = {}
        self._next_id = 1
        self.eof = False
        try:
            self.write_raw(bootstrap_payload(self.config))
            self.ready = self.wait_reply(0)
        except BaseException:
            self.close()
            raise

    # -- raw stream ---------------------------------------------------------------------------

    def write_raw(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def close_stdin(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()

    def _pump(self, deadline: float) -> bool:
        """Read what arrives before `deadline`; False once the agent's stdout is closed."""
        timeout = deadline - time.monotonic()
        if timeout <= 0 or self.eof:
            return not self.eof
        if not self._selector.select(timeout):
            return True
        try:
            data = os.read(self._stdout_fd, 1 << 20)
        except BlockingIOError:
            return True
        if not data:
            self.eof = True
            return False
        self._decoder.feed(data)
        while True:
            complete, message = self._decoder.next_frame()
            if not complete:
                return True
            self._pending.setdefault(message["id"], []).append(message)

    # -- requests -----------------------------------------------------------------------------

    def send(self, op: str, **args: Any) -> int:
        request_id = self._next_id
        self._next_id += 1
        self.write_raw(encode_frame({"id": request_id, "op": op, "args": args}))
        return request_id

    def wait_reply(self, request_id: int, timeout: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while request_id not in self._pending:
            if not self._pump(deadline) or time.monotonic() >= deadline:
                if request_id in self._pending:
                    break
                raise AssertionError(f"no reply to request {request_id} (agent eof: {self.eof})")
        replies = self._pending[request_id]
        reply = replies.pop(0)
        if not replies:
            del self._pending[request_id]
        return reply

    def request(self, op: str, timeout: float = REPLY_TIMEOUT_S, **args: Any) -> dict[str, Any]:
        """Send one request and return its whole reply (``ok``, ``result`` or ``error``)."""
        return self.wait_reply(self.send(op, **args), timeout)

    def call(self, op: str, timeout: float = REPLY_TIMEOUT_S, **args: Any) -> dict[str, Any]:
        """Send one request and return its result, failing the test on an error reply."""
        reply = self.request(op, timeout, **args)
        assert reply["ok"], reply
        result: dict[str, Any] = reply["result"]
        return result

    def error(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request that must fail and return its error (``code``, ``message``)."""
        reply = self.request(op, **args)
        assert not reply["ok"], reply
        error: dict[str, Any] = reply["error"]
        return error

    def wait_eof(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._pump(deadline) and time.monotonic() < deadline:
            pass
        return self.eof

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stderr_text(self) -> str:
        """The agent's stderr (only once it has exited)."""
        assert self.process.stderr is not None
        return self.process.stderr.read().decode(errors="replace")

    def close(self) -> None:
        """Stop the agent (however it is doing) and release the pipes."""
        if self.process.poll() is None:
            with contextlib.suppress(BrokenPipeError, ValueError):
                self.close_stdin()
            if self.wait_exit(5.0) is None:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None and not stream.closed:
                with contextlib.suppress(BrokenPipeError):
                    stream.close()
        self._selector.close()

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _wait_none(find: Callable[[], list[int]], timeout: float) -> list[int]:
    """Poll until `find` finds nothing or `timeout` passes; return what it found last."""
    deadline = time.monotonic() + timeout
    survivors = find()
    while survivors and time.monotonic() < deadline:
        time.sleep(0.02)
        survivors = find()
    return survivors


def wait_no_processes_with_env(tag: str, timeout: float = 2.0) -> list[int]:
    """Poll until no process carries `tag` or `timeout` passes; return the survivors."""
    return _wait_none(lambda: processes_with_env(tag), timeout)


def wait_processes_with_argv(token: str, count: int, timeout: float = 10.0) -> list[int]:
    """Poll until at least `count` processes carry `token` (or fail the test)."""
    deadline = time.monotonic() + timeout
    while True:
        found = processes_with_argv(token)
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(found)} of {count} processes with {token} started")
        time.sleep(0.01)


def wait_no_processes_with_argv(token: str, timeout: float = 2.0) -> list[int]:
    """Poll until no process carries `token` or `timeout` passes; return the survivors."""
    return _wait_none(lambda: processes_with_argv(token), timeout)


def escapee(token: str) -> str:
    """Shell words for a long sleep that carries `token` as its argv[0] (counted in /proc)."""
    return f"bash -c 'exec -a {token} sleep 1000'"

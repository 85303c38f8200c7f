"""Directory and filesystem snapshots of emulated sandboxes, and images mounted into them.

Everything here runs on the Modal emulator's own asyncio loop; file trees are copied by `cp -a`
child processes (ownership, modes, links and hard links kept, reflinks where the filesystem has
them), so a large tree never stalls the loop.

What Modal does, and how it is emulated:

* `Sandbox.snapshot_directory(path)` (router `TaskSnapshotDirectory`) makes an image holding the
  directory's contents: here a copy under the emulator's image store.
* `Sandbox.snapshot_filesystem()` (router `TaskSnapshotFilesystem`) makes an image of the whole
  sandbox: here a copy of the sandbox's root directory; a sandbox created from that image starts
  with a copy of it as its root.
* `Sandbox.mount_image(path, image)` (router `TaskMountDirectory`) shows the image's contents at
  `path`, replacing what was there: here what was there is moved aside and the image's tree is
  copied in. `unmount_image(path)` (`TaskUnmountDirectory`) removes the mounted tree and puts
  back what was there (nothing, when the mount created the directory).

Snapshot images expire after their `ttl_seconds` (none for Modal's no-expiry sentinel), as
Modal's do: their copy is deleted then.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path, PurePosixPath

from grpclib import GRPCError, Status

#: Modal's wire value for `ttl=None` (retain indefinitely).
TTL_NO_EXPIRY = 0xFFFFFFFF


def container_path(root: Path, raw: bytes, what: str) -> Path:
    """The host path of the sandbox path `raw` (absolute, not `/`), under the sandbox's `root`."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise GRPCError(Status.INVALID_ARGUMENT, f"{what} path is not UTF-8: {raw!r}") from None
    pure = PurePosixPath(text)
    if not pure.is_absolute():
        raise GRPCError(Status.INVALID_ARGUMENT, f"{what} path must be absolute: {text!r}")
    parts = [part for part in pure.parts[1:] if part not in ("", ".")]
    if not parts or ".." in parts:
        raise GRPCError(
            Status.INVALID_ARGUMENT, f"{what} path must be a directory other than /: {text!r}"
        )
    return root.joinpath(*parts)


async def copy_tree(source: Path, destination: Path) -> None:
    """`cp -a source destination` (destination must not exist); GRPCError when cp fails."""
    process = await asyncio.create_subprocess_exec(
        "cp",
        "-a",
        "--reflink=auto",
        str(source),
        str(destination),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, errors = await process.communicate()
    except BaseException:
        # Cancelled (the client left, or the emulator stops): no copy goes on behind it.
        if process.returncode is None:
            process.kill()
            await process.wait()
        await remove_tree(destination)
        raise
    if process.returncode != 0:
        await remove_tree(destination)
        raise GRPCError(
            Status.INTERNAL, f"copying {source} failed: {errors.decode(errors='replace').strip()}"
        )


async def remove_tree(path: Path) -> None:
    """Remove `path` (a tree, a file or nothing) with `rm -rf`, without blocking the loop (and
    without threads: the emulator's leak checks count them)."""
    process = await asyncio.create_subprocess_exec(
        "rm",
        "-rf",
        "--",
        str(path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await process.wait()


def is_directory(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


class SnapshotStore:
    """The trees of snapshot images, one directory each under `directory`, until they expire."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._trees: dict[str, Path] = {}
        self._expiries: dict[str, asyncio.TimerHandle] = {}

    def tree(self, image_id: str) -> Path | None:
        return self._trees.get(image_id)

    def image_ids(self) -> list[str]:
        return sorted(self._trees)

    async def add(self, image_id: str, source: Path, ttl_seconds: int) -> None:
        """Copy `source` (a directory) in as the tree of `image_id`, expiring after the ttl."""
        self.directory.mkdir(mode=0o700, exist_ok=True)
        tree = self.directory / image_id
        await copy_tree(source, tree)
        self._trees[image_id] = tree
        if ttl_seconds and ttl_seconds != TTL_NO_EXPIRY:
            loop = asyncio.get_running_loop()
            self._expiries[image_id] = loop.call_later(
                ttl_seconds, lambda: loop.create_task(self.expire(image_id))
            )

    async def expire(self, image_id: str) -> None:
        handle = self._expiries.pop(image_id, None)
        if handle is not None:
            handle.cancel()
        tree = self._trees.pop(image_id, None)
        if tree is not None:
            await remove_tree(tree)

    async def clear(self) -> None:
        for image_id in list(self._trees):
            await self.expire(image_id)


class Mounts:
    """The images mounted into one sandbox: mount point -> where its former contents wait."""

    def __init__(self, root: Path) -> None:
        # Inside the sandbox's root (so it goes with the sandbox), outside any workdir.
        self._aside_root = root / ".modal-emulator-aside"
        self._mounted: dict[Path, Path | None] = {}
        self._count = 0

    def mounted(self) -> list[Path]:
        return sorted(self._mounted)

    async def mount(self, point: Path, tree: Path) -> None:
        """Show a copy of `tree` at `point`, replacing (and keeping aside) what was there."""
        if point in self._mounted:
            await self.unmount(point)
        aside = self._set_aside(point)
        try:
            await copy_tree(tree, point)
        except BaseException:
            if aside is not None:
                os.rename(aside, point)
            raise
        self._mounted[point] = aside

    def _set_aside(self, point: Path) -> Path | None:
        """Move what is at `point` aside (where it went, or None), and make its parent."""
        aside: Path | None = None
        if point.exists() or point.is_symlink():
            self._aside_root.mkdir(mode=0o700, exist_ok=True)
            self._count += 1
            aside = self._aside_root / str(self._count)
            os.rename(point, aside)
        point.parent.mkdir(parents=True, exist_ok=True)
        return aside

    async def unmount(self, point: Path) -> None:
        if point not in self._mounted:
            raise GRPCError(Status.NOT_FOUND, f"nothing is mounted at {point.name!r}")
        aside = self._mounted.pop(point)
        await remove_tree(point)
        if aside is not None:
            os.rename(aside, point)

    async def clear(self) -> None:
        for point in list(self._mounted):
            await self.unmount(point)
        await remove_tree(self._aside_root)

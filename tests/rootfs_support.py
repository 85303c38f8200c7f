"""Build a small root filesystem from the host's own files, with no network.

`build_rootfs(path, name)` puts a python3 (with its standard library), bash and the tools the
agent and the tests use under `path`, hard-linked from the host where the filesystem allows
(copied otherwise), plus `/etc/hermes-image` holding `name`, so a test can tell which image a
command ran in. Without python (`with_python=False`) it is an image the agent cannot run in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TOOLS = (
    "bash", "sh", "cat", "ls", "cp", "chown", "chmod", "rm", "mkdir", "tar", "md5sum", "find",
    "readlink", "stat", "head", "sleep", "env", "wc", "sort", "id", "ln", "printf", "true",
)  # fmt: skip


def _place(rootfs: Path, host_path: str) -> None:
    """Put the host file `host_path` at the same path (its real path) in `rootfs`."""
    real = os.path.realpath(host_path)
    target = rootfs / real.lstrip("/")
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(real, target)
        except OSError:
            shutil.copy2(real, target)
    # The name it is asked for (a soname, a command) may differ from the file's real name.
    directory = os.path.realpath(os.path.dirname(host_path))
    alias = rootfs / directory.lstrip("/") / os.path.basename(host_path)
    if not alias.exists() and not alias.is_symlink():
        alias.parent.mkdir(parents=True, exist_ok=True)
        alias.symlink_to(os.path.relpath(real, directory))


def _libraries(paths: list[str]) -> set[str]:
    output = subprocess.run(["ldd", *paths], capture_output=True, text=True, check=False).stdout
    found = set()
    for line in output.splitlines():
        for word in line.split():
            if word.startswith("/") and os.path.exists(word):
                found.add(word)
    return found


def build_rootfs(path: Path, name: str, *, with_python: bool = True) -> Path:
    rootfs = path
    rootfs.mkdir(parents=True)
    for directory in ("usr/bin", "usr/lib", "usr/lib64", "usr/sbin", "etc", "data", "root"):
        (rootfs / directory).mkdir(parents=True, exist_ok=True)
    for top in ("bin", "lib", "lib64", "sbin"):
        (rootfs / top).symlink_to(f"usr/{top}")
    binaries = [found for tool in TOOLS if (found := shutil.which(tool, path="/usr/bin:/bin"))]
    if with_python:
        python = "/usr/bin/python3"
        binaries.append(python)
        stdlib = Path(f"/usr/lib/python3.{_minor(python)}")
        for source in stdlib.rglob("*"):
            if source.is_file() and "site-packages" not in source.parts:
                _place(rootfs, str(source))
        binaries += [str(p) for p in (stdlib / "lib-dynload").glob("*.so")]
    for binary in binaries:
        _place(rootfs, binary)
    for library in _libraries(binaries):
        _place(rootfs, library)
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")
    (rootfs / "etc" / "hermes-image").write_text(name + "\n")
    return rootfs


def _minor(python: str) -> int:
    output = subprocess.run(
        [python, "-c", "import sys; print(sys.version_info[1])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(output)


if __name__ == "__main__":  # manual use: python tests/rootfs_support.py DIR NAME
    build_rootfs(Path(sys.argv[1]), sys.argv[2])

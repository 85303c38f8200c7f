"""The sandbox agent: one stdlib-only program that runs INSIDE every sandbox.

This file is both a host-side module (the host imports its wire codec and bootstrap) and the
program the host sends into a sandbox: the driver starts ``python3 -c BOOTSTRAP``, the host writes
``bootstrap_payload(config)`` to its stdin, and from then on both sides speak frames over the
process's stdin/stdout. It must run on any ``python3 >= 3.8`` with nothing installed, so it uses
only the standard library and no syntax newer than 3.8.

Wire format
-----------
A frame is ``u32 json_length, u32 blobs_length, json, blobs`` (big endian). Byte strings never go
inside the JSON: each ``bytes`` value is replaced by ``{"$b": n}`` and its ``n`` bytes follow in
``blobs``, in the order the placeholders appear in the JSON text. So binary output and files of any
content travel without escaping or base64.

Requests: ``{"id": int > 0, "op": str, "args": {...}}``.
Replies:  ``{"id": int, "ok": true, "result": {...}}`` or
          ``{"id": int, "ok": false, "error": {"code": str, "message": str}}``.
The agent's first frame is ``{"id": 0, "ok": true, "result": {"ready": true, ...}}``.
A frame the agent cannot parse gets ``{"id": 0, "ok": false, "error": {"code": "bad_frame"}}``
when the stream is still usable, and a clean exit when it is not.
"""

from __future__ import annotations

import json
import struct
import sys
from typing import Any, Dict, List, Tuple

PROTOCOL_VERSION = 1
_HEADER = struct.Struct(">II")
MAX_FRAME_BYTES = 256 * 1024 * 1024


class FrameError(Exception):
    """A frame that cannot be decoded."""


def _extract_blobs(value: Any, blobs: List[bytes]) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        blobs.append(data)
        return {"$b": len(data)}
    if isinstance(value, dict):
        return {key: _extract_blobs(item, blobs) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_extract_blobs(item, blobs) for item in value]
    return value


def encode_frame(message: Dict[str, Any]) -> bytes:
    """Encode one message (a JSON-able dict whose leaves may be bytes) as a frame."""
    blobs: List[bytes] = []
    text = json.dumps(_extract_blobs(message, blobs), separators=(",", ":")).encode()
    blob_bytes = b"".join(blobs)
    return _HEADER.pack(len(text), len(blob_bytes)) + text + blob_bytes


def _restore_blobs(value: Any, blobs: bytes, offset: List[int]) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and "$b" in value:
            size = value["$b"]
            if not isinstance(size, int) or size < 0 or offset[0] + size > len(blobs):
                raise FrameError("blob placeholder out of range")
            start = offset[0]
            offset[0] = start + size
            return blobs[start : start + size]
        return {key: _restore_blobs(item, blobs, offset) for key, item in value.items()}
    if isinstance(value, list):
        return [_restore_blobs(item, blobs, offset) for item in value]
    return value


def decode_body(text: bytes, blobs: bytes) -> Dict[str, Any]:
    """Decode the JSON part and the blobs of one frame into a message."""
    try:
        raw = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError("frame is not valid JSON: %s" % exc) from None
    if not isinstance(raw, dict):
        raise FrameError("frame is not a JSON object")
    offset = [0]
    message = _restore_blobs(raw, blobs, offset)
    if offset[0] != len(blobs):
        raise FrameError("frame has %d unreferenced blob bytes" % (len(blobs) - offset[0]))
    return message  # type: ignore[no-any-return]


class FrameDecoder:
    """Incremental decoder: feed bytes, get complete messages.

    A malformed body raises `FrameError` for that frame only (the stream stays in sync, since the
    header gave its length); an impossible header makes the stream unusable (`broken` is set).
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_frame_bytes
        self.broken = False

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> Tuple[bool, Any]:
        """Return ``(True, message)``, or ``(False, None)`` when no whole frame is buffered.

        Raises `FrameError` for a frame that is complete but malformed.
        """
        if len(self._buffer) < _HEADER.size:
            return False, None
        text_len, blob_len = _HEADER.unpack_from(self._buffer)
        if text_len + blob_len > self._max:
            self.broken = True
            raise FrameError("frame of %d bytes exceeds the limit" % (text_len + blob_len))
        end = _HEADER.size + text_len + blob_len
        if len(self._buffer) < end:
            return False, None
        text = bytes(self._buffer[_HEADER.size : _HEADER.size + text_len])
        blobs = bytes(self._buffer[_HEADER.size + text_len : end])
        del self._buffer[:end]
        return True, decode_body(text, blobs)


# The bootstrap the driver passes to `python3 -c`. It reads the agent's source and config from
# stdin, so nothing has to exist in the sandbox image but a python3.
BOOTSTRAP = (
    "import sys,struct\n"
    "r=sys.stdin.buffer\n"
    "def n(k):\n"
    " b=b''\n"
    " while len(b)<k:\n"
    "  c=r.read(k-len(b))\n"
    "  if not c:sys.exit(3)\n"
    "  b+=c\n"
    " return b\n"
    "s=n(struct.unpack('>I',n(4))[0]).decode()\n"
    "g={'__name__':'__hermes_agent__'}\n"
    "exec(compile(s,'hermes_agent','exec'),g)\n"
    "g['main'](n(struct.unpack('>I',n(4))[0]).decode())\n"
)


def agent_source() -> str:
    """This module's source: what the host sends into the sandbox."""
    with open(__file__, encoding="utf-8") as handle:
        return handle.read()


def bootstrap_payload(config: Dict[str, Any]) -> bytes:
    """The bytes the host writes to the bootstrap's stdin: the agent source, then its config."""
    source = agent_source().encode("utf-8")
    config_bytes = json.dumps(config).encode("utf-8")
    return (
        struct.pack(">I", len(source)) + source + struct.pack(">I", len(config_bytes)) + config_bytes
    )


def main(config_text: str) -> None:
    """Entry point inside the sandbox (called by the bootstrap)."""
    raise SystemExit("agent not implemented yet")


if __name__ == "__main__":  # pragma: no cover - manual debugging only
    main(sys.argv[1] if len(sys.argv) > 1 else "{}")

"""The escape key parser between the terminal and the container process.

`Ctrl-a` is the prefix, as in buildx's monitor and GNU screen:

* `Ctrl-a c` switches to the monitor prompt,
* `Ctrl-a d` detaches and leaves the server running,
* `Ctrl-a Ctrl-a` sends one literal `Ctrl-a` to the process,
* `Ctrl-a` and any other byte sends both bytes to the process.

NOTE: buildx v0.15 drops the `Ctrl-a` in the last case and has no way to send a literal
one; bkdbg forwards both bytes, so `Ctrl-a` keeps its meaning in the container's shell
(start of line) as long as the next key is not `c`, `d` or `Ctrl-a`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

PREFIX = 0x01  # Ctrl-a
MONITOR_KEY = ord("c")
DETACH_KEY = ord("d")


class Escape(enum.Enum):
    """An action that the escape prefix asked for."""

    MONITOR = "monitor"
    DETACH = "detach"


@dataclass
class MuxResult:
    """What one chunk of input means: bytes for the process, then maybe an escape.

    Bytes after an escape in the same chunk are dropped (`rest` keeps them), because the
    terminal leaves the process at that point.
    """

    data: bytes = b""
    escape: Escape | None = None
    rest: bytes = b""


class KeyMux:
    """Split terminal input into bytes for the process and escape actions.

    The parser keeps its state between chunks, since `Ctrl-a` and its key may arrive in
    two reads.
    """

    def __init__(self) -> None:
        self._pending_prefix = False

    @property
    def pending(self) -> bool:
        """True after a `Ctrl-a` whose next key has not arrived yet."""
        return self._pending_prefix

    def feed(self, chunk: bytes) -> MuxResult:
        """Parse one chunk of terminal input."""
        out = bytearray()
        for index, byte in enumerate(chunk):
            escape = self._step(byte, out)
            if escape is not None:
                return MuxResult(bytes(out), escape, chunk[index + 1 :])
        return MuxResult(bytes(out))

    def _step(self, byte: int, out: bytearray) -> Escape | None:
        if not self._pending_prefix:
            if byte == PREFIX:
                self._pending_prefix = True
            else:
                out.append(byte)
            return None

        self._pending_prefix = False
        if byte == MONITOR_KEY:
            return Escape.MONITOR
        if byte == DETACH_KEY:
            return Escape.DETACH
        if byte == PREFIX:
            out.append(PREFIX)
        else:
            out += bytes((PREFIX, byte))
        return None

    def flush(self) -> bytes:
        """Return a `Ctrl-a` still waiting for its key (at end of input) and reset."""
        if self._pending_prefix:
            self._pending_prefix = False
            return bytes((PREFIX,))
        return b""

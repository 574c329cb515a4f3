"""Connect the local terminal (or pipes) to a container process through the server.

Three ways to attach, chosen from the local fds and the process's tty:

* terminal, tty process: raw mode, every byte goes to the process (Ctrl-C included), the
  `Ctrl-a` escapes of `KeyMux` switch to the monitor or detach, SIGWINCH becomes a resize;
* terminal, process without a tty: the terminal stays in cooked mode (local echo and line
  editing), Ctrl-C is forwarded as SIGINT and Ctrl-D closes the process's stdin;
* pipes: stdin is forwarded until EOF and then closed, no escapes.

Output of fd 1 and fd 2 is written with `os.write` to the local fds 1 and 2, byte for byte.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import select
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from bkdbg.daemon.client import AttachStream, DaemonClient
from bkdbg.daemon.messages import Closed, Exited, Output, TakenOver
from bkdbg.errors import BkdbgError
from bkdbg.shell.mux import Escape, KeyMux
from bkdbg.shell.terminal import is_terminal, on_resize, on_signal, raw_mode, window_size

logger = logging.getLogger(__name__)

READ_SIZE = 65536


class AttachEnd(enum.Enum):
    """Why the terminal left a process."""

    EXITED = "exited"  # the process ended; `code` is its status
    MONITOR = "monitor"  # Ctrl-a c
    DETACH = "detach"  # Ctrl-a d
    TAKEN_OVER = "taken-over"  # another client attached and took the input
    CLOSED = "closed"  # the server disconnected this client or is shutting down
    OUTPUT_CLOSED = "output-closed"  # the reader of the local output went away
    LOST = "lost"  # the server stopped answering


@dataclass
class AttachOutcome:
    """How an attachment ended, with the process it was attached to."""

    end: AttachEnd
    process_id: str = ""
    args: list[str] = field(default_factory=list)
    code: int = 0
    message: str = ""
    replaced_by: str = ""  # the process that a reload or rollback started in its place


@dataclass
class LocalIO:
    """The local file descriptors the process is connected to."""

    stdin: int = 0
    stdout: int = 1
    stderr: int = 2

    @property
    def interactive(self) -> bool:
        """True when both stdin and stdout are terminals."""
        return is_terminal(self.stdin) and is_terminal(self.stdout)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of `data` to `fd` (os.write may write only part of it)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class StdinPump:
    """Forward local stdin to the process in a thread, until EOF, an escape or `stop()`.

    A pipe wakes the `select` so that `stop()` returns at once, because the thread must
    not read a single byte that belongs to the monitor's prompt afterwards.
    """

    def __init__(self, fd: int, stream: AttachStream, mux: KeyMux | None) -> None:
        self._fd = fd
        self._stream = stream
        self._mux = mux
        self._wake_read, self._wake_write = os.pipe()
        self._thread = threading.Thread(target=self._run, name="bkdbg-stdin", daemon=True)
        self.escape: Escape | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the thread and wait for it; safe to call more than once."""
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")
        self._thread.join()
        for fd in (self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _run(self) -> None:
        try:
            while self._forward_once():
                pass
        except BkdbgError as exc:
            # the output side reports why the process or server went away
            logger.debug("stdin pump stopped: %s", exc)

    def _forward_once(self) -> bool:
        readable, _, _ = select.select([self._fd, self._wake_read], [], [])
        if self._wake_read in readable:
            return False
        data = os.read(self._fd, READ_SIZE)
        if not data:
            self._stream.close_stdin()
            return False
        return self._send(data)

    def _send(self, data: bytes) -> bool:
        if self._mux is None:
            self._stream.send_stdin(data)
            return True
        result = self._mux.feed(data)
        if result.data:
            self._stream.send_stdin(result.data)
        if result.escape is None:
            return True
        self.escape = result.escape
        # ends the output loop in the other thread
        self._stream.close()
        return False


def _pump_output(stream: AttachStream, local: LocalIO, outcome: AttachOutcome) -> None:
    """Write the process's output until the stream reports how the attachment ended."""
    for message in stream:
        if isinstance(message, Output):
            target = local.stderr if message.fd == 2 else local.stdout
            write_all(target, message.data)
        elif isinstance(message, Exited):
            outcome.end, outcome.code = AttachEnd.EXITED, message.code
            outcome.message, outcome.replaced_by = message.message, message.replaced_by
            return
        elif isinstance(message, TakenOver):
            outcome.end, outcome.message = AttachEnd.TAKEN_OVER, message.by_client
            return
        elif isinstance(message, Closed):
            outcome.end, outcome.message = AttachEnd.CLOSED, message.reason
            return
    outcome.end, outcome.message = AttachEnd.CLOSED, "the server ended the stream"


def _follow(
    stream: AttachStream, local: LocalIO, pump: StdinPump | None, outcome: AttachOutcome
) -> AttachOutcome:
    """Run the output loop; an escape typed meanwhile decides the outcome."""
    try:
        _pump_output(stream, local, outcome)
    except BkdbgError as exc:
        outcome.end, outcome.message = AttachEnd.LOST, str(exc)
    except BrokenPipeError:
        # the reader of our stdout went away (`bkdbg ... | head`): stop quietly
        outcome.end, outcome.message = AttachEnd.OUTPUT_CLOSED, "the local output was closed"
    if pump is not None and pump.escape is not None:
        outcome.end = AttachEnd.MONITOR if pump.escape is Escape.MONITOR else AttachEnd.DETACH
        outcome.message = ""
    return outcome


@contextlib.contextmanager
def _pumping(pump: StdinPump | None) -> Iterator[None]:
    if pump is None:
        yield
        return
    pump.start()
    try:
        yield
    finally:
        pump.stop()


def _resize(stream: AttachStream, rows: int, cols: int) -> None:
    try:
        stream.resize(rows, cols)
    except BkdbgError as exc:
        logger.warning("resize to %dx%d failed: %s", rows, cols, exc)


def _send_signal(stream: AttachStream, name: str) -> None:
    try:
        stream.signal(name)
    except BkdbgError as exc:
        logger.warning("forwarding SIG%s failed: %s", name, exc)


def _follow_raw(stream: AttachStream, local: LocalIO, outcome: AttachOutcome) -> AttachOutcome:
    """Terminal and tty process: raw mode, escapes, resizes."""
    with raw_mode(local.stdin), on_resize(local.stdout, lambda r, c: _resize(stream, r, c)):
        pump = StdinPump(local.stdin, stream, KeyMux())
        with _pumping(pump):
            return _follow(stream, local, pump, outcome)


def _follow_lines(stream: AttachStream, local: LocalIO, outcome: AttachOutcome) -> AttachOutcome:
    """No tty on one side: stdin until EOF, Ctrl-C forwarded as SIGINT."""
    with on_signal(signal.SIGINT, lambda: _send_signal(stream, "INT")):
        pump = StdinPump(local.stdin, stream, KeyMux() if local.interactive else None)
        with _pumping(pump):
            return _follow(stream, local, pump, outcome)


def attach(
    client: DaemonClient, process_id: str, local: LocalIO, *, replay: bool = True
) -> AttachOutcome:
    """Attach `local` to a process (empty id: the interactive one) until it ends or we leave.

    The mode (see the module docstring) follows the process's tty, which the server
    reports when the stream opens. Output kept while nobody was attached comes first
    when `replay` is set.
    """
    rows, cols = window_size(local.stdout) if local.interactive else (0, 0)
    stream = client.attach(process_id, rows=rows, cols=cols, replay=replay)
    attached = stream.attached
    outcome = AttachOutcome(AttachEnd.LOST, attached.process_id, list(attached.args))
    try:
        if attached.tty and local.interactive:
            return _follow_raw(stream, local, outcome)
        return _follow_lines(stream, local, outcome)
    finally:
        stream.close()


def run_collect(client: DaemonClient, process_id: str, local: LocalIO) -> AttachOutcome:
    """Attach to a process started for a script: no stdin, output to `local` until it ends."""
    stream = client.attach(process_id, replay=True)
    attached = stream.attached
    outcome = AttachOutcome(AttachEnd.LOST, attached.process_id, list(attached.args))
    try:
        stream.close_stdin()
        return _follow(stream, local, None, outcome)
    finally:
        stream.close()

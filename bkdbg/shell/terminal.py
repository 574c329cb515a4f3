"""The local terminal: raw mode, window size and SIGWINCH.

Every function here takes file descriptors, so tests can run them on a pty pair.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import struct
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

# When the size cannot be read (not a terminal), processes get the classic 24x80.
DEFAULT_SIZE = (24, 80)

ResizeCallback = Callable[[int, int], None]
SignalHandler = Callable[[int, FrameType | None], Any] | int | None


def is_terminal(fd: int) -> bool:
    """Return True when `fd` is a terminal."""
    return os.isatty(fd)


def window_size(fd: int) -> tuple[int, int]:
    """Return (rows, cols) of the terminal on `fd`, or DEFAULT_SIZE when it has none."""
    try:
        packed = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
    except OSError:
        return DEFAULT_SIZE
    rows, cols, _, _ = struct.unpack("HHHH", packed)
    if rows == 0 or cols == 0:
        return DEFAULT_SIZE
    return rows, cols


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    # SystemExit unwinds through the `finally` that restores the terminal, which a
    # default SIGTERM/SIGHUP action (immediate death) would skip.
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _exit_on_termination() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[signal.Signals, SignalHandler] = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        previous[signum] = signal.signal(signum, _raise_exit)
    try:
        yield
    finally:
        for restored, handler in previous.items():
            signal.signal(restored, handler)


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Put the terminal on `fd` in raw mode and restore its modes when the block ends.

    The modes are restored on every exit: return, exception, SIGTERM and SIGHUP (which
    become SystemExit inside the block). In raw mode Ctrl-C, Ctrl-Z and Ctrl-\\ arrive as
    bytes on `fd` instead of signals to this process.
    """
    saved = termios.tcgetattr(fd)
    with _exit_on_termination():
        try:
            tty.setraw(fd, termios.TCSANOW)
            yield
        finally:
            _restore(fd, saved)


def _restore(fd: int, saved: list[Any]) -> None:
    try:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    except termios.error as exc:
        # a terminal that hung up (closed window, dropped SSH) cannot be restored
        logger.debug("cannot restore the terminal modes of fd %d: %s", fd, exc)


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C back in the block, and hand it to the previous handler at its end.

    This keeps a KeyboardInterrupt out of a setup whose cleanup could not run yet. It
    swaps the Python handler rather than blocking the signal, because any thread of the
    process (grpc's, say) may receive SIGINT and have the main thread raise.
    """
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(signal.SIGINT, None)


@contextlib.contextmanager
def on_signal(signum: int, callback: Callable[[], None]) -> Iterator[None]:
    """Call `callback()` instead of the usual action for `signum` while the block runs.

    Outside the main thread no handler can be installed, so the block runs without one.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(_signum: int, _frame: FrameType | None) -> None:
        callback()

    previous = signal.signal(signum, handle)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def on_resize(fd: int, callback: ResizeCallback) -> contextlib.AbstractContextManager[None]:
    """Call `callback(rows, cols)` with the size of `fd` on every SIGWINCH in the block."""
    return on_signal(signal.SIGWINCH, lambda: callback(*window_size(fd)))

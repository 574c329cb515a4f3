"""The `--progress tty` renderer: a live view of the build steps, drawn with rich."""

from __future__ import annotations

import contextlib
import io
import os
import termios
import threading
import time
from collections.abc import Callable
from typing import TextIO

from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from bkdbg.progress import (
    LockedRenderer,
    LogEvent,
    ProgressEvent,
    StepState,
    StepTrace,
    VertexEvent,
    is_cancelled,
)


class _Console(Console):
    """A rich Console that reports a closed stream as BrokenPipeError in the main thread.

    rich's own handling raises SystemExit(1), which would end bkdbg without the cleanup
    that ends its session. In rich's refresh thread, the console only records it, and
    the renderer raises it at the main thread's next update or close.
    """

    broken = False

    def on_broken_pipe(self) -> None:
        self.quiet = True  # no further writes
        self.broken = True
        if threading.current_thread() is threading.main_thread():
            raise BrokenPipeError


class TtyRenderer(LockedRenderer):
    """Draws a live view of the steps with rich, and leaves a compact summary when closed.

    rich redraws from its own thread, so the step table has its own lock, which `close`
    does not hold while it waits for that thread to stop. The terminal does not echo
    typed keys while the view is live: an echoed `^C` after a full-width last line moved
    the cursor down a line, and rich's final clear then left the top line behind.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._trace = StepTrace()
        self._state_lock = threading.Lock()
        self._began = time.monotonic()
        self._first_seen: dict[str, float] = {}  # local clock, for steps still running
        self._cancelled = False
        # str cells are plain text. Without markup and emoji codes, rich also does not
        # import its emoji table before the first progress line.
        self._console = _Console(
            file=stream, force_terminal=True, highlight=False, markup=False, emoji=False
        )
        self._live = Live(
            console=self._console,
            get_renderable=self._live_view,
            refresh_per_second=8,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._restore_echo = _stop_echo(stream)
        self._live.start()

    def _render(self, events: list[ProgressEvent]) -> None:
        if self._console.broken:
            raise BrokenPipeError  # seen by rich's refresh thread
        with self._state_lock:
            for event in events:
                self._apply(event)

    def _apply(self, event: ProgressEvent) -> None:
        if isinstance(event, VertexEvent):
            step = self._trace.apply_vertex(event)
            if step.started is not None:
                self._first_seen.setdefault(step.digest, time.monotonic())
        elif isinstance(event, LogEvent) and event.vertex in self._trace.steps:
            self._trace.add_log(self._trace.steps[event.vertex], event.data)

    def _finish(self, ok: bool, cancelled: bool) -> None:
        try:
            self._live.stop()
            with self._state_lock:
                self._cancelled = cancelled
                # no step and no Ctrl-C means no build to sum up (BuildKit was not reached)
                if self._trace.steps or cancelled:
                    self._console.print(self._view(finished=True, ok=ok))
        finally:
            if self._restore_echo is not None:
                self._restore_echo()
        if self._console.broken:
            raise BrokenPipeError

    def _live_view(self) -> RenderableType:
        with self._state_lock:
            return self._view(finished=False, ok=True)

    def _view(self, finished: bool, ok: bool) -> RenderableType:
        steps = [s for s in self._trace.steps.values() if s.started is not None or s.done]
        steps.sort(key=lambda s: s.started or 0.0)
        state = ""
        if finished and self._cancelled:
            state = "CANCELED"
        elif finished:
            state = "FINISHED" if ok else "FAILED"
        elapsed = time.monotonic() - self._began
        done = sum(1 for s in steps if s.done)
        table = Table.grid(expand=True)
        table.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
        table.add_column(justify="right", no_wrap=True)
        table.add_row(f"[+] Building {elapsed:.1f}s ({done}/{len(steps)}) {state}".rstrip(), "")
        for step in steps:
            self._add_step_rows(table, step, finished)
        return table

    def _add_step_rows(self, table: Table, step: StepState, finished: bool) -> None:
        label, style = "", ""
        interrupted = self._cancelled and step.started is not None and not step.done
        if is_cancelled(step.error) or interrupted:
            label, style = "CANCELED ", "yellow"
        elif step.error:
            label, style = "ERROR ", "red"
        elif step.done:
            label, style = ("CACHED " if step.cached else ""), "blue"
        now = self._step_clock(step)
        table.add_row(Text(f" => {label}{step.name}", style=style), f"{step.duration(now):.1f}s")
        if step.done or finished:
            return
        for line in step.tail:
            table.add_row(Text(f" => => # {line}", style="dim"), "")

    def _step_clock(self, step: StepState) -> float | None:
        """Return "now" on BuildKit's clock for a running step, from the local clock."""
        if step.done or step.started is None:
            return None
        return step.started + time.monotonic() - self._first_seen.get(step.digest, self._began)


def _stop_echo(stream: TextIO) -> Callable[[], None] | None:
    """Turn off the echo of typed keys on the terminal of `stream`; return the undo.

    None when `stream` is no terminal, or when this process runs in the background,
    where changing the terminal's modes would stop it with SIGTTOU.
    """
    try:
        fd = stream.fileno()
        if os.tcgetpgrp(fd) != os.getpgrp():
            return None
        saved = termios.tcgetattr(fd)
        quiet = list(saved)
        quiet[3] &= ~termios.ECHO
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
    except (OSError, ValueError, io.UnsupportedOperation, termios.error):
        return None

    def restore() -> None:
        with contextlib.suppress(OSError, termios.error):
            termios.tcsetattr(fd, termios.TCSANOW, saved)

    return restore

"""`bkdbg run-script FILE`: monitor commands from a file, through the same cmd2 app.

One command per line; blank lines and lines starting with `#` are skipped. The script
stops at the first failing line unless `keep_going`; a failure prints `FILE:LINE: <error>`.
The exit status is 0 only when every command succeeded. Servers the script started shut
down at the end, unless its last command was `detach`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

from bkdbg.errors import BkdbgError, UsageError
from bkdbg.shell.monitor import Monitor
from bkdbg.shell.workspace import Workspace

logger = logging.getLogger(__name__)


@dataclass
class ScriptLine:
    """A command of a script and its 1-based line number."""

    number: int
    text: str

    @property
    def command(self) -> str:
        return self.text.split(maxsplit=1)[0]


def read_script(path: str) -> list[ScriptLine]:
    """Return the commands of a script file; raise UsageError when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"cannot read script: {path}: {reason}: check the path") from exc
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped and not stripped.startswith("#"):
            lines.append(ScriptLine(number, stripped))
    return lines


@dataclass
class ScriptRun:
    """Progress of a script: how many lines failed, and the last command run."""

    failures: int = 0
    last: str = ""


@contextlib.contextmanager
def _interruptible(flag: list[bool]) -> Iterator[None]:
    """Record Ctrl-C in `flag` before cmd2 turns it into a finished command."""

    def handle(_signum: int, _frame: FrameType | None) -> None:
        flag.append(True)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_lines(
    monitor: Monitor, path: str, lines: list[ScriptLine], keep_going: bool, run: ScriptRun
) -> None:
    interrupted: list[bool] = []
    with _interruptible(interrupted):
        for line in lines:
            monitor.failed = False
            monitor.error_prefix = f"{path}:{line.number}: "
            stop = monitor.runcmds_plus_hooks([line.text], stop_on_keyboard_interrupt=True)
            run.last = line.command
            if interrupted:
                raise KeyboardInterrupt
            if monitor.failed:
                run.failures += 1
                if not keep_going:
                    return
            if stop:
                return


def _shut_down_started(ws: Workspace) -> None:
    """End the sessions of the servers this script started (each stops once no client is left)."""
    from bkdbg.daemon.client import DaemonClient

    current = ws.current.instance_id if ws.current else ""
    ws.leave(end_session=current in ws.launched)
    for instance_id in ws.launched:
        if instance_id == current:
            continue
        try:
            client = DaemonClient.connect(ws.root, instance_id)
        except BkdbgError:
            continue  # already gone: killed by the script, or stopped by itself
        try:
            client.goodbye(end_session=True)
        finally:
            client.close()


def _finish(ws: Workspace, run: ScriptRun) -> None:
    if run.last == "detach":
        return  # every server keeps running, as the script asked
    if ws.launched:
        _shut_down_started(ws)
    elif ws.current is not None:
        ws.leave(end_session=False)


def run_script(ws: Workspace, path: str, *, keep_going: bool = False, attach_id: str = "") -> int:
    """Run a script file; return 0 when every command succeeded, else 1."""
    lines = read_script(path)
    if attach_id:
        ws.connect(attach_id)
    monitor = Monitor(ws, batch=True)
    run = ScriptRun()
    try:
        _run_lines(monitor, path, lines, keep_going, run)
    finally:
        _finish(ws, run)
    return 1 if run.failures else monitor.exit_code

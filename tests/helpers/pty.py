"""Drive a program through a real pseudo-terminal with pexpect, with readable failures.

    with spawn_pty(["bkdbg", "debug", str(context)]) as term:
        term.expect_exact("(bkdbg) ")
        term.sendline("exit")
        assert term.close() == 0

The terminal is pinned to TERM=xterm and 24x80 (LINES, COLUMNS and the pty size agree).
A failed expectation reports the expected text, the tail of the output with ANSI escape
sequences removed, and the contents of any log files passed to `spawn_pty`.
"""

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from io import StringIO
from pathlib import Path
from typing import NoReturn

import pexpect
import pytest

ROWS = 24
COLUMNS = 80
DEFAULT_TIMEOUT = 10.0  # seconds for one expectation
TAIL_CHARS = 2000  # output shown when an expectation fails

# CSI sequences (colours, cursor moves), OSC sequences (titles) and two-byte escapes
_ANSI_ESCAPE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]"
)


def strip_ansi(text: str) -> str:
    """Remove ANSI escape sequences and carriage returns from terminal output."""
    return _ANSI_ESCAPE.sub("", text).replace("\r", "")


class PtySession:
    """A spawned program plus everything it has written to the terminal so far."""

    def __init__(self, child: pexpect.spawn, log_files: Sequence[Path] = ()) -> None:
        self.child = child
        self.log_files = list(log_files)
        self._output = StringIO()
        child.logfile_read = self._output

    @property
    def output(self) -> str:
        """All terminal output so far, with ANSI escape sequences removed."""
        return strip_ansi(self._output.getvalue())

    def expect_exact(self, text: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Wait for `text` in the output and return what came before it.

        Fails the test on timeout or if the program exits first.
        """
        # fail outside the except blocks, so the report does not chain pexpect's long dump
        problem = None
        try:
            self.child.expect_exact(text, timeout=timeout)
        except pexpect.TIMEOUT:
            problem = f"timed out after {timeout}s waiting for {text!r}"
        except pexpect.EOF:
            problem = f"program exited while waiting for {text!r}"
        if problem:
            self.fail(problem)
        return str(self.child.before)

    def send(self, text: str) -> None:
        self.child.send(text)

    def sendline(self, line: str = "") -> None:
        self.child.sendline(line)

    def sendcontrol(self, char: str) -> None:
        """Send Ctrl-`char`, for example sendcontrol("a") for Ctrl-a."""
        self.child.sendcontrol(char)

    def resize(self, rows: int, columns: int) -> None:
        """Set the pty size, which sends SIGWINCH to the program."""
        self.child.setwinsize(rows, columns)

    def close(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait for the program to exit and return its exit code (128 + N if killed by signal N).

        Fails if it does not exit within `timeout` or if its output contains a Traceback.
        """
        exited = True
        try:
            self.child.expect(pexpect.EOF, timeout=timeout)
        except pexpect.TIMEOUT:
            exited = False
        if not exited:
            self.fail(f"program did not exit within {timeout}s")
        self.child.close()
        if "Traceback" in self.output:
            self.fail("output contains a Traceback")
        if self.child.signalstatus is not None:
            return 128 + int(self.child.signalstatus)
        return int(self.child.exitstatus)

    def fail(self, reason: str) -> NoReturn:
        """Fail the test with `reason`, the output tail and the log files."""
        parts = [
            reason,
            f"--- last {TAIL_CHARS} characters of output ---",
            self.output[-TAIL_CHARS:],
        ]
        for path in self.log_files:
            parts.append(f"--- {path} ---")
            parts.append(path.read_text(errors="replace") if path.exists() else "(missing)")
        pytest.fail("\n".join(parts), pytrace=False)


def pty_env(rows: int = ROWS, columns: int = COLUMNS) -> dict[str, str]:
    """Return a copy of os.environ with the terminal type and size pinned."""
    env = dict(os.environ)
    env.update(TERM="xterm", LINES=str(rows), COLUMNS=str(columns))
    return env


@contextmanager
def spawn_pty(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    log_files: Sequence[Path] = (),
    rows: int = ROWS,
    columns: int = COLUMNS,
) -> Iterator[PtySession]:
    """Start `argv` on a new pty of `rows` x `columns` and kill it on exit if still running.

    `env` defaults to pty_env(); pass pty_env() with additions to extend it.
    """
    child = pexpect.spawn(
        argv[0],
        list(argv[1:]),
        cwd=str(cwd) if cwd else None,
        env=env if env is not None else pty_env(rows, columns),
        dimensions=(rows, columns),
        encoding="utf-8",
        codec_errors="replace",
        timeout=DEFAULT_TIMEOUT,
    )
    try:
        yield PtySession(child, log_files)
    finally:
        if child.isalive():
            child.terminate(force=True)
        child.close()

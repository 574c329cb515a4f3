"""Run the real `bkdbg` command as a user would, and look at what it leaves behind.

Used by the bad-input, fault and security tests: they start `bkdbg` as a subprocess or on
a pty, read its servers' instance directories under $BKDBG_ROOT, measure server
processes through /proc, and stop every server a test started.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pexpect

from tests.helpers.pty import PtySession, pty_env, spawn_pty

# the console script that `pip install -e .` put beside this Python, else the module
_SCRIPT = Path(sys.executable).with_name("bkdbg")
BKDBG: list[str] = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "bkdbg"]
BKDBG_SHELL = shlex.join(BKDBG)  # the same command line, for a shell

COMMAND_TIMEOUT = 60.0  # seconds for one non-interactive bkdbg command
BUILD_TIMEOUT = 60.0  # seconds for a build to reach the container prompt on a pty
STOP_TIMEOUT = 10.0  # seconds for a server to go away after kill or exit

SHELL_PROMPT = "ctr% "  # set with ENV PS1 in the test Dockerfiles (busybox sh)
MONITOR_PROMPT = "(bkdbg)"  # prompt_toolkit draws the trailing space as a cursor move
ERROR_PREFIX = "bkdbg: error: "
_INSTANCE_ID = re.compile(r"^[0-9a-f]{8}$")
_LIST_ROW = re.compile(r"^([0-9a-f]{8})\s")


def run_bkdbg(
    *args: str,
    stdin: str | None = None,
    timeout: float = COMMAND_TIMEOUT,
    env: dict[str, str] | None = None,
    umask: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `bkdbg ARGS` with pipes and return its result.

    stdin is /dev/null unless `stdin` gives the text to send. `umask`, when given, is set
    in the child before bkdbg starts (and so inherited by any server it launches).
    """
    preexec: Callable[[], object] | None = None
    if umask is not None:
        mask = umask

        def preexec() -> object:
            return os.umask(mask)

    return subprocess.run(
        [*BKDBG, *args],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        preexec_fn=preexec,
        check=False,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Check that a failed command printed exactly one error line, and return that line.

    Exactly one stderr line starts with `bkdbg: error: `. Other stderr lines are allowed,
    because a build prints its progress and, for a Dockerfile error, BuildKit's excerpt
    of the source.
    """
    report = describe(result)
    assert result.returncode != 0, f"exit status 0\n{report}"
    assert "Traceback" not in result.stderr, report
    assert "Traceback" not in result.stdout, report
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, f"expected one line starting with {ERROR_PREFIX!r}\n{report}"
    return errors[0]


def only_stderr_line(result: subprocess.CompletedProcess[str]) -> str:
    """Return the only non-blank stderr line of `result`, and fail if there are more or none."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr\n{describe(result)}"
    return lines[0]


def describe(result: subprocess.CompletedProcess[str]) -> str:
    """Return the command line, exit status and output of `result`, for failure messages."""
    return (
        f"command: {' '.join(map(str, result.args))}\nexit status: {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}"
    )


# ---------------------------------------------------------------- instances and servers


def instance_ids(root: Path) -> list[str]:
    """Return the ids of the instance directories under `root`."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if _INSTANCE_ID.match(p.name))


def listed_ids(root: Path) -> list[str]:
    """Return the server ids that `bkdbg list` prints as table rows for `root`."""
    result = run_bkdbg("list", "--root", str(root))
    assert result.returncode == 0, describe(result)
    return [m.group(1) for line in result.stdout.splitlines() if (m := _LIST_ROW.match(line))]


def only_instance(root: Path, timeout: float = STOP_TIMEOUT) -> str:
    """Wait until exactly one instance directory exists under `root`, and return its id."""
    wait_for(lambda: len(instance_ids(root)) == 1, timeout, f"one instance under {root}")
    return instance_ids(root)[0]


def server_pid(root: Path, instance_id: str) -> int:
    """Return the pid in a server's pid file, waiting briefly for the file to appear."""
    path = root / instance_id / "pid"
    wait_for(lambda: path.exists() and path.read_text().strip() != "", STOP_TIMEOUT, str(path))
    return int(path.read_text())


def server_log(root: Path, instance_id: str) -> str:
    path = root / instance_id / "log"
    return path.read_text(errors="replace") if path.exists() else ""


def pid_running(pid: int) -> bool:
    """Return whether `pid` is a live process (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_for(condition: Callable[[], bool], timeout: float, description: str) -> None:
    """Poll `condition` every 50 ms, and fail if it is not true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {description}"
        time.sleep(0.05)


def stop_servers(root: Path) -> None:
    """Stop every server under `root` that a test left: `bkdbg kill --all`, then SIGKILL.

    Only servers whose pid file is under `root` are signalled, so only servers the test
    started.
    """
    if not instance_ids(root):
        return
    pids = []
    for instance_id in instance_ids(root):
        try:
            pids.append(int((root / instance_id / "pid").read_text()))
        except (OSError, ValueError):
            pass
    try:
        run_bkdbg("kill", "--all", "--root", str(root), timeout=30)
    except subprocess.TimeoutExpired:
        pass
    for pid in pids:
        if pid_running(pid):
            os.kill(pid, signal.SIGKILL)


def assert_no_servers(root: Path, pids: Sequence[int] = ()) -> None:
    """Check that no server is left: no instance directory, no row in `bkdbg list`, and
    none of `pids` (servers seen during the test) still running."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while instance_ids(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = {i: sorted(p.name for p in (root / i).iterdir()) for i in instance_ids(root)}
    listing = run_bkdbg("list", "--root", str(root))
    assert not left, f"instance dirs left under {root}: {left}\n{describe(listing)}"
    assert listed_ids(root) == []
    for pid in pids:
        wait_for(_exited(pid), STOP_TIMEOUT, f"server pid {pid} to exit")


def _exited(pid: int) -> Callable[[], bool]:
    return lambda: not pid_running(pid)


# ---------------------------------------------------------------- measuring a server


@dataclass(frozen=True)
class Usage:
    """Resources of one process, read from /proc."""

    fds: int
    threads: int
    rss_kib: int

    def __str__(self) -> str:
        return f"{self.fds} fds, {self.threads} threads, RSS {self.rss_kib / 1024:.1f} MiB"


def process_usage(pid: int) -> Usage:
    """Return the open fds, threads and resident set size of process `pid`."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return Usage(
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(fields["Threads"]),
        rss_kib=int(fields["VmRSS"].split()[0]),
    )


# ---------------------------------------------------------------- pty sessions


def bkdbg_pty_env(**extra: str) -> dict[str, str]:
    """Return the environment for bkdbg on a pty: pinned terminal, no cursor position queries."""
    env = pty_env()
    # pexpect does not reply to prompt_toolkit's cursor position requests
    env["PROMPT_TOOLKIT_NO_CPR"] = "1"
    env.update(extra)
    return env


@contextmanager
def spawn_bkdbg(*args: str, root: Path, env: dict[str, str] | None = None) -> Iterator[PtySession]:
    """Run `bkdbg ARGS` on a new pty. A failure report includes the server logs under `root`."""
    with spawn_pty([*BKDBG, *args], env=env or bkdbg_pty_env()) as term:
        term.log_files = _LogFiles(root)  # type: ignore[assignment]
        yield term


class _LogFiles:
    """The server logs under a root, listed when a failure report reads them."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __iter__(self) -> Iterator[Path]:
        return iter(sorted(self.root.glob("*/log")))


def expect_in_shell(term: PtySession, command: str, expected: str, timeout: float = 10.0) -> None:
    """Type `command` in the container shell and wait for `expected` in its output."""
    term.sendline(command)
    term.expect_exact(expected, timeout=timeout)


def to_monitor(term: PtySession) -> None:
    """Switch from the container to the monitor prompt with Ctrl-a c."""
    term.sendcontrol("a")
    term.send("c")
    term.expect_exact(MONITOR_PROMPT)


def expect_match(term: PtySession, pattern: str, timeout: float = 10.0) -> re.Match[str]:
    """Wait for the regular expression `pattern` in the output and return its match."""
    try:
        term.child.expect(pattern, timeout=timeout)
    except pexpect.TIMEOUT:
        term.fail(f"timed out after {timeout}s waiting for /{pattern}/")
    except pexpect.EOF:
        term.fail(f"program exited while waiting for /{pattern}/")
    match = term.child.match
    assert isinstance(match, re.Match)
    return match


def client_pid(term: PtySession) -> int:
    pid = term.child.pid
    assert pid is not None
    return pid


def kill_client(term: PtySession) -> None:
    """Kill the bkdbg client on `term` with SIGKILL and reap it."""
    os.kill(client_pid(term), signal.SIGKILL)
    wait_for(lambda: not term.child.isalive(), STOP_TIMEOUT, "the killed client to exit")


class OuterShell:
    """An interactive bash on a pty, from which bkdbg runs as a user would start it.

    It lets a test compare the terminal settings (`stty -g`) before and after bkdbg.
    """

    PROMPT = "outer$ "

    def __init__(self, term: PtySession) -> None:
        self.term = term
        term.expect_exact(self.PROMPT)

    def stty(self) -> str:
        """Return `stty -g` of the pty, run at the bash prompt."""
        # the typed line contains "$(stty -g)", which the pattern does not match
        self.term.sendline("echo STTY-$(stty -g)-END")
        settings = expect_match(self.term, r"STTY-([0-9a-f:]+)-END").group(1)
        self.term.expect_exact(self.PROMPT)
        return settings

    def start(self, command: str) -> None:
        """Type `command` followed by an echo of its exit status."""
        self.term.sendline(f"{command}; echo EXIT-$?-END")

    def exit_status(self, timeout: float = 10.0) -> int:
        """Wait for the exit status echoed after the command of `start`, then the prompt."""
        # the typed line contains "EXIT-$?-END", which the pattern does not match
        status = int(expect_match(self.term, r"EXIT-(\d+)-END", timeout).group(1))
        self.term.expect_exact(self.PROMPT)
        return status


@contextmanager
def outer_shell(root: Path) -> Iterator[OuterShell]:
    """Start bash (no rc files) on a pty with the prompt `outer$ `."""
    env = bkdbg_pty_env(PS1=OuterShell.PROMPT)
    with spawn_pty(["bash", "--norc", "--noprofile", "-i"], env=env) as term:
        term.log_files = _LogFiles(root)  # type: ignore[assignment]
        yield OuterShell(term)

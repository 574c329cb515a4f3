"""`bkdbg build --invoke` through a real pty and through pipes, against the real BuildKit.

Each test checks that no build container is left running (`no_leaked_containers`) and
that the server it started is gone.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pexpect
import pytest

from tests.helpers import TEST_IMAGE
from tests.helpers.pty import PtySession, pty_env, spawn_pty

pytestmark = [pytest.mark.pty, pytest.mark.slow]

PROMPT = "/ # "  # busybox sh as root
MONITOR_PROMPT = "(bkdbg)"
BUILD_TIMEOUT = 60.0
INSTANCE_WAIT = 10.0
BKDBG = [sys.executable, "-m", "bkdbg"]

DOCKERFILE = f"FROM {TEST_IMAGE}\nRUN echo hello > /hello\n"


@pytest.fixture
def root() -> Path:
    return Path(os.environ["BKDBG_ROOT"])


@pytest.fixture
def env(buildkit_addr: str) -> dict[str, str]:
    environ = pty_env()
    environ["BUILDKIT_HOST"] = buildkit_addr
    environ["PROMPT_TOOLKIT_NO_CPR"] = "1"  # pexpect does not reply to cursor position requests
    return environ


@pytest.fixture
def context(make_context) -> Path:
    return make_context(DOCKERFILE)


def instances(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def wait_no_instances(root: Path) -> list[str]:
    deadline = time.monotonic() + INSTANCE_WAIT
    while instances(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    return instances(root)


@contextmanager
def shell(context: Path, env: dict[str, str], *flags: str) -> Iterator[PtySession]:
    argv = [*BKDBG, "build", "--progress", "plain", *flags, "--invoke", "sh", str(context)]
    with spawn_pty(argv, env=env) as term:
        term.expect_exact(PROMPT, timeout=BUILD_TIMEOUT)
        yield term


@pytest.fixture(autouse=True)
def stop_servers(root: Path, env: dict[str, str], no_leaked_containers: None) -> Iterator[None]:
    """Kill the servers a failed test left, before `no_leaked_containers` looks."""
    yield
    if instances(root):
        subprocess.run([*BKDBG, "kill", "--all"], env=env, timeout=30, check=False)


def terminal_check_script(context: Path, *flags: str, prelude: str = "") -> str:
    """Return a `sh -c` script that runs `bkdbg build FLAGS --invoke sh CONTEXT` on its pty.

    It prints rc=STATUS, then terminal-same when the terminal's modes are those from before.
    The first line of `stty -a` contains the window size, which a test may change.
    """
    build = [*BKDBG, "build", *flags, "--invoke", "sh", str(context)]
    return (
        f"{prelude}stty -a | tail -n +2 > before.txt; {shlex.join(build)}; "
        "echo rc=$?; stty -a | tail -n +2 > after.txt; "
        "cmp before.txt after.txt && echo terminal-same"
    )


def test_shell_session(context, env, root):
    script = terminal_check_script(context, "--progress", "plain")
    with spawn_pty(["sh", "-c", script], cwd=context, env=env) as term:
        term.expect_exact(PROMPT, timeout=BUILD_TIMEOUT)

        term.sendline("cat /hello")
        term.expect_exact("hello\r\n")

        term.sendline("stty size")
        term.expect_exact("24 80\r\n")
        term.resize(30, 100)
        time.sleep(0.3)
        term.sendline("stty size")
        term.expect_exact("30 100\r\n")

        # the shell prints not-2-interrupted only if sleep ran to its end
        term.sendline("sleep 30; echo not-$((1 + 1))-interrupted")
        time.sleep(0.5)
        started = time.monotonic()
        term.sendcontrol("c")
        term.sendline("echo after-interrupt")
        term.expect_exact("after-interrupt\r\n", timeout=5)
        assert time.monotonic() - started < 5
        assert "not-2-interrupted" not in term.output

        term.sendline("exit 3")
        term.expect_exact(
            "Process p1 (sh) exited with status 3; type reload, rollback, exec or exit"
        )
        term.expect_exact(MONITOR_PROMPT)
        term.sendline("exit")
        term.expect_exact("rc=3")
        term.expect_exact("terminal-same")
        assert term.close() == 0
    assert wait_no_instances(root) == []


def test_ctrl_c_cancels_build(make_context, env, root):
    # A new step each run, so that BuildKit runs it rather than taking it from cache. Its
    # output (ran-42-N) differs from its command line, so only the running step prints it.
    run_id = time.time_ns()
    command = f"echo ran-$((6*7))-{run_id} && sleep 30"
    context = make_context(f"FROM {TEST_IMAGE}\nRUN {command}\n")
    # Ctrl-C reaches the outer sh too: its trap lets the script go on after bkdbg ends
    script = terminal_check_script(
        context, "--progress", "tty", prelude="trap 'echo outer-interrupted' INT; "
    )
    with spawn_pty(["sh", "-c", script], cwd=context, env=env) as term:
        term.expect_exact(f"ran-42-{run_id}", timeout=BUILD_TIMEOUT)
        term.sendcontrol("c")
        term.expect_exact("rc=130", timeout=10)
        term.expect_exact("terminal-same")
        assert term.close() == 0

    final = term.output.split("rc=130")[0]
    assert "CANCELED" in final
    assert f"CANCELED [2/2] RUN {command}" in final
    # no echo of the key while the live view is drawn, which would shift its last clear
    assert "^C" not in final
    assert wait_no_instances(root) == []


def test_monitor_reload_and_rollback(context, env, root):
    with shell(context, env) as term:
        term.sendline("echo scratch > /scratch; echo written")
        term.expect_exact("written\r\n")
        term.sendcontrol("a")
        term.send("c")
        term.expect_exact(MONITOR_PROMPT)

        term.sendline("rollback")
        term.expect_exact(PROMPT, timeout=BUILD_TIMEOUT)
        term.sendline("ls /scratch || echo scratch-gone")
        term.expect_exact("scratch-gone\r\n")

        (context / "Dockerfile").write_text(DOCKERFILE + "RUN echo reloaded > /new\n")
        term.sendcontrol("a")
        term.send("c")
        term.expect_exact(MONITOR_PROMPT)
        term.sendline("reload")
        term.expect_exact(PROMPT, timeout=BUILD_TIMEOUT)
        term.sendline("cat /new")
        term.expect_exact("reloaded\r\n")

        term.sendcontrol("a")
        term.send("c")
        term.expect_exact(MONITOR_PROMPT)
        term.sendline("exit")
        assert term.close() == 0
    assert wait_no_instances(root) == []


HIDE_CURSOR = "\x1b[?25l"  # rich's first write when the live view starts


def test_ctrl_c_as_view_starts_restores_terminal(make_context, env, root):
    # Ctrl-C at once after the view hid the cursor: it once came before the view could be
    # closed, which left echo off and the cursor hidden in about one run of three. The
    # context's upload outlasts the Ctrl-C, so no RUN step is starting then (see the
    # README's limit on a cancel as a RUN step starts).
    context = make_context(f"FROM {TEST_IMAGE}\nCOPY big /big\n")
    with open(context / "big", "wb") as big:
        big.truncate(200 * 1024 * 1024)
    for _ in range(6):
        (context / "Dockerfile").write_text(f"FROM {TEST_IMAGE}\nCOPY big /big-{time.time_ns()}\n")
        argv = [*BKDBG, "build", "--progress", "tty", "--invoke", "sh", str(context)]
        with spawn_pty(argv, env=env) as term:
            before = termios.tcgetattr(term.child.child_fd)
            term.expect_exact(HIDE_CURSOR, timeout=BUILD_TIMEOUT)
            term.sendcontrol("c")
            term.child.expect(pexpect.EOF, timeout=10)
            after = termios.tcgetattr(term.child.child_fd)
            cursor_shown = term.child.before.count("\x1b[?25h")
            status = term.close()

        assert status == 130
        assert after == before
        assert cursor_shown == 1
        assert "Traceback" not in term.output
    assert wait_no_instances(root) == []


def test_ctrl_c_cancels_reload(context, env, root):
    with shell(context, env) as term:
        run_id = time.time_ns()
        command = f"echo ran-$((6*7))-{run_id} && sleep 30"
        (context / "Dockerfile").write_text(f"{DOCKERFILE}RUN {command}\n")
        term.sendcontrol("a")
        term.send("c")
        term.expect_exact(MONITOR_PROMPT)
        term.sendline("reload")
        term.expect_exact(f"ran-42-{run_id}", timeout=BUILD_TIMEOUT)
        term.sendcontrol("c")
        term.expect_exact("Process p1 (sh) was ended by reload", timeout=10)
        term.expect_exact("reload: cancelled with Ctrl-C: type reload to build again")
        term.expect_exact(MONITOR_PROMPT)
        final = term.output.rsplit("(bkdbg) reload", 1)[1]

        term.sendline("exit")
        term.expect_exact("the last build did not succeed, so bkdbg exits with status 1")
        assert term.close() == 1

    assert f"CANCELED [3/3] RUN {command}" in final
    assert "^C" not in final
    assert "build cancelled" not in final  # the server's event repeats the line above
    # nor its process exit, which the line about the ended shell reports
    assert "exited with status 137" not in term.output.rsplit("(bkdbg) reload", 1)[1]
    assert wait_no_instances(root) == []


def test_pipes(context, env, root):
    result = subprocess.run(
        [*BKDBG, "build", "--invoke", "sh", str(context)],
        input="cat /hello\nexit 4\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=BUILD_TIMEOUT,
    )
    assert result.stdout == "hello\n"
    assert result.returncode == 4
    assert "Traceback" not in result.stderr
    assert wait_no_instances(root) == []


def test_pipe_reader_gone_ends_session(context, env, root):
    # the shell's `bkdbg ... | head -c 5`: bkdbg ends with the process, as `yes` would
    bkdbg = subprocess.Popen(
        [*BKDBG, "build", "--progress", "quiet", "--invoke", "yes", str(context)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert bkdbg.stdout is not None and bkdbg.stderr is not None
    assert bkdbg.stdout.read(5) == b"y\ny\ny"
    bkdbg.stdout.close()
    assert bkdbg.wait(BUILD_TIMEOUT) == 128 + signal.SIGPIPE
    assert bkdbg.stderr.read() == b""
    bkdbg.stderr.close()
    assert wait_no_instances(root) == []


@pytest.mark.parametrize("progress", ["plain", "tty"])
def test_progress_reader_gone_ends_session(progress, context, env, root):
    # `bkdbg ... 2>&1 | head -c 5`: stderr loses its reader during the progress, and bkdbg
    # ends at its next write there, which is in the progress or else the shell's line
    bkdbg = subprocess.Popen(
        [*BKDBG, "build", "--progress", progress, "--invoke", "sh", str(context)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert bkdbg.stdin is not None and bkdbg.stderr is not None
    assert len(bkdbg.stderr.read(5)) == 5
    bkdbg.stderr.close()
    bkdbg.stdin.write(b"echo late-line >&2; sleep 5\n")
    bkdbg.stdin.close()
    assert bkdbg.wait(BUILD_TIMEOUT) == 128 + signal.SIGPIPE
    assert wait_no_instances(root) == []


def test_unreachable_buildkit_on_terminal(context, env, root, tmp_path):
    address = f"unix://{tmp_path}/no-buildkit.sock"
    argv = [*BKDBG, "--addr", address, "build", "--invoke", "sh", str(context)]
    with spawn_pty(argv, env=env) as term:
        status = term.close()

    # one line, and no monitor: there is no build to fix and reload (the live view's
    # frame is in the output too, but erased on the screen)
    errors = [line for line in term.output.splitlines() if "cannot reach BuildKit" in line]
    assert status == 1
    assert len(errors) == 1, term.output
    assert errors[0].startswith(f"bkdbg: error: cannot reach BuildKit: tried {address}")
    assert "FAILED" not in term.output
    assert MONITOR_PROMPT not in term.output
    assert wait_no_instances(root) == []


def test_missing_command(context, env, root):
    result = subprocess.run(
        [*BKDBG, "build", "--progress", "quiet", "--invoke", "no-such-cmd", str(context)],
        capture_output=True,
        text=True,
        env=env,
        timeout=BUILD_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("bkdbg: ")]
    assert len(errors) == 1, result.stderr
    assert "no-such-cmd" in errors[0]
    assert wait_no_instances(root) == []


def test_failing_build(make_context, env, root):
    context = make_context(f"FROM {TEST_IMAGE}\nRUN echo one > /one\nRUN exit 7\n")
    result = subprocess.run(
        [*BKDBG, "build", "--progress", "plain", str(context)],
        capture_output=True,
        text=True,
        env=env,
        timeout=BUILD_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("bkdbg: error: ")
    assert "exit code: 7" in lines
    assert any("Dockerfile:3" in line for line in lines)
    assert wait_no_instances(root) == []


def test_on_error_shell_in_failed_state(make_context, env, root):
    context = make_context(
        f"FROM {TEST_IMAGE}\nRUN echo one > /one\nRUN echo two > /two && exit 7\n"
    )
    result = subprocess.run(
        [*BKDBG, "build", "--progress", "quiet", "--invoke", "sh", "--on", "error", str(context)],
        input="cat /one /two\nexit 5\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=BUILD_TIMEOUT,
    )
    assert result.stdout == "one\ntwo\n"
    assert result.returncode == 5
    assert "exit code: 7" in result.stderr.splitlines()
    assert wait_no_instances(root) == []

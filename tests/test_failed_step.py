"""Debugging a failed step through the real `bkdbg` command and the real BuildKit.

`--on error` starts the shell only when the build fails, in the state that the failed
command left. `rollback --init` restarts it on the state before that command ran. Each test
checks that no server and no build container is left.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from tests.helpers import TEST_IMAGE
from tests.helpers.pty import PtySession, pty_env, spawn_pty

pytestmark = [pytest.mark.pty, pytest.mark.slow]

BKDBG = str(Path(sys.executable).with_name("bkdbg"))
SHELL_PROMPT = "/work # "  # busybox sh as root in the step's WORKDIR
ROOT_PROMPT = "/ # "
MONITOR_PROMPT = "(bkdbg)"  # the trailing space does not always follow it directly
BUILD_TIMEOUT = 90.0
INSTANCE_WAIT = 10.0

FAILING = f"""\
FROM {TEST_IMAGE}
WORKDIR /work
ENV FOO=bar
RUN echo early > /early
RUN --mount=type=cache,target=/cache echo partial > /partial && echo cached > /cache/c && exit 7
"""
FIXED = FAILING.replace("exit 7", "exit 0")
FAILED_RUN = (
    "RUN --mount=type=cache,target=/cache echo partial > /partial && echo cached > /cache/c"
    " && exit 7"
)


@pytest.fixture
def root() -> Path:
    return Path(os.environ["BKDBG_ROOT"])


@pytest.fixture
def addr(buildkit_addr: str) -> str:
    return buildkit_addr


@pytest.fixture
def env() -> dict[str, str]:
    environ = pty_env()
    environ["PROMPT_TOOLKIT_NO_CPR"] = "1"  # pexpect does not reply to cursor position requests
    return environ


@pytest.fixture
def failing(make_context) -> Path:
    return make_context(FAILING)


def instances(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def wait_no_instances(root: Path) -> list[str]:
    deadline = time.monotonic() + INSTANCE_WAIT
    while instances(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    return instances(root)


@pytest.fixture(autouse=True)
def stop_servers(root: Path, env: dict[str, str], no_leaked_containers: None) -> Iterator[None]:
    """Kill the servers a failed test left, before `no_leaked_containers` looks."""
    yield
    if instances(root):
        subprocess.run([BKDBG, "kill", "--all"], env=env, timeout=30, check=False)


def build_argv(addr: str, context: Path, *flags: str) -> list[str]:
    return [BKDBG, "--addr", addr, "build", "--progress", "plain", *flags, str(context)]


def to_monitor(term: PtySession) -> None:
    term.sendcontrol("a")
    term.send("c")
    term.expect_exact(MONITOR_PROMPT)


def run_in_shell(term: PtySession, command: str, marker: str) -> str:
    """Type `command; echo marker` and return the output before the marker."""
    term.sendline(f"{command}; echo {marker}")
    term.expect_exact(f"{marker}\r\n")  # the echo of the typed line
    return term.expect_exact(f"{marker}\r\n").replace("\r", "")


def failed_step_block(output: str) -> str:
    """Return the output from the line naming the failed step to the rollback hint."""
    start = output.rindex("\n", 0, output.index("Dockerfile:5\n")) + 1
    end = output.index("rollback --init", start)
    return output[start : output.index("\n", end)]


def test_failed_state_and_rollback_init(failing, addr, env, root):
    argv = build_argv(addr, failing, "--invoke", "sh", "--on", "error")
    with spawn_pty(argv, env=env) as term:
        term.expect_exact(SHELL_PROMPT, timeout=BUILD_TIMEOUT)

        block = failed_step_block(term.output)
        assert f"{failing}/Dockerfile:5" in block
        assert f">>> {FAILED_RUN}" in block
        assert "exit code: 7" in block
        assert "command: /bin/sh -c" not in block  # the hint below shows the command
        assert "bkdbg: error:" not in term.output  # the session goes on into the shell
        assert "build step failed: " in term.output.split(f"{failing}/Dockerfile:5")[0]
        assert "Run the command again: /bin/sh -c" in block
        assert "rollback --init restarts the shell" in block
        assert term.output.splitlines().count("exit code: 7") == 1  # one block

        seen = run_in_shell(term, "cat /early /partial /cache/c; pwd; echo FOO=$FOO", "m1")
        assert seen.splitlines() == ["early", "partial", "cached", "/work", "FOO=bar"]

        to_monitor(term)
        term.sendline("rollback --init")
        term.expect_exact(SHELL_PROMPT, timeout=BUILD_TIMEOUT)
        seen = run_in_shell(term, "cat /early; ls /partial 2>&1; pwd; echo FOO=$FOO", "m2")
        assert seen.splitlines() == [
            "early",
            "ls: /partial: No such file or directory",
            "/work",
            "FOO=bar",
        ]

        # plain rollback returns to the state that the failed command left
        to_monitor(term)
        term.sendline("rollback")
        term.expect_exact(SHELL_PROMPT, timeout=BUILD_TIMEOUT)
        assert run_in_shell(term, "cat /partial", "m3") == "partial\n"

        # the shell's last status is 0, but the build failed
        to_monitor(term)
        term.sendline("exit")
        term.expect_exact("bkdbg: the last build did not succeed, so bkdbg exits with status 1")
        assert term.close() == 1
    assert wait_no_instances(root) == []


@pytest.mark.parametrize(("typed", "status"), [("exit 0", 1), ("exit 4", 4)])
def test_failed_state_piped_status(typed, status, failing, addr, env, root):
    result = subprocess.run(
        build_argv(addr, failing, "--invoke", "sh"),
        input=f"cat /partial\n{typed}\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=BUILD_TIMEOUT,
    )
    assert result.returncode == status, result.stderr
    assert result.stdout == "partial\n"
    assert "rollback --init" not in result.stderr  # there is no monitor to type it at
    last = result.stderr.splitlines()[-1]
    if status == 1:
        # the shell exited 0, so one line explains the status
        assert last == "bkdbg: the build failed, so bkdbg exits with status 1"
    else:
        assert "exits with status" not in result.stderr
    assert "Traceback" not in result.stderr
    assert wait_no_instances(root) == []


def test_script_execs_in_failed_state(failing, addr, env, tmp_path, root):
    script = tmp_path / "monitor.txt"
    script.write_text(f"build --on error --invoke sh {failing}\nexec cat /partial\nexec pwd\n")
    result = subprocess.run(
        [BKDBG, "--addr", addr, "run-script", str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=BUILD_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["partial", "/work"]
    assert "exit code: 7" in result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    assert wait_no_instances(root) == []


def test_on_error_success_starts_nothing(make_context, addr, env, root):
    context = make_context(FIXED)
    result = subprocess.run(
        build_argv(addr, context, "--invoke", "sh", "--on", "error"),
        capture_output=True,
        text=True,
        env=env,
        timeout=BUILD_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "Process p" not in result.stderr
    assert "Traceback" not in result.stderr
    assert wait_no_instances(root) == []


NOT_RUN_FAILURES = {
    "copy": ("COPY missing.txt /missing.txt", "COPY missing.txt /missing.txt"),
    "bind": (
        "RUN --mount=type=bind,source=nope,target=/x true",
        "RUN --mount=type=bind,source=nope,target=/x true",
    ),
}


@pytest.mark.parametrize("kind", sorted(NOT_RUN_FAILURES))
def test_non_run_failure_piped(kind, make_context, addr, env, root):
    line, instruction = NOT_RUN_FAILURES[kind]
    context = make_context(f"FROM {TEST_IMAGE}\nRUN echo early > /early\n{line}\n")
    result = subprocess.run(
        build_argv(addr, context),
        capture_output=True,
        text=True,
        env=env,
        timeout=BUILD_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    errors = [text for text in result.stderr.splitlines() if text.startswith("bkdbg: error: ")]
    assert len(errors) == 1, result.stderr
    assert f">>> {instruction}" in result.stderr
    assert "Dockerfile:3" in result.stderr
    assert "Traceback" not in result.stderr
    assert wait_no_instances(root) == []


@pytest.mark.parametrize("kind", sorted(NOT_RUN_FAILURES))
def test_non_run_failure_on_terminal(kind, make_context, addr, env, root):
    line, instruction = NOT_RUN_FAILURES[kind]
    context = make_context(f"FROM {TEST_IMAGE}\nRUN echo early > /early\n{line}\n")
    argv = build_argv(addr, context, "--invoke", "sh")
    with spawn_pty(argv, env=env) as term:
        index = term.child.expect_exact(
            [ROOT_PROMPT, MONITOR_PROMPT, pexpect.EOF], timeout=BUILD_TIMEOUT
        )
        assert f">>> {instruction}" in term.output
        if index == 0:
            # BuildKit gave the state of the last good step, so the shell runs there
            assert run_in_shell(term, "cat /early", "m1") == "early\n"
            to_monitor(term)
        if index == 1:
            # no RUN step failed, so there is no failed state to roll back to
            term.sendline("rollback")
            term.expect_exact("failed before a RUN step ran: fix the context and run reload")
            term.expect_exact(MONITOR_PROMPT)
        if index < 2:
            term.sendline("ps")
            term.expect_exact(MONITOR_PROMPT)
            term.sendline("exit")
        else:
            # BuildKit names only the context ref it could not checksum, not the state
            # before the step, so there is nothing to start a shell on
            assert "no debug shell: BuildKit gave no state for the failed step" in term.output
        status = term.close()

    errors = [text for text in term.output.splitlines() if text.startswith("bkdbg: error: ")]
    assert len(errors) <= 1
    if index == 2:
        assert status == 1
        assert len(errors) == 1
    assert wait_no_instances(root) == []


def test_reload_after_fix_reaches_result(failing, addr, env, root):
    argv = build_argv(addr, failing, "--invoke", "sh", "--on", "error")
    with spawn_pty(argv, env=env) as term:
        term.expect_exact(SHELL_PROMPT, timeout=BUILD_TIMEOUT)
        run_in_shell(term, "echo mine > /mine", "m0")

        # the build still fails, so a new shell starts in the new failed state
        to_monitor(term)
        term.sendline("reload")
        term.expect_exact(SHELL_PROMPT, timeout=BUILD_TIMEOUT)
        seen = run_in_shell(term, "cat /partial; ls /mine 2>&1", "m1")
        assert seen.splitlines() == ["partial", "ls: /mine: No such file or directory"]

        (failing / "Dockerfile").write_text(FIXED)
        to_monitor(term)
        term.sendline("reload")
        term.expect_exact(SHELL_PROMPT, timeout=BUILD_TIMEOUT)
        # the shell runs on the result, which has no cache mount
        seen = run_in_shell(term, "cat /early /partial; ls /cache/c 2>&1", "m2")
        assert seen.splitlines() == ["early", "partial", "ls: /cache/c: No such file or directory"]

        to_monitor(term)
        term.sendline("exit")
        assert term.close() == 0
    assert wait_no_instances(root) == []

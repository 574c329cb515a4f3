"""The terminal client through a real pty, against detached servers with the fake backend.

The fake backend runs container processes as local processes, so these tests cover the
client and server without BuildKit. `test_pty_buildkit.py` repeats the main flow on the
real engine.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers.pty import PtySession, pty_env, spawn_pty
from tests.test_cli import FAKE_BKDBG, fake_bkdbg
from tests.test_daemon_support import REPO_ROOT

pytestmark = pytest.mark.pty

SHELL_PROMPT = "$ "
MONITOR_PROMPT = "(bkdbg)"  # prompt_toolkit draws the trailing space as a cursor move
INSTANCE_WAIT = 10.0


@pytest.fixture
def root() -> Path:
    return Path(os.environ["BKDBG_ROOT"])


@pytest.fixture
def context(tmp_path: Path) -> Path:
    directory = tmp_path / "ctx"
    directory.mkdir()
    (directory / "Dockerfile").write_text("FROM scratch\n")
    return directory


def bkdbg_env() -> dict[str, str]:
    env = pty_env()
    env["PYTHONPATH"] = str(REPO_ROOT)
    # pexpect does not reply to prompt_toolkit's cursor position requests
    env["PROMPT_TOOLKIT_NO_CPR"] = "1"
    return env


@contextmanager
def bkdbg(*args: str, root: Path) -> Iterator[PtySession]:
    """Run bkdbg (servers with the fake backend) on a pty; kill its servers afterwards."""
    logs = sorted(root.glob("*/log")) if root.exists() else []
    with spawn_pty(
        [sys.executable, "-c", FAKE_BKDBG, *args], env=bkdbg_env(), log_files=logs
    ) as term:
        yield term


def instances(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def wait_instances(root: Path, expected: int) -> list[str]:
    deadline = time.monotonic() + INSTANCE_WAIT
    while len(instances(root)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return instances(root)


def server_pid(root: Path, instance_id: str) -> int:
    return int((root / instance_id / "pid").read_text())


@pytest.fixture
def fake_program(tmp_path: Path) -> str:
    """Return a shell command that runs bkdbg with fake-backend servers."""
    program = tmp_path / "fake_bkdbg.py"
    program.write_text(FAKE_BKDBG)
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(program))}"


@pytest.fixture(autouse=True)
def kill_servers(root: Path) -> Iterator[None]:
    yield
    if instances(root):
        fake_bkdbg("kill", "--all")


def shell(root: Path, context: Path) -> contextmanager:  # type: ignore[type-arg]
    return bkdbg("build", "--progress", "plain", "--invoke", "sh", str(context), root=root)


# ---------------------------------------------------------------- container and monitor


def test_monitor_escape_and_back(root, context):
    with shell(root, context) as term:
        term.expect_exact(SHELL_PROMPT)
        term.sendcontrol("a")
        term.send("c")
        term.expect_exact(MONITOR_PROMPT)
        term.sendline("ps")
        term.expect_exact("STATUS")
        term.sendline("attach")
        term.sendline("echo back-in-the-shell")
        term.expect_exact("back-in-the-shell\r\n")

        # Ctrl-a c at the prompt goes back to the process too
        term.sendcontrol("a")
        term.send("c")
        term.expect_exact(MONITOR_PROMPT)
        term.sendcontrol("a")
        term.send("c")
        term.sendline("echo back-again")
        term.expect_exact("back-again\r\n")
        term.sendline("exit 0")
        term.expect_exact("exited with status 0")
        term.sendline("exit")
        assert term.close() == 0
    assert wait_instances(root, 0) == []


def test_exit_status_and_terminal_restored(root, context, fake_program):
    command = fake_program
    script = (
        "stty -a | tail -n +2 > before.txt; "
        f"{command} build --progress quiet --invoke sh {context}; echo rc=$?; "
        "stty -a | tail -n +2 > after.txt; cmp before.txt after.txt && echo terminal-same"
    )
    with spawn_pty(["sh", "-c", script], cwd=context, env=bkdbg_env()) as term:
        term.expect_exact(SHELL_PROMPT)
        term.sendline("exit 3")
        term.expect_exact(
            "Process p1 (sh) exited with status 3; type reload, rollback, exec or exit"
        )
        term.expect_exact(MONITOR_PROMPT)
        term.sendline("exit")
        term.expect_exact("rc=3")
        term.expect_exact("terminal-same")
        assert term.close() == 0


def test_tab_completion(root, context):
    with shell(root, context) as term:
        term.expect_exact(SHELL_PROMPT)
        (instance_id,) = instances(root)
        term.sendcontrol("a")
        term.send("c")
        term.expect_exact(MONITOR_PROMPT)
        term.send("rel\t")
        term.expect_exact("reload")
        term.sendcontrol("u")
        time.sleep(0.5)  # the completion cache's first refresh, at the prompt's start
        term.send(f"kill {instance_id[:3]}\t")
        term.expect_exact(instance_id[3:])  # the part that completion inserted
        term.sendline("")
        term.expect_exact(f"killed server {instance_id}")
        term.sendline("exit")
        assert term.close() == 0


def test_history_survives_restart(root, context, tmp_path):
    script = tmp_path / "start.txt"
    script.write_text(f"build {context}\ndetach\n")
    assert fake_bkdbg("run-script", str(script)).returncode == 0
    (instance_id,) = instances(root)

    with bkdbg("attach", instance_id, root=root) as term:
        term.expect_exact(MONITOR_PROMPT)
        term.sendline("ps")
        term.expect_exact("STATUS")
        term.sendline("detach")
        assert term.close() == 0

    with bkdbg("attach", instance_id, root=root) as term:
        term.expect_exact(MONITOR_PROMPT)
        term.send("\x1b[A")  # up arrow: the last command of the previous run
        term.expect_exact("detach")
        term.send("\x1b[A")  # and the one before
        term.expect_exact("ps")
        term.sendline("")
        term.expect_exact("STATUS")
        term.sendline("detach")
        assert term.close() == 0


# ---------------------------------------------------------------- detach and reattach


def test_detach_and_reattach_replays_output(root, context):
    with shell(root, context) as term:
        term.expect_exact(SHELL_PROMPT)
        term.sendline("echo kept > kept.txt; (sleep 1; echo printed-while-away) &")
        term.sendcontrol("a")
        term.send("d")
        term.expect_exact("it keeps running: bkdbg attach ")
        assert term.close() == 0
    (instance_id,) = instances(root)
    time.sleep(1.5)

    with bkdbg("attach", root=root) as term:
        term.expect_exact("printed-while-away")
        term.sendline("cat kept.txt")
        term.expect_exact("kept\r\n")
        term.sendline("exit 0")
        term.expect_exact(MONITOR_PROMPT)
        term.sendline("exit")
        assert term.close() == 0
    assert wait_instances(root, 0) == []


def test_client_killed_server_keeps_shell(root, context):
    with shell(root, context) as term:
        term.expect_exact(SHELL_PROMPT)
        term.sendline("echo before-crash > file.txt; echo written")
        term.expect_exact("written\r\n")
        term.child.kill(signal.SIGKILL)
    (instance_id,) = wait_instances(root, 1)

    listing = fake_bkdbg("list")
    assert instance_id in listing.stdout
    with bkdbg("attach", instance_id, root=root) as term:
        term.sendline("cat file.txt")
        term.expect_exact("before-crash\r\n")
        term.sendcontrol("a")
        term.send("d")
        assert term.close() == 0


def test_second_client_takes_over(root, context):
    with shell(root, context) as first:
        first.expect_exact(SHELL_PROMPT)
        (instance_id,) = instances(root)
        with bkdbg("attach", instance_id, root=root) as second:
            first.expect_exact("another client took over this session")
            first.expect_exact(MONITOR_PROMPT)
            second.sendline("echo second-has-it")
            second.expect_exact("second-has-it\r\n")
            second.sendcontrol("a")
            second.send("d")
            assert second.close() == 0
        first.sendline("detach")
        assert first.close() == 0


def test_disconnect_ends_monitor_client(root, context):
    with shell(root, context) as term:
        term.expect_exact(SHELL_PROMPT)
        (instance_id,) = instances(root)
        term.sendcontrol("a")
        term.send("c")
        term.expect_exact(MONITOR_PROMPT)

        result = fake_bkdbg("disconnect", instance_id)

        assert result.stdout.strip() == f"disconnected 1 client from server {instance_id}"
        term.expect_exact(f"bkdbg attach {instance_id} reattaches")
        assert term.close() == 0
    # the server keeps running for the next attach
    assert instances(root) == [instance_id]


def test_server_killed_while_attached(root, context, fake_program):
    command = fake_program
    script = (
        "stty -a | tail -n +2 > before.txt; "
        f"{command} build --progress quiet --invoke sh {context}; echo rc=$?; "
        "stty -a | tail -n +2 > after.txt; cmp before.txt after.txt && echo terminal-same"
    )
    with spawn_pty(["sh", "-c", script], cwd=context, env=bkdbg_env()) as term:
        term.expect_exact(SHELL_PROMPT)
        (instance_id,) = instances(root)
        started = time.monotonic()
        os.kill(server_pid(root, instance_id), signal.SIGKILL)
        term.expect_exact(f"bkdbg: error: bkdbg server {instance_id} is not running")
        assert time.monotonic() - started < 2.0
        term.expect_exact("rc=1")
        term.expect_exact("terminal-same")
        assert term.close() == 0


def test_server_killed_at_monitor_prompt(root, context):
    with shell(root, context) as term:
        term.expect_exact(SHELL_PROMPT)
        (instance_id,) = instances(root)
        term.sendcontrol("a")
        term.send("c")
        term.expect_exact(MONITOR_PROMPT)
        os.kill(server_pid(root, instance_id), signal.SIGKILL)
        term.expect_exact(f"lost the connection to server {instance_id}")
        assert term.close() == 1


def test_pipes_with_fake_server(root, context):
    result = subprocess.run(
        [sys.executable, "-c", FAKE_BKDBG, "build", "--invoke", "sh", str(context)],
        input="echo from-pipe\nexit 4\n",
        capture_output=True,
        text=True,
        timeout=30,
        env=bkdbg_env(),
    )
    assert result.stdout == "from-pipe\n"
    assert result.returncode == 4

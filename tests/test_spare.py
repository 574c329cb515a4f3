"""The spare server, which the next `bkdbg build` under the same root claims.

First the setting and a spare started by hand: ping, stop, exit when its socket goes or
its wait ends, a client with other code. Then, against the real BuildKit, a build whose
server is a claimed spare, through pipes and through a pty, in the second client's
environment, working directory and terminal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bkdbg.daemon.early import SPARE_ENV, claim, scan_detached_build, socket_path, spares_off
from bkdbg.daemon.instances import create_instance, pid_alive
from bkdbg.daemon.spare import (
    CHECK_INTERVAL,
    DEFAULT_WAIT,
    ping,
    spare_wait,
    start_spare,
    stop_spare,
)
from tests.conftest import IsolatedDirs
from tests.helpers import TEST_IMAGE
from tests.helpers.faults import run_bkdbg
from tests.helpers.pty import pty_env, spawn_pty

BKDBG = [sys.executable, "-m", "bkdbg"]
START_TIMEOUT = 15.0  # seconds for a spare to serve after it was started
EXIT_TIMEOUT = CHECK_INTERVAL + 8.0  # seconds for a spare to notice that it should exit
BUILD_TIMEOUT = 60.0
SPARE_SETTING = "60s"  # long enough for any test, short enough that none outlives a run


@pytest.fixture
def root(isolated_env: IsolatedDirs, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The isolated root with spares on; any spare left under it is stopped afterwards."""
    monkeypatch.setenv(SPARE_ENV, SPARE_SETTING)
    yield isolated_env.bkdbg_root
    pid = stop_spare(isolated_env.bkdbg_root)
    if pid is not None:
        wait_gone(pid)


def started(root: Path, wait: float = 60.0) -> int:
    """Start a spare under `root` and return its pid once it serves."""
    start_spare(root, wait)
    return wait_serving(root)


def wait_serving(root: Path, other_than: int | None = None) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        pid = ping(root)
        if pid is not None and pid != other_than:
            return pid
        time.sleep(0.05)
    pytest.fail(f"no spare server served under {root} within {START_TIMEOUT:g} s")


def wait_gone(pid: int, timeout: float = EXIT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid), f"spare server {pid} still runs after {timeout:g} s"


def test_wait_setting() -> None:
    assert spare_wait({}) == DEFAULT_WAIT
    assert spare_wait({SPARE_ENV: "30s"}) == 30.0
    assert spare_wait({SPARE_ENV: "off"}) is None
    assert spare_wait({SPARE_ENV: "0"}) is None
    assert spare_wait({SPARE_ENV: "soon"}) is None


@pytest.mark.parametrize(("argv", "expected"), [
    (["build", "ctx"], (None, False, None)),
    (["--root", "/r", "--debug", "build", "--server-idle-timeout=30s", "ctx"],
     ("/r", True, 30.0)),
    (["--addr", "build", "list"], None),  # `build` is --addr's value here
    (["build", "--detach=false", "ctx"], None),
    (["build", "--detach", "false", "ctx"], None),
    (["build", "--server-idle-timeout", "soon", "ctx"], None),
    (["build", "--help"], None),
    (["attach"], None),
])
def test_scan_detached_build(argv: list[str],
                             expected: tuple[str | None, bool, float | None] | None) -> None:
    flags = scan_detached_build(argv)
    if expected is None:
        assert flags is None
    else:
        assert flags is not None
        assert (flags.root, flags.debug, flags.idle_timeout) == expected


def test_spares_off_setting() -> None:
    assert not spares_off({})
    assert not spares_off({SPARE_ENV: "30s"})
    assert spares_off({SPARE_ENV: " OFF "})
    assert spares_off({SPARE_ENV: "0"})


def test_ping_and_stop(root: Path) -> None:
    pid = started(root)
    assert stop_spare(root) == pid
    assert not pid_alive(pid)
    assert not socket_path(root).exists()
    assert stop_spare(root) is None


def test_list_and_kill_show_spare(root: Path) -> None:
    pid = started(root)
    listed = run_bkdbg("list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[-1] == (
        f"a spare server (pid {pid}) waits for the next bkdbg build here: "
        "bkdbg kill --all stops it"
    )
    killed = run_bkdbg("kill", "--all")
    assert killed.returncode == 0, killed.stderr
    assert killed.stdout == f"killed the spare server (pid {pid})\n"
    assert not pid_alive(pid)


def test_invalid_setting_one_line(root: Path, tmp_path: Path) -> None:
    result = run_bkdbg("build", str(tmp_path), env=dict(os.environ, **{SPARE_ENV: "1d"}))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"bkdbg: error: invalid {SPARE_ENV} value: '1d': use off, or a duration such as "
        "10m or 1h"
    ]


def test_bad_input_keeps_a_spare(root: Path, tmp_path: Path) -> None:
    # the claimed spare serves a client that then fails: a new spare replaces it
    first = started(root)
    missing = tmp_path / "missing"
    result = run_bkdbg("build", "--invoke", "sh", str(missing))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"bkdbg: error: build context not found: {missing}: give an existing directory"
    ]
    wait_gone(first)
    wait_serving(root, other_than=first)
    assert [p.name for p in root.iterdir() if p.is_dir()] == []


def test_exits_when_socket_removed(root: Path) -> None:
    pid = started(root)
    socket_path(root).unlink()
    wait_gone(pid)


def test_exits_after_wait(root: Path) -> None:
    pid = started(root, wait=1.0)
    wait_gone(pid)
    assert not socket_path(root).exists()


def test_newer_spare_replaces_older(root: Path) -> None:
    first = started(root)
    with subprocess.Popen([*BKDBG, "__spare", "--root", str(root), "--wait", "60"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True) as newer:
        second = wait_serving(root, other_than=first)
        assert second == newer.pid
        wait_gone(first)
        assert ping(root) == second
        assert stop_spare(root) == second


def test_client_with_other_code_not_served(root: Path) -> None:
    pid = started(root)
    paths = create_instance(root)
    assert claim(root, {"fingerprint": "bkdbg 0.0.0", "id": paths.instance_id}) is None
    wait_gone(pid)


# ---------------------------------------------------------------- claimed by a build


def build_env(buildkit_addr: str, **extra: str) -> dict[str, str]:
    return dict(os.environ, BUILDKIT_HOST=buildkit_addr, **extra)


@pytest.mark.slow
def test_next_build_claims_spare(root: Path, buildkit_addr: str, make_context,
                                 no_leaked_containers: None) -> None:
    context = make_context(f"FROM {TEST_IMAGE}\nARG WORD\nRUN echo $WORD > /word\n")
    argv = [*BKDBG, "--debug", "build", "--progress", "plain", "--build-arg", "WORD",
            "--invoke", "sh", context.name]

    def build(word: str) -> subprocess.CompletedProcess[str]:
        # a relative context and a build argument from the client's environment
        return subprocess.run(argv, input="cat /word\nexit 4\n", capture_output=True,
                              text=True, cwd=context.parent, timeout=BUILD_TIMEOUT,
                              env=build_env(buildkit_addr, WORD=word), check=False)

    first = build("one")
    assert (first.returncode, first.stdout) == (4, "one\n"), first.stderr
    spare_pid = wait_serving(root)

    second = build("two")
    assert (second.returncode, second.stdout) == (4, "two\n"), second.stderr
    wait_gone(spare_pid)
    logs = [path.read_text() for path in root.glob("*.log") if path.name != "spare.log"]
    claimed = [log for log in logs if f"pid={spare_pid} " in log]
    assert len(claimed) == 1, f"no kept log of server {spare_pid} among {len(logs)} logs"
    assert "the client takes over the build started for it" in claimed[0]
    assert wait_serving(root, other_than=spare_pid) != spare_pid


@pytest.mark.slow
@pytest.mark.pty
def test_claimed_spare_serves_terminal(root: Path, buildkit_addr: str, make_context,
                                       no_leaked_containers: None) -> None:
    context = make_context(f"FROM {TEST_IMAGE}\nRUN echo hello > /hello\n")
    spare_pid = started(root)
    env = pty_env()
    env.update(BUILDKIT_HOST=buildkit_addr, PROMPT_TOOLKIT_NO_CPR="1")
    with spawn_pty([*BKDBG, "build", "--invoke", "sh", str(context)], env=env) as term:
        term.expect_exact("/ # ", timeout=BUILD_TIMEOUT)
        comm = Path(f"/proc/{spare_pid}/comm").read_text().strip()
        assert comm.startswith("bkdbg-"), comm

        term.sendline("cat /hello; stty size; echo term=$TERM")
        term.expect_exact("hello\r\n")
        term.expect_exact("24 80\r\n")
        term.expect_exact("term=xterm\r\n")

        term.sendline("exit 3")
        term.expect_exact("(bkdbg)", timeout=10)
        term.sendline("exit")
        assert term.close() == 3
    wait_gone(spare_pid)

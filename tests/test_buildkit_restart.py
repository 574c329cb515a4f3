"""BuildKit restarting under a debugging session, through the real `bkdbg` command.

These tests stop and start the local engine with scripts/local-buildkit.sh, so they run
only where nothing else uses that engine: in CI, or with BKDBG_TEST_RESTART=1 (which
scripts/test.sh sets). The engine is started again in a `finally`, whatever happens.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.buildkit import running_build_containers
from tests.helpers.context import TEST_IMAGE, MakeContext
from tests.helpers.faults import (
    MONITOR_PROMPT,
    SHELL_PROMPT,
    expect_in_shell,
    spawn_bkdbg,
    stop_servers,
    to_monitor,
)

pytestmark = [pytest.mark.faults, pytest.mark.pty, pytest.mark.slow]

ENGINE_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "local-buildkit.sh"
LOCAL_ADDR = "docker://unix:///run/bkdbg-buildkit/docker.sock"
ENGINE_TIMEOUT = 120  # seconds for the script to stop or start the engine
NOTICE_TIMEOUT = 30  # seconds for bkdbg to notice that the engine went away
CONTAINER_END_TIMEOUT = 15  # seconds for a container to end once its engine stopped


@pytest.fixture
def restartable(buildkit_addr: str) -> str:
    """The address of the local engine, when this run may restart it."""
    allowed = os.environ.get("CI") == "true" or os.environ.get("BKDBG_TEST_RESTART") == "1"
    if not allowed:
        pytest.skip("restarts the local engine: set BKDBG_TEST_RESTART=1 (scripts/test.sh does)")
    if buildkit_addr != LOCAL_ADDR:
        pytest.skip(f"restarts only the engine of scripts/local-buildkit.sh, not {buildkit_addr}")
    return buildkit_addr


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    path = Path(os.environ["BKDBG_ROOT"])
    yield path
    stop_servers(path)


def _wait_gone(container_ids: set[str], timeout: float) -> set[str]:
    """Wait until none of `container_ids` runs; return those still running after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        running = {
            cid
            for cid, status in running_build_containers().items()
            if cid in container_ids and status == "running"
        }
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(0.2)


def engine(action: str) -> None:
    subprocess.run(
        [str(ENGINE_SCRIPT), action], check=True, timeout=ENGINE_TIMEOUT, capture_output=True
    )


def test_restart_idle_session(restartable: str, make_context: MakeContext, root: Path) -> None:
    context = make_context(
        f"FROM {TEST_IMAGE}\nENV PS1='{SHELL_PROMPT}'\nRUN echo hello > /hello\n"
    )
    with spawn_bkdbg("--addr", restartable, "build", "--invoke", "sh", str(context),
                     root=root) as term:
        term.expect_exact(SHELL_PROMPT, timeout=60)
        expect_in_shell(term, "echo before-restart", "before-restart")
        session_containers = set(running_build_containers())
        assert session_containers
        try:
            engine("stop")
            # the shell's container went with the engine: a notice, then the monitor
            term.expect_exact(MONITOR_PROMPT, timeout=NOTICE_TIMEOUT)
            # no release comes from a stopped engine: the container must end by itself
            assert _wait_gone(session_containers, CONTAINER_END_TIMEOUT) == set()
        finally:
            engine("start")
        assert "Traceback" not in term.output

        term.sendline("reload")
        term.expect_exact(SHELL_PROMPT, timeout=60)
        expect_in_shell(term, "cat /hello", "hello")
        to_monitor(term)
        term.sendline("exit")
        term.close()


def test_restart_during_build(restartable: str, make_context: MakeContext, root: Path) -> None:
    context = make_context(
        f"FROM {TEST_IMAGE}\nENV PS1='{SHELL_PROMPT}'\n"
        "RUN echo start-of-slow-step && sleep 20\nRUN echo done > /done\n"
    )
    with spawn_bkdbg("--addr", restartable, "build", "--progress", "plain", "--no-cache",
                     "--invoke", "sh", str(context), root=root) as term:
        term.expect_exact("start-of-slow-step", timeout=60)
        try:
            engine("stop")
            # one clear error that names the address, then the monitor for a reload
            term.expect_exact(restartable, timeout=NOTICE_TIMEOUT)
            term.expect_exact(MONITOR_PROMPT, timeout=NOTICE_TIMEOUT)
        finally:
            engine("start")
        assert "Traceback" not in term.output

        (context / "Dockerfile").write_text(
            f"FROM {TEST_IMAGE}\nENV PS1='{SHELL_PROMPT}'\nRUN echo done > /done\n"
        )
        term.sendline("reload")
        term.expect_exact(SHELL_PROMPT, timeout=60)
        expect_in_shell(term, "cat /done", "done")
        to_monitor(term)
        term.sendline("exit")
        term.close()

"""The server against the real local BuildKit: builds, containers, processes, cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bkdbg.daemon.client import AttachStream, DaemonClient, kill_instance, list_instances
from bkdbg.daemon.instances import pid_alive, wait_pid_gone
from bkdbg.daemon.main import run_in_process
from bkdbg.daemon.messages import BuildDone, Exited, Output
from bkdbg.options import BuildOptions, InvokeConfig
from tests.helpers.buildkit import leaked_containers, running_build_containers
from tests.helpers.context import TEST_IMAGE, MakeContext

pytestmark = pytest.mark.usefixtures("no_leaked_containers")

WAIT = 30.0

FAILING = f"""\
FROM {TEST_IMAGE}
ENV STEP_VAR=from-env
WORKDIR /work
RUN echo earlier > /earlier
RUN --mount=type=cache,target=/cache echo cached > /cache/note && echo partial > /partial && exit 7
"""


def shell_options(context: Path, addr: str, on: str = "always") -> BuildOptions:
    return BuildOptions(context=str(context), addr=addr,
                        invoke=InvokeConfig(entrypoint=["sh"], args=[], tty=False, on=on))


def finish(events: Iterator[object]) -> BuildDone:
    """Consume a build's events and return the BuildDone that ends them."""
    received = list(events)
    assert received, "no build events"
    done = received[-1]
    assert isinstance(done, BuildDone)
    return done


def run_in_shell(stream: AttachStream, command: str) -> str:
    """Run `command` in an attached sh and return its output."""
    marker = f"END-{time.monotonic_ns()}"
    stream.send_stdin(f"{command}; echo {marker}\n".encode())
    data = b""
    for message in stream:
        if isinstance(message, Output):
            data += message.data
            if marker.encode() in data:
                return data.decode().split(marker)[0]
        if isinstance(message, Exited):
            break
    raise AssertionError(f"shell ended before {marker}; got {data!r}")


def exec_output(client: DaemonClient, args: list[str]) -> tuple[str, int]:
    stream = client.attach(client.exec(args))
    stream.close_stdin()
    data, code = b"", None
    for message in stream:
        if isinstance(message, Output):
            data += message.data
        elif isinstance(message, Exited):
            code = message.code
    assert code is not None
    return data.decode(), code


@pytest.fixture
def client() -> Iterator[DaemonClient]:
    client = run_in_process(None)
    yield client
    client.close()


def test_build_attach_exec_rollback_reload(client: DaemonClient, buildkit_addr: str,
                                           make_context: MakeContext) -> None:
    context = make_context(f"FROM {TEST_IMAGE}\nCOPY hello /hello\n", {"hello": "v1\n"})
    done = finish(client.build(shell_options(context, buildkit_addr)))
    assert done.ok, done.error
    shell = client.attach()
    assert run_in_shell(shell, "cat /hello") == "v1\n"
    run_in_shell(shell, "echo mine > /made-in-container")

    # a failing exec must not take the shell or its changes down
    assert exec_output(client, ["sh", "-c", "echo out; exit 5"]) == ("out\n", 5)
    assert run_in_shell(shell, "cat /made-in-container") == "mine\n"

    new_id = client.rollback()
    ended = list(shell)[-1]
    assert isinstance(ended, Exited)
    assert ended.replaced_by == new_id
    shell = client.attach()
    assert "No such file" in run_in_shell(shell, "cat /made-in-container 2>&1")

    (context / "hello").write_text("v2\n")
    reloaded = finish(client.reload())
    assert reloaded.ok, reloaded.error
    assert reloaded.process_id not in ("", new_id)
    shell = client.attach()
    assert run_in_shell(shell, "cat /hello") == "v2\n"
    shell.close()
    client.shutdown()


def test_failed_step_state(client: DaemonClient, buildkit_addr: str,
                           make_context: MakeContext) -> None:
    context = make_context(FAILING)
    done = finish(client.build(shell_options(context, buildkit_addr, on="error")))
    assert not done.ok
    assert done.error_kind == "BuildFailed"
    assert done.failed_step is not None
    assert done.failed_step.exit_code == 7
    assert done.process_id
    shell = client.attach()
    seen = run_in_shell(shell, "pwd; echo $STEP_VAR; cat /earlier /partial /cache/note")
    assert seen == "/work\nfrom-env\nearlier\npartial\ncached\n"

    client.rollback(init=True)
    shell = client.attach()
    assert run_in_shell(shell, "cat /earlier; ls /partial 2>&1 | grep -c 'No such'") \
        == "earlier\n1\n"
    shell.close()


def test_on_error_success_starts_nothing(client: DaemonClient, buildkit_addr: str,
                                         make_context: MakeContext) -> None:
    context = make_context(f"FROM {TEST_IMAGE}\nRUN true\n")
    before = set(running_build_containers())
    done = finish(client.build(shell_options(context, buildkit_addr, on="error")))
    assert done.ok
    assert not done.process_id
    assert not set(running_build_containers()) - before


def test_unreachable_address(client: DaemonClient, make_context: MakeContext) -> None:
    context = make_context(f"FROM {TEST_IMAGE}\n")
    done = finish(client.build(shell_options(context, "unix:///nonexistent/buildkitd.sock")))
    assert not done.ok
    assert done.error_kind == "BuildkitUnreachable"
    assert "/nonexistent/buildkitd.sock" in done.error


# ---------------------------------------------------------------- detached servers


@pytest.fixture
def root() -> Path:
    return Path(os.environ["BKDBG_ROOT"])


def bkdbg_server_available() -> bool:
    result = subprocess.run([sys.executable, "-m", "bkdbg", "__server", "--help"],
                            capture_output=True, timeout=60, check=False)
    return result.returncode == 0


def test_detached_server_kill_leaves_nothing(root: Path, buildkit_addr: str,
                                             make_context: MakeContext) -> None:
    if not bkdbg_server_available():
        pytest.skip("python -m bkdbg __server is not wired in bkdbg/cli.py yet")
    client = DaemonClient.launch(root)
    context = make_context(f"FROM {TEST_IMAGE}\n")
    assert finish(client.build(shell_options(context, buildkit_addr))).process_id
    assert [i.state for i in list_instances(root)] == ["running"]
    client.close()
    assert kill_instance(root, client.instance_id) == "stopped"
    assert not pid_alive(client.server_pid)
    assert not client.paths.directory.exists()


def test_server_killed_releases_containers(root: Path, buildkit_addr: str,
                                           make_context: MakeContext) -> None:
    if not bkdbg_server_available():
        pytest.skip("python -m bkdbg __server is not wired in bkdbg/cli.py yet")
    before = set(running_build_containers())
    client = DaemonClient.launch(root)
    context = make_context(f"FROM {TEST_IMAGE}\n")
    assert finish(client.build(shell_options(context, buildkit_addr))).process_id
    assert set(running_build_containers()) - before
    os.kill(client.server_pid, signal.SIGKILL)
    assert wait_pid_gone(client.server_pid, None, WAIT)
    client.close(say_goodbye=False)
    # BuildKit ends the build, and its containers, when the server's connection drops
    assert leaked_containers(before, timeout=10) == {}
    assert [i.state for i in list_instances(root)] == ["stale"]

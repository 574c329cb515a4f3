"""Detached servers as separate processes: launch, handshake, list, kill, stale instances.

The servers run `python -m tests.test_daemon_support` (a server with the fake backend)
in place of `python -m bkdbg __server`, started by the real launcher.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bkdbg.daemon import client as client_module
from bkdbg.daemon import launcher
from bkdbg.daemon.client import DaemonClient, kill_instance, list_instances
from bkdbg.daemon.instances import InstancePaths, pid_alive, wait_pid_gone
from bkdbg.daemon.messages import Output
from bkdbg.errors import ServerError, ServerUnreachable, UnknownInstance, VersionMismatch
from bkdbg.options import BuildOptions, InvokeConfig
from tests.test_daemon_support import REPO_ROOT, fake_server_command

WAIT = 10.0


@pytest.fixture(autouse=True)
def fake_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "server_command", fake_server_command)
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))


@pytest.fixture
def root() -> Path:
    return Path(os.environ["BKDBG_ROOT"])


@pytest.fixture
def server(root: Path) -> Iterator[DaemonClient]:
    client = DaemonClient.launch(root)
    yield client
    if pid_alive(client.server_pid):
        os.kill(client.server_pid, signal.SIGKILL)
        wait_pid_gone(client.server_pid, None, WAIT)
    client.close(say_goodbye=False)


def build_shell(client: DaemonClient, context: Path) -> str:
    opts = BuildOptions(context=str(context), invoke=InvokeConfig(entrypoint=["sh"], args=[],
                                                                  tty=False))
    done = list(client.build(opts))[-1]
    process_id = getattr(done, "process_id", "")
    assert process_id, done
    return str(process_id)


def read_output_until(stream: object, text: bytes) -> bytes:
    data = b""
    for message in stream:  # type: ignore[attr-defined]
        if isinstance(message, Output):
            data += message.data
            if text in data:
                return data
    raise AssertionError(f"stream ended before {text!r}; got {data!r}")


def proc_stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rpartition(")")[2].split()


# ---------------------------------------------------------------- launch


def test_launch_runs_detached(server: DaemonClient) -> None:
    pid = server.server_pid
    assert pid != os.getpid()
    assert os.getsid(pid) == pid, "the server is not in its own session"
    fields = proc_stat(pid)
    assert fields[4] == "0", "the server has a controlling terminal"  # tty_nr
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/1") == str(server.paths.log_file)


def test_launch_modes_under_open_umask(root: Path) -> None:
    old = os.umask(0)
    try:
        client = DaemonClient.launch(root)
    finally:
        os.umask(old)
    try:
        paths = client.paths
        assert stat.S_IMODE(paths.directory.stat().st_mode) == 0o700
        assert stat.S_IMODE(paths.socket.stat().st_mode) == 0o600
        assert stat.S_IMODE(paths.rpc_socket.stat().st_mode) == 0o600
        assert stat.S_IMODE(paths.log_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(paths.pid_file.stat().st_mode) == 0o600
        assert stat.S_ISSOCK(paths.socket.stat().st_mode)
    finally:
        client.shutdown()
        client.close()


def test_handshake(server: DaemonClient) -> None:
    assert server.client_id.startswith("c")
    assert server.server_version == client_module.client_version()
    info = server.info()
    assert info.pid == server.server_pid
    assert info.instance_id == server.instance_id
    assert int(server.paths.pid_file.read_text()) == server.server_pid


def test_version_mismatch_names_both(server: DaemonClient,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "client_version", lambda: "0.0.0-test")
    with pytest.raises(VersionMismatch) as caught:
        DaemonClient.connect(server.root, server.instance_id)
    message = str(caught.value)
    assert "0.0.0-test" in message
    assert server.server_version in message
    assert f"bkdbg kill {server.instance_id}" in message


def test_launch_child_dies(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crashing(paths: InstancePaths, debug: bool, idle: float | None, fd: int) -> list[str]:
        return [sys.executable, "-c", "import sys; print('exploded on start'); sys.exit(3)"]

    monkeypatch.setattr(launcher, "server_command", crashing)
    started = time.monotonic()
    with pytest.raises(ServerError) as caught:
        DaemonClient.launch(root)
    message = str(caught.value)
    assert time.monotonic() - started < 5
    assert "exited with status 3" in message
    assert "exploded on start" in message
    logs = list(root.glob("*.log"))
    assert len(logs) == 1
    assert str(logs[0]) in message
    assert "exploded on start" in logs[0].read_text()
    assert [p for p in root.iterdir() if p.is_dir()] == []


def test_launch_child_hangs(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def hanging(paths: InstancePaths, debug: bool, idle: float | None, fd: int) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(60)"]

    monkeypatch.setattr(launcher, "server_command", hanging)
    with pytest.raises(ServerError, match="did not start within 1 s"):
        DaemonClient.launch(root, timeout=1)
    assert [p.suffix for p in root.iterdir()] == [".log"]


def test_debug_keeps_log(root: Path) -> None:
    client = DaemonClient.launch(root, debug=True)
    client.shutdown()
    client.close()
    kept = root / f"{client.instance_id}.log"
    assert "stopped" in kept.read_text()
    assert not client.paths.directory.exists()
    assert list_instances(root) == []


def test_connect_unknown_id(root: Path) -> None:
    with pytest.raises(UnknownInstance, match="ffffffff"):
        DaemonClient.connect(root, "ffffffff")


def test_idle_timeout_flag(root: Path) -> None:
    client = DaemonClient.launch(root, idle_timeout=0.5)
    client.close()
    assert wait_pid_gone(client.server_pid, client.instance_id, WAIT)
    assert not client.paths.directory.exists()


# ---------------------------------------------------------------- list, kill, stale


def test_list_shows_running(server: DaemonClient) -> None:
    infos = list_instances(server.root)
    assert [(i.instance_id, i.state) for i in infos] == [(server.instance_id, "running")]
    assert infos[0].status is not None
    assert infos[0].pid == server.server_pid


def test_killed_server_pruned_once(server: DaemonClient) -> None:
    os.kill(server.server_pid, signal.SIGKILL)
    assert wait_pid_gone(server.server_pid, None, WAIT)
    first = list_instances(server.root)
    assert [(i.instance_id, i.state) for i in first] == [(server.instance_id, "stale")]
    assert not server.paths.directory.exists()
    assert list_instances(server.root) == []


def test_connect_to_dead_server(server: DaemonClient) -> None:
    os.kill(server.server_pid, signal.SIGKILL)
    assert wait_pid_gone(server.server_pid, None, WAIT)
    with pytest.raises(ServerUnreachable, match="is not running"):
        DaemonClient.connect(server.root, server.instance_id)


def test_kill_leaves_nothing(server: DaemonClient, tmp_path: Path) -> None:
    build_shell(server, tmp_path)
    shell_pids = child_pids(server.server_pid)
    assert shell_pids
    assert kill_instance(server.root, server.instance_id) == "stopped"
    assert not pid_alive(server.server_pid)
    assert not server.paths.directory.exists()
    assert not any(pid_alive(pid) for pid in shell_pids)


def test_kill_stale(server: DaemonClient) -> None:
    os.kill(server.server_pid, signal.SIGKILL)
    assert wait_pid_gone(server.server_pid, None, WAIT)
    assert kill_instance(server.root, server.instance_id) == "stale"
    assert not server.paths.directory.exists()


def test_kill_unresponsive(server: DaemonClient) -> None:
    os.kill(server.server_pid, signal.SIGSTOP)
    infos = list_instances(server.root)
    assert [i.state for i in infos] == ["unresponsive"]
    assert kill_instance(server.root, server.instance_id) == "stopped"
    assert not pid_alive(server.server_pid)


def test_kill_unknown(root: Path) -> None:
    with pytest.raises(UnknownInstance):
        kill_instance(root, "0badc0de")


def test_sigterm_cleans_up(server: DaemonClient, tmp_path: Path) -> None:
    build_shell(server, tmp_path)
    shell_pids = child_pids(server.server_pid)
    os.kill(server.server_pid, signal.SIGTERM)
    assert wait_pid_gone(server.server_pid, None, WAIT)
    assert not server.paths.socket.exists()
    assert not server.paths.directory.exists()
    assert not any(pid_alive(pid) for pid in shell_pids)


def child_pids(pid: int) -> list[int]:
    # each thread lists the children it forked; a thread may end while this reads
    pids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            pids += [int(child) for child in (task / "children").read_text().split()]
    return pids


# ---------------------------------------------------------------- clients that die


CLIENT_SCRIPT = textwrap.dedent("""
    import sys, time
    from bkdbg.daemon.client import DaemonClient
    client = DaemonClient.connect(sys.argv[1], sys.argv[2])
    stream = client.attach()
    stream.send_stdin(b"echo before-crash > crash-file; echo ready\\n")
    for message in stream:
        if b"ready" in getattr(message, "data", b""):
            print("attached", flush=True)
            break
    time.sleep(60)
""")


def test_client_killed_leaves_server(server: DaemonClient, tmp_path: Path) -> None:
    build_shell(server, tmp_path)
    crashing = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, str(server.root), server.instance_id],
        stdout=subprocess.PIPE, text=True,
    )
    assert crashing.stdout is not None
    assert crashing.stdout.readline().strip() == "attached"
    crashing.kill()
    crashing.wait()
    crashing.stdout.close()
    time.sleep(0.3)
    assert [i.state for i in list_instances(server.root)] == ["running"]
    stream = server.attach()
    stream.send_stdin(b"cat crash-file\n")
    assert b"before-crash" in read_output_until(stream, b"before-crash")
    stream.close()


def test_attached_client_sees_server_death(server: DaemonClient, tmp_path: Path) -> None:
    build_shell(server, tmp_path)
    stream = server.attach()
    os.kill(server.server_pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(ServerUnreachable):
        for _ in stream:
            pass
    assert time.monotonic() - started < 2

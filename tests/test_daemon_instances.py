"""Tests for instance directories: root resolution, modes under any umask, path checks."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bkdbg.daemon import rootdir
from bkdbg.daemon.instances import (
    MAX_SOCKET_PATH,
    InstancePaths,
    check_socket_paths,
    create_instance,
    ensure_root,
    is_instance_id,
    list_instances,
    new_instance_id,
    pid_alive,
    read_record,
    resolve_root,
    wait_pid_gone,
    write_meta,
    write_pid,
)
from bkdbg.errors import UsageError


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_root_explicit_wins(tmp_path: Path) -> None:
    assert resolve_root(tmp_path / "r", {"BKDBG_ROOT": "/elsewhere"}) == tmp_path / "r"


def test_root_from_environment() -> None:
    assert resolve_root(None, {"BKDBG_ROOT": "/x/y"}) == Path("/x/y")


def test_root_default_runtime_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    # conftest points XDG_RUNTIME_DIR at a fresh 0700 dir owned by us
    runtime = Path(os.environ["XDG_RUNTIME_DIR"])
    assert resolve_root(None, {}) == runtime / "bkdbg"


def test_root_default_data_dir_without_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/nonexistent/run")
    monkeypatch.setattr(rootdir, "_usable_runtime_dir", lambda: None)
    home = Path(os.environ["XDG_DATA_HOME"])
    assert resolve_root(None, {}) == home / "bkdbg"


def test_root_unusable_runtime_dir_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    root = resolve_root(None, {})
    # platformdirs' own fallback (a temp or /run/user dir) counts only when it exists
    assert root == Path(os.environ["XDG_DATA_HOME"]) / "bkdbg" or root.parent.is_dir()


def test_instance_id_format() -> None:
    ids = {new_instance_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(is_instance_id(i) for i in ids)
    assert not is_instance_id("../etc00")


def test_instance_modes_under_open_umask(tmp_path: Path, open_umask: None) -> None:
    paths = create_instance(tmp_path / "root")
    assert mode(tmp_path / "root") == 0o700
    assert mode(paths.directory) == 0o700
    assert mode(paths.log_file) == 0o600
    write_pid(paths, 123)
    write_meta(paths, "/ctx", 1.5, "9.9")
    assert mode(paths.pid_file) == 0o600
    assert mode(paths.meta_file) == 0o600


def test_instance_meta_round_trip(tmp_path: Path) -> None:
    paths = create_instance(tmp_path)
    write_pid(paths, 4242)
    write_meta(paths, "/ctx", 1.5, "9.9")
    record = read_record(paths)
    assert record.pid == 4242
    assert record.meta == {"context": "/ctx", "started": 1.5, "version": "9.9",
                           "in_process": False}


def test_root_not_writable_names_flag(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(UsageError) as caught:
        ensure_root(not_a_dir)
    message = str(caught.value)
    assert str(not_a_dir) in message
    assert "--root" in message


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a check as another user")
def test_root_not_writable_for_other_user(tmp_path: Path) -> None:
    # root bypasses permission bits, so the check runs in a child as the user nobody
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)
    tmp_path.chmod(0o755)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from bkdbg.daemon.instances import ensure_root\n"
        "from bkdbg.errors import UsageError\n"
        "try:\n"
        f"    ensure_root(Path({str(locked)!r}))\n"
        "except UsageError as exc:\n"
        "    print(exc); sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
         code],
        capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert result.returncode == 0, result.stderr
    assert "not writable" in result.stdout
    assert "--root" in result.stdout


def test_socket_path_too_long(tmp_path: Path) -> None:
    long_root = tmp_path / ("x" * (MAX_SOCKET_PATH - len(str(tmp_path))))
    with pytest.raises(UsageError) as caught:
        check_socket_paths(InstancePaths(long_root, "abcdef12"))
    message = str(caught.value)
    assert "sock" in message
    assert "shorter --root" in message


def test_socket_path_too_long_creates_nothing(tmp_path: Path) -> None:
    long_root = tmp_path / ("y" * 120)
    with pytest.raises(UsageError):
        create_instance(long_root)
    assert not any(long_root.iterdir())


def test_socket_path_at_limit_is_fine(tmp_path: Path) -> None:
    base = Path("/tmp")
    room = MAX_SOCKET_PATH - len("/abcdef12/sock") - len(str(base)) - 1
    check_socket_paths(InstancePaths(base / ("z" * room), "abcdef12"))


def test_list_instances_skips_other_entries(tmp_path: Path) -> None:
    first = create_instance(tmp_path)
    (tmp_path / "not-an-id").mkdir()
    (tmp_path / "deadbeef").write_text("a file, not a directory")
    assert [r.instance_id for r in list_instances(tmp_path)] == [first.instance_id]


def test_list_instances_missing_root(tmp_path: Path) -> None:
    assert list_instances(tmp_path / "missing") == []


def test_pid_alive_self_and_dead() -> None:
    assert pid_alive(os.getpid())
    child = subprocess.Popen(["true"])
    child.wait()
    assert not pid_alive(child.pid)
    assert not pid_alive(None)


def test_pid_alive_zombie_counts_as_dead() -> None:
    child = subprocess.Popen(["true"])
    # not reaped yet: a zombie
    assert wait_pid_gone(child.pid, None, 5)
    child.wait()


def test_pid_alive_accepts_process_name() -> None:
    # a server forked from its client keeps the client's command line and names itself
    script = "open('/proc/self/comm', 'w').write('bkdbg-abcdef12'); print(flush=True); " \
        "import time; time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        child.stdout.readline()
        assert pid_alive(child.pid, "abcdef12")
        assert not pid_alive(child.pid, "12345678")
    finally:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()


def test_pid_alive_checks_instance_id() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "abcdef12"])
    try:
        # right after fork the child still shows the parent's command line until it execs
        deadline = time.monotonic() + 5
        cmdline = Path(f"/proc/{child.pid}/cmdline")
        while b"abcdef12" not in cmdline.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pid_alive(child.pid, "abcdef12")
        assert not pid_alive(child.pid, "12345678")
    finally:
        child.kill()
        child.wait()


def test_meta_json_is_json(tmp_path: Path) -> None:
    paths = create_instance(tmp_path)
    write_meta(paths, "ctx", 2.0, "1")
    assert json.loads(paths.meta_file.read_text())["context"] == "ctx"

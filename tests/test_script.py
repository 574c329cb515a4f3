"""`bkdbg run-script`: in process against a fake client, and end to end against servers
that run the fake backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bkdbg.daemon import client as client_module
from bkdbg.daemon.messages import Exited, Output
from bkdbg.errors import UsageError
from bkdbg.shell.attach import LocalIO
from bkdbg.shell.script import read_script, run_script
from bkdbg.shell.workspace import Workspace
from tests.helpers.fake_client import FakeClient, FakeDaemon
from tests.test_cli import fake_bkdbg, instances


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> FakeDaemon:
    fake = FakeDaemon()
    monkeypatch.setattr(client_module, "list_instances", fake.list_instances)
    monkeypatch.setattr(client_module, "kill_instance", fake.kill_instance)
    monkeypatch.setattr(client_module.DaemonClient, "connect", fake.connect)
    return fake


@pytest.fixture
def context(tmp_path: Path) -> Path:
    directory = tmp_path / "ctx"
    directory.mkdir()
    (directory / "Dockerfile").write_text("FROM scratch\n")
    (directory / "hello").write_text("hello from the context\n")
    return directory


@pytest.fixture
def ws(tmp_path: Path, daemon: FakeDaemon) -> Workspace:
    read_fd, write_fd = os.pipe()
    os.close(write_fd)
    clients = iter(FakeClient(f"0c{n:06x}") for n in range(100))
    return Workspace(
        root=tmp_path / "root",
        local=LocalIO(stdin=read_fd, stdout=1, stderr=2),
        launcher=lambda: daemon.add(next(clients)),
    )


def write_script(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "monitor.txt"
    path.write_text(text)
    return path


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if ".txt:" in line]


# ---------------------------------------------------------------- reading


def test_read_script_skips_comments_and_blanks(tmp_path):
    path = write_script(tmp_path, "# setup\n\nbuild ./ctx\n   # indented comment\n  ps  \n")
    assert [(line.number, line.text) for line in read_script(str(path))] == [
        (3, "build ./ctx"),
        (5, "ps"),
    ]


def test_read_script_missing(tmp_path):
    with pytest.raises(UsageError, match="cannot read script: .*: No such file or directory"):
        read_script(str(tmp_path / "missing"))


# ---------------------------------------------------------------- in process


def test_all_lines_succeed(ws, tmp_path, context, capfd):
    path = write_script(tmp_path, f"build --invoke sh {context}\n# look\nexec cat /hello\nps\n")
    assert run_script(ws, str(path)) == 0
    out, err = capfd.readouterr()
    assert "out" in out.splitlines()
    assert error_lines(err) == []


def test_stops_at_first_failure(ws, tmp_path, context, capfd):
    path = write_script(
        tmp_path,
        f"build --invoke sh {context}\n\n# the next line fails\nexec false\nexec echo later\n",
    )
    launch = ws.launcher

    def launch_with_outputs() -> FakeClient:
        client = launch()
        client.outputs["p3"] = [Exited(1)]
        client.outputs["p4"] = [Output(1, b"later\n"), Exited(0)]
        return client

    ws.launcher = launch_with_outputs
    assert run_script(ws, str(path)) == 1
    out, err = capfd.readouterr()
    assert error_lines(err) == [f"{path}:4: exec: process p3 (false) exited with status 1"]
    assert "later" not in out


def test_unclosed_quote_stops_script(ws, tmp_path, context, capfd):
    path = write_script(
        tmp_path, f'build --invoke sh {context}\nexec sh -c "echo unclosed\nexec cat /hello\n'
    )

    assert run_script(ws, str(path)) == 1

    out, err = capfd.readouterr()
    assert error_lines(err) == [
        f"{path}:2: exec: invalid line: no closing quotation: close the quote"
    ]
    assert "Invalid syntax" not in err
    assert "out" not in out.splitlines()  # the line after it did not run


def test_keep_going_runs_every_line(ws, tmp_path, context, capfd):
    path = write_script(tmp_path, f"build {context}\nfrobnicate\nrollback --bogus\nps\n")
    assert run_script(ws, str(path), keep_going=True) == 1
    out, err = capfd.readouterr()
    assert error_lines(err) == [
        f"{path}:2: frobnicate: unknown command: type help to list the commands",
        f"{path}:3: rollback: unrecognized arguments: --bogus",
    ]
    assert "ID  CURRENT  COMMAND" in out


def test_started_server_ends_with_script(ws, tmp_path, context, capfd):
    path = write_script(tmp_path, f"build {context}\nps\n")
    run_script(ws, str(path))
    client = next(iter(ws_clients(ws)))
    assert ("goodbye", True) in client.calls


def test_detach_keeps_started_server(ws, tmp_path, context, capfd):
    path = write_script(tmp_path, f"build {context}\ndetach\n")
    assert run_script(ws, str(path)) == 0
    client = next(iter(ws_clients(ws)))
    assert ("goodbye", False) in client.calls
    assert ("goodbye", True) not in client.calls
    assert "bkdbg attach 0c000000" in capfd.readouterr().out


def test_attach_to_existing_server(ws, daemon, tmp_path, capfd):
    existing = daemon.add(FakeClient())
    path = write_script(tmp_path, "exec cat /hello\n")
    assert run_script(ws, str(path), attach_id=existing.instance_id) == 0
    assert ("goodbye", False) in existing.calls
    assert ("goodbye", True) not in existing.calls


def ws_clients(ws: Workspace) -> list[FakeClient]:
    daemon_connect = client_module.DaemonClient.connect
    return [daemon_connect(ws.root, instance_id) for instance_id in ws.launched]


# ---------------------------------------------------------------- end to end


def test_example_script_prints_file_twice(context, tmp_path, root_dir):
    hello = context / "hello"
    path = write_script(
        tmp_path,
        f"build --invoke sh {context}\nexec cat {hello}\nreload\nexec cat {hello}\nkill\n",
    )
    result = fake_bkdbg("run-script", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("hello from the context\n") == 2
    assert instances(root_dir) == []


def test_failing_line_named_end_to_end(context, tmp_path, root_dir):
    path = write_script(
        tmp_path, f"build --invoke sh {context}\n\nexec sh -c 'exit 3'\nexec echo later\n"
    )
    result = fake_bkdbg("run-script", str(path))
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        f"{path}:3: exec: process p2 (sh -c 'exit 3') exited with status 3"
    ]
    assert "later" not in result.stdout
    assert instances(root_dir) == []


def test_script_detach_then_attach(context, tmp_path, root_dir):
    first = write_script(tmp_path, f"build --invoke sh {context}\ndetach\n")
    result = fake_bkdbg("run-script", str(first))
    assert result.returncode == 0, result.stderr
    (instance_id,) = instances(root_dir)
    second = tmp_path / "second.txt"
    second.write_text("exec echo again\nkill\n")
    result = fake_bkdbg("run-script", "--attach", instance_id, str(second))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["again", f"killed server {instance_id}"]
    assert instances(root_dir) == []


@pytest.fixture
def root_dir() -> Path:
    return Path(os.environ["BKDBG_ROOT"])


def test_bad_arguments_one_line(ws, tmp_path, capfd):
    path = write_script(tmp_path, "exec --user\n")
    assert run_script(ws, str(path)) == 1
    out, err = capfd.readouterr()
    assert err.splitlines() == [f"{path}:1: exec: argument --user: expected one argument"]
    assert out == ""

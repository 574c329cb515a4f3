"""Monitor commands and completion, in process, against a fake server client."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from bkdbg.daemon import client as client_module
from bkdbg.daemon.messages import BuildDone, Exited, Output, ProcessInfo, ServerEvent
from bkdbg.errors import FailedStep
from bkdbg.shell.attach import LocalIO
from bkdbg.shell.monitor import Monitor
from bkdbg.shell.workspace import Current, Workspace
from tests.helpers.fake_client import INSTANCE_ID, FakeClient, FakeDaemon, progress

OTHER_ID = "0b1b2c3d"


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> FakeDaemon:
    fake = FakeDaemon()
    monkeypatch.setattr(client_module, "list_instances", fake.list_instances)
    monkeypatch.setattr(client_module, "kill_instance", fake.kill_instance)
    monkeypatch.setattr(client_module.DaemonClient, "connect", fake.connect)
    return fake


@pytest.fixture
def local() -> Iterator[LocalIO]:
    """Local I/O that is not a terminal: stdin is an empty pipe, output goes to fds 1 and 2."""
    read_fd, write_fd = os.pipe()
    os.close(write_fd)
    yield LocalIO(stdin=read_fd, stdout=1, stderr=2)
    os.close(read_fd)


@pytest.fixture
def client(daemon: FakeDaemon) -> FakeClient:
    return daemon.add(FakeClient())


@pytest.fixture
def ws(tmp_path: Path, daemon: FakeDaemon, client: FakeClient, local: LocalIO) -> Workspace:
    launched = iter(f"0c{n:06x}" for n in range(100))
    workspace = Workspace(
        root=tmp_path / "root", local=local, launcher=lambda: daemon.add(FakeClient(next(launched)))
    )
    workspace.current = Current(client, process_id="p1")  # type: ignore[arg-type]
    return workspace


def make_app(ws: Workspace, batch: bool = False, tmp_path: Path | None = None) -> Monitor:
    history = tmp_path / "history" if tmp_path else None
    return Monitor(ws, batch=batch, history=history)


@pytest.fixture
def app(ws: Workspace, tmp_path: Path) -> Iterator[Monitor]:
    monitor = make_app(ws, tmp_path=tmp_path)
    yield monitor
    monitor.close()


@pytest.fixture
def batch_app(ws: Workspace) -> Iterator[Monitor]:
    monitor = make_app(ws, batch=True)
    yield monitor
    monitor.close()


def run_cmd(
    app: Monitor, line: str, capfd: pytest.CaptureFixture[str]
) -> tuple[list[str], list[str]]:
    """Run one command line; return its stdout and stderr lines."""
    # pytest swaps sys.stdout per test phase, so cmd2 gets the one of the call phase
    app.stdout = sys.stdout
    capfd.readouterr()
    app.onecmd_plus_hooks(line)
    app.stdout.flush()
    out, err = capfd.readouterr()
    return out.splitlines(), err.splitlines()


# ---------------------------------------------------------------- help and errors


def test_help_lists_commands(app, capfd):
    out, _ = run_cmd(app, "help", capfd)
    text = "\n".join(out)
    for command in (
        "build",
        "reload",
        "rollback",
        "exec",
        "ps",
        "attach",
        "list",
        "kill",
        "disconnect",
        "detach",
        "exit",
        "history",
        "help",
    ):
        assert command in text
    for hidden in ("shell", "edit", "run_pyscript", "quit", "alias", "macro", "set", "shortcuts"):
        assert f" {hidden} " not in f" {text} "
    assert "Cmd2" not in text


def test_unknown_command_names_it(app, capfd):
    _, err = run_cmd(app, "frobnicate now", capfd)
    assert err[0] == "frobnicate: unknown command: type help to list the commands"
    assert app.failed


def test_bad_arguments_line(app, capfd):
    out, err = run_cmd(app, "exec --user", capfd)
    assert err == ["exec: argument --user: expected one argument"]
    assert out == []
    assert app.failed


def test_help_flag_is_no_failure(app, capfd):
    out, _ = run_cmd(app, "exec --help", capfd)
    assert any("--env" in line for line in out)
    assert not app.failed


def test_command_without_server(app, ws, capfd):
    ws.current = None
    _, err = run_cmd(app, "ps", capfd)
    assert err == ["ps: no current server: start one with build, or switch with attach ID"]


# ---------------------------------------------------------------- processes


def test_ps_table(app, client, capfd):
    out, _ = run_cmd(app, "ps", capfd)
    assert out[0].split() == ["ID", "CURRENT", "COMMAND", "STATE", "STATUS"]
    assert out[1].split() == ["p1", "*", "sh", "running", "-"]


def test_exec_in_script_prints_output(batch_app, client, capfd):
    client.outputs["p3"] = [Output(1, b"hello\n"), Output(2, b"warn\n"), Exited(0)]
    out, err = run_cmd(batch_app, "exec cat /hello", capfd)
    assert out == ["hello"]
    assert err == ["warn"]
    assert not batch_app.failed
    assert client.streams[-1].stdin_closed


def test_exec_nonzero_status_fails(batch_app, client, capfd):
    client.outputs["p3"] = [Exited(3)]
    _, err = run_cmd(batch_app, "exec false", capfd)
    assert err == ["exec: process p3 (false) exited with status 3"]
    assert batch_app.failed


def test_exec_passes_options_and_args(batch_app, client, capfd):
    run_cmd(batch_app, "exec --env A=1 --user nobody --cwd /tmp ls -l /", capfd)
    assert ("exec", ["ls", "-l", "/"], ["A=1"], "nobody", "/tmp", False) in client.calls


def test_exec_bad_env(batch_app, capfd):
    _, err = run_cmd(batch_app, "exec --env =1 ls", capfd)
    assert err == ["exec: invalid --env value: '=1': expected KEY=VALUE"]


def test_exec_missing_command(batch_app, capfd):
    _, err = run_cmd(batch_app, "exec", capfd)
    assert err == ["exec: missing CMD: give the program to run, e.g. exec ls -l /"]


def test_rollback_init(batch_app, client, ws, capfd):
    out, _ = run_cmd(batch_app, "rollback --init", capfd)
    assert ("rollback", True) in client.calls
    assert out == ["started process p3"]
    assert ws.current.process_id == "p3"


def test_rollback_announces_replaced_process(batch_app, client, ws, capfd):
    client.processes.append(ProcessInfo("p2", ["sleep", "9"], "running"))
    client.processes.append(ProcessInfo("p0", ["true"], "exited"))
    _, err = run_cmd(batch_app, "rollback", capfd)
    assert err == [
        "Process p1 was replaced by p3 (rollback)",
        "Process p2 (sleep 9) was ended by rollback",
    ]
    # the server's exit events of the processes that rollback ended are not shown again
    assert ws.expected.take("process-exited", "p1")
    assert ws.expected.take("process-exited", "p2")
    assert not ws.expected.take("process-exited", "p0")


def test_reload_announces_replaced_process(batch_app, client, ws, capfd):
    _, err = run_cmd(batch_app, "reload", capfd)
    assert "Process p1 was replaced by p2 (reload)" in err
    assert ws.expected.take("process-exited", "p1")


def test_attach_in_script_needs_terminal(batch_app, capfd):
    _, err = run_cmd(batch_app, "attach p1", capfd)
    assert err == ["attach: a process needs a terminal to attach to: use exec in scripts"]


def test_attach_switches_server(batch_app, daemon, ws, client, capfd):
    daemon.add(FakeClient(OTHER_ID))
    out, _ = run_cmd(batch_app, f"attach {OTHER_ID}", capfd)
    assert out == [f"switched to server {OTHER_ID}"]
    assert ws.current.instance_id == OTHER_ID
    assert ("goodbye", False) in client.calls


def test_attach_unknown_id(batch_app, ws, capfd):
    _, err = run_cmd(batch_app, "attach deadbeef", capfd)
    assert err == [f"attach: no bkdbg server with id deadbeef: {ws.root}: run bkdbg list"]


# ---------------------------------------------------------------- builds


def test_reload_restarts_process(batch_app, client, ws, capfd):
    out, err = run_cmd(batch_app, "reload", capfd)
    assert ("reload",) in client.calls
    assert ws.current.process_id == "p2"
    assert out == ["started process p2"]
    assert any("RUN true" in line for line in err)


def test_reload_failure_fails(batch_app, client, capfd):
    client.reload_events = [progress(), BuildDone(ok=False, error="failed to solve: boom")]
    _, err = run_cmd(batch_app, "reload", capfd)
    assert err[-1] == "reload: failed to solve: boom"
    assert batch_app.failed


def test_reload_into_failed_state_is_no_failure(batch_app, client, capfd):
    step = FailedStep(
        message="exit 7",
        exit_code=7,
        filename="Dockerfile",
        line=3,
        source_lines=["   3 | >>> RUN exit 7"],
        command=["/bin/sh", "-c", "exit 7"],
        is_exec=True,
    )
    client.reload_events = [
        BuildDone(
            ok=False, error="exit 7", error_kind="BuildFailed", failed_step=step, process_id="p9"
        ),
    ]
    out, err = run_cmd(batch_app, "reload", capfd)
    assert not batch_app.failed
    assert err[0] == "exit 7"  # the error opens the block, as the session goes on
    assert "command: /bin/sh -c 'exit 7'" not in err  # the hint shows the command
    assert "Dockerfile:3" in err
    assert "   3 | >>> RUN exit 7" in err
    assert "exit code: 7" in err
    assert "Run the command again: /bin/sh -c 'exit 7'" in err
    assert out == ["started process p9"]


def test_build_starts_new_server(batch_app, ws, client, tmp_path, capfd):
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM scratch\n")
    run_cmd(batch_app, f"build --invoke sh --build-arg A=1 {context}", capfd)
    assert ws.current.instance_id == "0c000000"
    assert ws.launched == ["0c000000"]
    options = ws.current.client.calls[0][1]
    assert options.context == str(context)
    assert options.build_args == {"A": "1"}
    assert options.invoke.entrypoint == ["sh"]
    assert ("goodbye", False) in client.calls


def test_build_bad_value(batch_app, tmp_path, capfd):
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    _, err = run_cmd(batch_app, f"build --build-arg =x {tmp_path}", capfd)
    assert err == ["build: invalid --build-arg value: '=x': expected KEY=VALUE"]


def test_build_missing_context(batch_app, tmp_path, capfd):
    _, err = run_cmd(batch_app, f"build {tmp_path}/nope", capfd)
    assert err == [f"build: build context not found: {tmp_path}/nope: give an existing directory"]


# ---------------------------------------------------------------- servers


def test_list_marks_current(app, daemon, capfd):
    daemon.add(FakeClient(OTHER_ID))
    out, _ = run_cmd(app, "list", capfd)
    assert out[0].split() == ["ID", "PID", "STARTED", "BUILD", "CLIENTS", "CURRENT"]
    rows = {line.split()[0]: line for line in out[1:]}
    assert rows[INSTANCE_ID].rstrip().endswith("*")
    assert not rows[OTHER_ID].rstrip().endswith("*")


def test_list_marks_newest_without_current(app, ws, daemon, capfd):
    daemon.add(FakeClient(OTHER_ID))
    ws.current = None
    out, _ = run_cmd(app, "list", capfd)
    rows = {line.split()[0]: line for line in out[1:]}
    assert not rows[INSTANCE_ID].rstrip().endswith("*")
    assert rows[OTHER_ID].rstrip().endswith("*")


def test_kill_current(app, ws, daemon, capfd):
    out, _ = run_cmd(app, "kill", capfd)
    assert out == [f"killed server {INSTANCE_ID}"]
    assert daemon.killed == [INSTANCE_ID]
    assert ws.current is None


def test_kill_unknown(app, ws, capfd):
    _, err = run_cmd(app, "kill deadbeef", capfd)
    assert err == [f"kill: no bkdbg server with id deadbeef: {ws.root}: run bkdbg list"]


def test_disconnect_current(app, client, capfd):
    out, _ = run_cmd(app, "disconnect", capfd)
    assert out == [f"disconnected 2 clients from server {INSTANCE_ID}"]
    assert ("disconnect", "") in client.calls


def test_disconnect_other(app, daemon, capfd):
    other = daemon.add(FakeClient(OTHER_ID))
    run_cmd(app, f"disconnect {OTHER_ID}", capfd)
    assert ("disconnect", "") in other.calls
    assert ("goodbye", False) in other.calls


# ---------------------------------------------------------------- leaving


def test_detach_keeps_server(app, client, ws, capfd):
    out, _ = run_cmd(app, "detach", capfd)
    assert out == [
        f"detached from server {INSTANCE_ID}; it keeps running: bkdbg attach {INSTANCE_ID}"
    ]
    assert ("goodbye", False) in client.calls
    assert ws.current is None
    assert app.exit_code == 0


def test_exit_returns_last_status(app, client, ws, capfd):
    ws.current.last_exit = 3
    assert app.onecmd_plus_hooks("exit") is True
    assert app.exit_code == 3
    assert ("goodbye", True) in client.calls


def test_exit_after_reload_ignores_old_status(app, client, ws, capfd):
    ws.current.last_exit = 3
    run_cmd(app, "reload", capfd)
    assert ws.current.process_id == "p2"
    assert app.onecmd_plus_hooks("exit") is True
    assert app.exit_code == 0


def test_end_of_input_detaches(app, client, capfd):
    assert app.onecmd_plus_hooks("_eof") is True
    assert ("goodbye", False) in client.calls


# ---------------------------------------------------------------- completion


def completions(app: Monitor, line: str) -> list[str]:
    text = line.rsplit(" ", 1)[-1]
    begidx = len(line) - len(text)
    return list(app.complete(text, line, begidx, len(line)).to_strings())


def test_complete_command_name(app):
    assert completions(app, "rel") == ["reload"]
    assert completions(app, "ro") == ["rollback"]


def test_complete_attach_ids_from_cache(app, daemon, client):
    daemon.add(FakeClient(OTHER_ID))
    app.cache.refresh()
    calls_before = len(client.calls)
    assert completions(app, "attach ") == [INSTANCE_ID, OTHER_ID, "p1"]
    assert completions(app, "attach p") == ["p1"]
    # completing makes no call to the server
    assert len(client.calls) == calls_before


def test_complete_server_ids(app, daemon):
    daemon.add(FakeClient(OTHER_ID))
    app.cache.refresh()
    assert completions(app, "kill 0b") == [OTHER_ID]
    assert completions(app, "disconnect ") == [INSTANCE_ID, OTHER_ID]


def test_complete_cache_error(app, monkeypatch):
    from bkdbg.errors import ServerUnreachable

    def broken(root=None):
        raise ServerUnreachable("bkdbg server x is not running")

    monkeypatch.setattr(client_module, "list_instances", broken)
    app.cache.refresh()
    result = app.complete("", "kill ", 5, 5)
    assert not result
    assert "cannot list servers: bkdbg server x is not running" in result.error


def test_complete_build_path(app, tmp_path, monkeypatch):
    (tmp_path / "context-dir").mkdir()
    monkeypatch.chdir(tmp_path)
    assert completions(app, "build --no-cache cont") == ["context-dir/"]


def test_complete_exec_flags(app):
    assert "--env" in completions(app, "exec --e")


def test_complete_after_command_offers_no_flags(app):
    assert completions(app, "reload ") == []
    assert completions(app, "rollback ") == []
    assert "--init" in completions(app, "rollback -")


# ---------------------------------------------------------------- events and history


def test_server_events_become_alerts(app, ws, monkeypatch):
    alerts: list[str] = []
    monkeypatch.setattr(app, "add_alert", lambda msg=None, **_: alerts.append(msg))
    app._idle.set()
    ws.expected.add("process-exited", "p1")
    app._show_event(ServerEvent("process-exited", "process p1 exited with status 0", "p1"))
    app._show_event(ServerEvent("process-exited", "process p7 exited with status 1", "p7"))
    app._show_event(ServerEvent("build-finished", "", ""))
    assert alerts == ["process p7 exited with status 1", "server event: build-finished"]


def test_exit_event_in_client_format(app, ws, client, monkeypatch):
    alerts: list[str] = []
    monkeypatch.setattr(app, "add_alert", lambda msg=None, **_: alerts.append(msg))
    app._idle.set()
    client.processes[0] = ProcessInfo("p1", ["sh"], "exited", exit_code=137, current=True)
    client.processes.append(ProcessInfo("p4", ["sleep", "9"], "exited", exit_code=1))
    app._show_event(ServerEvent("process-exited", "process p1 exited with status 137", "p1"))
    app._show_event(ServerEvent("process-exited", "process p4 exited with status 1", "p4"))
    assert alerts == [
        "Process p1 (sh) exited with status 137; type reload, rollback, exec or exit",
        "Process p4 (sleep 9) exited with status 1",
    ]


def test_disconnected_event_ends_prompt(app, ws, monkeypatch):
    alerts: list[str] = []
    left: list[tuple[str, int]] = []
    monkeypatch.setattr(app, "add_alert", lambda msg=None, **_: alerts.append(msg))
    monkeypatch.setattr(app, "_leave_prompt", lambda line, status: left.append((line, status)))
    app._idle.set()

    app._show_event(ServerEvent("disconnected", "disconnected by client c2", ""))

    assert alerts == []
    assert left == [
        (
            "disconnected by another bkdbg client (bkdbg disconnect); "
            f"bkdbg attach {INSTANCE_ID} reattaches",
            0,
        )
    ]


def test_escape_keys_bound_at_prompt(app):
    bindings = app.main_session.key_bindings
    for key, command in (("c", "attach"), ("d", "detach")):
        (binding,) = bindings.get_bindings_for_keys(("c-a", key))
        event = SimpleNamespace(current_buffer=SimpleNamespace(text="", handled=False))
        event.current_buffer.validate_and_handle = lambda buffer=event.current_buffer: setattr(
            buffer, "handled", True
        )
        binding.handler(event)
        assert event.current_buffer.text == command
        assert event.current_buffer.handled


def test_events_stream_follows_current_server(app, ws, daemon, client):
    app._on_switch(ws.current)
    assert len(client.event_streams) == 1
    other = daemon.add(FakeClient(OTHER_ID))
    ws.connect(OTHER_ID)
    assert len(other.event_streams) == 1
    assert app._watcher is not None


def test_history_survives_restart(ws, tmp_path, capfd):
    first = make_app(ws, tmp_path=tmp_path)
    first.onecmd_plus_hooks("ps")
    first.close()
    second = make_app(ws, tmp_path=tmp_path)
    try:
        assert [item.raw for item in second.history] == ["ps"]
    finally:
        second.close()

"""The command line: one-line errors with exit codes, and the client flows against servers
that run the fake backend (`tests.test_daemon_support`) instead of BuildKit.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from bkdbg import cli, commands
from bkdbg.daemon import launcher
from bkdbg.errors import ServerError
from tests.test_daemon_support import REPO_ROOT, fake_server_command

TIMEOUT = 30

# runs bkdbg's CLI with servers that use the fake backend
FAKE_BKDBG = textwrap.dedent(
    """
    import sys
    import bkdbg.daemon.launcher as launcher
    from tests.test_daemon_support import fake_server_command
    launcher.server_command = fake_server_command
    from bkdbg.cli import main
    sys.exit(main())
    """
)


@pytest.fixture
def root() -> Path:
    return Path(os.environ["BKDBG_ROOT"])


@pytest.fixture
def context(tmp_path: Path) -> Path:
    directory = tmp_path / "ctx"
    directory.mkdir()
    (directory / "Dockerfile").write_text("FROM scratch\n")
    return directory


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Run cli.main in this process; return its exit status and stderr lines."""
    status = cli.main(argv)
    return status, capsys.readouterr().err.splitlines()


def fake_bkdbg(
    *args: str, stdin: str = "", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run bkdbg in a subprocess whose servers use the fake backend."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-c", FAKE_BKDBG, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        cwd=cwd,
    )


# ---------------------------------------------------------------- bad input: one line, exit 1


def test_missing_context(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert run_main(["build", str(missing)], capsys) == (
        1,
        [f"bkdbg: error: build context not found: {missing}: give an existing directory"],
    )


def test_context_is_a_file(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert run_main(["build", str(a_file)], capsys) == (
        1,
        [
            f"bkdbg: error: build context is not a directory: {a_file}: give the directory "
            "that contains the Dockerfile"
        ],
    )


def test_missing_dockerfile(tmp_path, capsys):
    assert run_main(["build", str(tmp_path)], capsys) == (
        1,
        [
            f"bkdbg: error: Dockerfile not found: {tmp_path / 'Dockerfile'}: create it or "
            "pass -f PATH"
        ],
    )


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--build-arg", "=x"], "invalid --build-arg value: '=x': expected KEY=VALUE"),
        (["--label", "novalue"], "invalid --label value: 'novalue': expected KEY=VALUE"),
        (
            ["--output", "type=zip,dest=x"],
            "invalid --output value: 'type=zip,dest=x': type must be one of local, tar, image, "
            "docker, oci, registry",
        ),
        (
            ["--invoke", "entrypoint=sh,bogus=1"],
            "invalid --invoke value: 'entrypoint=sh,bogus=1': unknown field 'bogus=1'; use "
            "entrypoint, args, cmd, env, user, cwd, tty",
        ),
        (
            ["--invoke", "args=sh,env=FOO"],
            "invalid --invoke value: 'args=sh,env=FOO': env needs KEY=VALUE",
        ),
        (["--invoke", "args="], "invalid --invoke value: 'args=': give a command"),
        (
            ["--secret", "id=a,env=BKDBG_UNSET_VAR"],
            "secret environment variable not set: BKDBG_UNSET_VAR: export it or use src=PATH",
        ),
        (
            ["--platform", "amd64"],
            "invalid --platform value: 'amd64': expected OS/ARCH[/VARIANT], e.g. linux/amd64",
        ),
        (
            ["--progress", "fancy"],
            "invalid --progress value: 'fancy': use one of auto, tty, plain, rawjson, quiet",
        ),
        (
            ["--network", "bridge"],
            "invalid --network value: 'bridge': use one of default, none, host",
        ),
        (
            ["--invoke", "sh", "--on", "sometimes"],
            "invalid --on value: 'sometimes': use one of always, error",
        ),
        (["--on", "error"], "invalid --on value: 'error': --on needs --invoke CMD"),
        (["--detach=maybe"], "invalid --detach value: 'maybe': use one of true, false"),
        (
            ["--server-idle-timeout", "10x"],
            "invalid --server-idle-timeout value: '10x': use a number with a unit s, m or h, "
            "e.g. 30s or 10m",
        ),
        (
            ["--addr", "foo://x"],
            "unsupported BuildKit address: 'foo://x': use unix:///PATH, tcp://HOST:PORT, "
            "docker://[unix:///PATH], docker-container://NAME",
        ),
        (
            ["--addr", "tcp://h:1", "--tlscacert", "/missing/ca.pem"],
            "TLS file not found: --tlscacert /missing/ca.pem: check the paths of these options",
        ),
    ],
    ids=lambda value: value[0] if isinstance(value, list) else "",
)
def test_bad_build_values(context, capsys, root, flags, line):
    assert run_main(["build", *flags, str(context)], capsys) == (1, [f"bkdbg: error: {line}"])
    # nothing started: no instance directory
    assert not root.exists() or not any(root.iterdir())


def test_missing_secret_file(context, tmp_path, capsys):
    missing = tmp_path / "token"
    status, err = run_main(["build", "--secret", f"id=t,src={missing}", str(context)], capsys)
    assert (status, err) == (
        1,
        [f"bkdbg: error: secret file not found: {missing}: check --secret 'id=t,src={missing}'"],
    )


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["build", "--bogus", "."], "usage: bkdbg build "),
        (["info", "extra"], "usage: bkdbg info "),
    ],
)
def test_unknown_argument_shows_command_usage(argv, usage, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)

    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith(usage)
    assert f"bkdbg {argv[0]}: error: unrecognized arguments: {argv[1]}" in err


def test_detach_flag_takes_no_next_word(context, capsys):
    status, err = run_main(["build", "--detach", str(context), "--build-arg", "=x"], capsys)
    assert (status, err) == (
        1,
        ["bkdbg: error: invalid --build-arg value: '=x': expected KEY=VALUE"],
    )


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["build"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "bkdbg build: error: the following arguments are required: CONTEXT"
    )


def test_root_is_a_file(tmp_path, capsys):
    a_file = tmp_path / "root-file"
    a_file.write_text("")
    assert run_main(["--root", str(a_file), "list"], capsys) == (
        1,
        [
            f"bkdbg: error: bkdbg root is not a directory: {a_file}: choose another with --root "
            "or BKDBG_ROOT"
        ],
    )


def test_socket_path_too_long(context, tmp_path, capsys):
    long_root = tmp_path / ("x" * 110)
    status, err = run_main(["build", "--root", str(long_root), str(context)], capsys)
    assert status == 1
    assert len(err) == 1
    assert err[0].startswith("bkdbg: error: socket path too long for a unix socket (")
    assert err[0].endswith(f"choose a shorter --root, e.g. --root /tmp/bkdbg-{os.getuid()}")


# ---------------------------------------------------------------- servers that are not there


def test_list_without_servers(capsys):
    assert cli.main(["list"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "no bkdbg server is running: bkdbg build --invoke sh CONTEXT starts one"
    ]


def test_attach_unknown_id(root, capsys):
    assert run_main(["attach", "deadbeef"], capsys) == (
        1,
        [f"bkdbg: error: no bkdbg server with id deadbeef: {root}: run bkdbg list"],
    )


def test_attach_without_servers(root, capsys):
    assert run_main(["attach"], capsys) == (
        1,
        [
            f"bkdbg: error: no bkdbg server is running under {root}: bkdbg list shows the "
            "running servers"
        ],
    )


def test_kill_unknown_id(root, capsys):
    assert run_main(["kill", "deadbeef"], capsys) == (
        1,
        [f"bkdbg: error: no bkdbg server with id deadbeef: {root}: run bkdbg list"],
    )


def test_kill_without_servers(root, capsys):
    assert run_main(["kill"], capsys) == (
        1,
        [f"bkdbg: error: no bkdbg server is running under {root}: nothing to kill"],
    )


def test_run_script_missing(tmp_path, capsys):
    missing = tmp_path / "monitor.txt"
    assert run_main(["run-script", str(missing)], capsys) == (
        1,
        [f"bkdbg: error: cannot read script: {missing}: No such file or directory: check the path"],
    )


def test_run_script_directory(tmp_path, capsys):
    assert run_main(["run-script", str(tmp_path)], capsys) == (
        1,
        [f"bkdbg: error: cannot read script: {tmp_path}: Is a directory: check the path"],
    )


# ---------------------------------------------------------------- error handling


def test_debug_shows_traceback(capsys, root):
    status, err = run_main(["--debug", "attach", "deadbeef"], capsys)
    assert status == 1
    assert err[0] == "Traceback (most recent call last):"
    assert err[-1] == f"bkdbg: error: no bkdbg server with id deadbeef: {root}: run bkdbg list"


def test_deferred_interrupt_raised_on_resume():
    deferred = cli.DeferredInterrupt()
    signal.raise_signal(signal.SIGINT)  # held back: no KeyboardInterrupt here

    assert deferred.received
    with pytest.raises(KeyboardInterrupt):
        deferred.resume()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_deferred_interrupt_quiet_without_ctrl_c():
    deferred = cli.DeferredInterrupt()

    deferred.resume()

    assert not deferred.received
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_exits_130(monkeypatch, capsys):
    def interrupted(args, ws):
        raise KeyboardInterrupt

    monkeypatch.setitem(commands.HANDLERS, "list", interrupted)
    assert cli.main(["list"]) == 130


def test_bug_is_not_hidden(monkeypatch):
    def broken(args, ws):
        raise RuntimeError("a bug")

    monkeypatch.setitem(commands.HANDLERS, "list", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["list"])


def test_server_command_hidden(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "__server" not in capsys.readouterr().out


def test_logs_never_reach_the_terminal(capsys, root):
    run_main(["--debug", "attach", "deadbeef"], capsys)
    logging.getLogger("bkdbg.test").warning("a log record")
    assert "a log record" not in capsys.readouterr().err


# ---------------------------------------------------------------- flows with fake servers


@pytest.fixture
def fake_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "server_command", fake_server_command)
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))


def instances(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_pipes_print_output_and_exit_status(context, root):
    result = fake_bkdbg("build", "--invoke", "sh", str(context), stdin="echo hello\nexit 4\n")
    assert result.stdout == "hello\n"
    assert result.returncode == 4
    assert "Traceback" not in result.stderr
    assert instances(root) == []


def test_pipes_signal_status(context, root):
    result = fake_bkdbg("build", "--invoke", "sh", str(context), stdin="kill -TERM $$\n")
    assert result.returncode == 128 + 15


def test_build_without_invoke_ends_session(context, root):
    result = fake_bkdbg("build", "--progress", "plain", str(context))
    assert result.returncode == 0
    assert "#1 DONE" in result.stderr
    assert instances(root) == []


def test_failed_build_exits_1(context, root):
    (context / "fail").write_text('process "/bin/sh -c exit 7" did not complete successfully')
    result = fake_bkdbg("build", str(context))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        'bkdbg: error: process "/bin/sh -c exit 7" did not complete successfully'
    )
    assert instances(root) == []


def test_on_error_with_successful_build_starts_nothing(context, root):
    result = fake_bkdbg("build", "--invoke", "sh", "--on", "error", str(context), stdin="exit 9\n")
    assert result.returncode == 0
    assert instances(root) == []


def test_on_error_shell_in_failed_state(context, root):
    (context / "fail").write_text("exit code: 7")
    result = fake_bkdbg(
        "build",
        "--invoke",
        "sh",
        "--on",
        "error",
        str(context),
        stdin="echo state=$BKDBG_STATE\nexit 2\n",
    )
    assert result.stdout == "state=failed\n"
    assert result.returncode == 2
    # the session goes on into the shell, so the error opens the block without the prefix
    assert "exit code: 7" in result.stderr.splitlines()
    assert "bkdbg: error:" not in result.stderr


def test_missing_command_one_line(context, root):
    result = fake_bkdbg("build", "--invoke", "no-such-command", str(context))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("bkdbg: error:")]
    assert len(errors) == 1
    assert "no-such-command" in errors[0]
    assert instances(root) == []


@pytest.mark.parametrize("flag", [["--detach=false"], ["--detach", "false"]])
def test_detach_false_runs_server_in_process(flag, context, root, monkeypatch, capsys):
    from bkdbg.daemon import main as daemon_main
    from tests.test_daemon_support import FakeBackend

    monkeypatch.setattr(daemon_main, "default_backend", FakeBackend)
    status, _ = run_main(["build", *flag, "--progress", "quiet", str(context)], capsys)
    assert status == 0
    assert instances(root) == []


def test_list_kill_disconnect(fake_servers, context, root, capsys):
    from bkdbg.daemon.client import DaemonClient
    from bkdbg.options import BuildOptions

    server = DaemonClient.launch(root)
    list(server.build(BuildOptions(context=str(context))))
    try:
        assert cli.main(["list"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split() == ["ID", "PID", "STARTED", "BUILD", "CLIENTS", "CURRENT"]
        fields = out[1].split()
        assert fields[0] == server.instance_id
        assert fields[-1] == "*"  # no current server: the newest is marked
        assert fields[1] == str(server.server_pid)
        assert out[1].split(maxsplit=2)[2].startswith(("Less than a second ago", "1 second ago"))
        assert "built" in fields

        # the first client watches events, so the server counts it as connected
        events = server.events()
        watcher = threading.Thread(target=lambda: list(events), daemon=True)
        watcher.start()
        time.sleep(0.5)
        assert cli.main(["disconnect", server.instance_id]) == 0
        assert capsys.readouterr().out == (
            f"disconnected 1 client from server {server.instance_id}\n"
        )
        watcher.join(TIMEOUT)
        assert not watcher.is_alive()

        assert cli.main(["kill", server.instance_id]) == 0
        assert capsys.readouterr().out == f"killed server {server.instance_id}\n"
        assert instances(root) == []
    finally:
        server.close(say_goodbye=False)


def test_kill_all(fake_servers, root, capsys):
    from bkdbg.daemon.client import DaemonClient

    first, second = DaemonClient.launch(root), DaemonClient.launch(root)
    for client in (first, second):
        client.close()
    assert cli.main(["kill", "--all"]) == 0
    assert sorted(capsys.readouterr().out.splitlines()) == sorted(
        [f"killed server {first.instance_id}", f"killed server {second.instance_id}"]
    )
    assert instances(root) == []


def test_unreachable_server_named(fake_servers, root, capsys):
    from bkdbg.daemon.client import DaemonClient

    server = DaemonClient.launch(root)
    server.close()
    os.kill(server.server_pid, 9)
    from bkdbg.daemon.instances import wait_pid_gone

    wait_pid_gone(server.server_pid, None, 10)
    status, err = run_main(["attach", server.instance_id], capsys)
    assert status == 1
    assert len(err) == 1
    assert err[0].startswith(f"bkdbg: error: bkdbg server {server.instance_id} is not running")
    assert cli.main(["list"]) == 0
    assert (
        capsys.readouterr()
        .out.splitlines()[-1]
        .startswith(f"removed server {server.instance_id}: its process {server.server_pid} is gone")
    )
    assert instances(root) == []
    assert ServerError  # the error class the message comes from

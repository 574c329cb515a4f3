"""Bad input through the real `bkdbg` command: one error line that names the value and the
fix, a non-zero exit status, no traceback, and no server or build container left behind.

Each case gives the value the line must name and a pattern for the fix that must follow
it, because a message of the form `<what failed>: <value>: <what to do>` is the contract
(see bkdbg/errors.py). Two cases cannot be made the obvious way by a root user, who
ignores file modes: an unreadable script is a directory path, and a root that is not
writable is a path under a regular file (/etc/passwd/x).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.context import TEST_IMAGE, MakeContext
from tests.helpers.faults import (
    assert_no_servers,
    describe,
    error_line,
    instance_ids,
    only_instance,
    only_stderr_line,
    pid_running,
    run_bkdbg,
    server_pid,
    stop_servers,
    wait_for,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]

DOCKERFILE = f"FROM {TEST_IMAGE} AS base\nRUN echo built > /built\n"


@pytest.fixture
def root() -> Iterator[Path]:
    """The BKDBG_ROOT of this test. Servers that a failed test left are stopped afterwards."""
    path = Path(os.environ["BKDBG_ROOT"])
    yield path
    stop_servers(path)


@pytest.fixture
def context(make_context: MakeContext) -> Path:
    return make_context(DOCKERFILE)


@dataclass(frozen=True)
class Case:
    """A bad command line, the value its error line must name and the fix that must follow."""

    args: Callable[[Path, Path], list[str]]  # (context, tmp_path) -> bkdbg arguments
    value: Callable[[Path, Path], str]
    fix: str  # regular expression searched in the text after the value


def check_error(result: subprocess.CompletedProcess[str], value: str, fix: str) -> str:
    """Check the one error line of `result` names `value` and then a fix matching `fix`."""
    line = error_line(result)
    assert value in line, f"the error line does not name {value!r}: {line}"
    after = line.split(value, 1)[1]
    assert re.search(fix, after), f"no fix matching {fix!r} after {value!r}: {line}"
    return line


def closed_tcp_port() -> int:
    """Return a local TCP port that nothing listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- checked before BuildKit


def _build(*flags: str) -> Callable[[Path, Path], list[str]]:
    return lambda context, _tmp: ["build", "--progress", "quiet", *flags, str(context)]


def _same(text: str) -> Callable[[Path, Path], str]:
    return lambda _context, _tmp: text


LOCAL_CASES = {
    "missing-context": Case(
        lambda _c, tmp: ["build", str(tmp / "missing")],
        lambda _c, tmp: str(tmp / "missing"),
        r"(give|create|check).*director",
    ),
    "context-is-a-file": Case(
        lambda c, _tmp: ["build", str(c / "Dockerfile")],
        lambda c, _tmp: str(c / "Dockerfile"),
        r"directory",
    ),
    "missing-dockerfile": Case(
        lambda _c, tmp: ["build", str(tmp)],
        lambda _c, tmp: str(tmp / "Dockerfile"),
        r"-f |--file|create",
    ),
    "build-arg-no-key": Case(_build("--build-arg", "=x"), _same("'=x'"), r"KEY=VALUE"),
    "build-arg-unset-name": Case(
        _build("--build-arg", "BKDBG_TEST_UNSET_ARG"),
        _same("BKDBG_TEST_UNSET_ARG"),
        r"KEY=VALUE|export|give",
    ),
    "secret-unknown-key": Case(
        _build("--secret", "foo=bar"), _same("'foo=bar'"), r"id=ID,src=PATH"
    ),
    "secret-not-key-value": Case(
        _build("--secret", "id=tok,env"), _same("'id=tok,env'"), r"key=value|id=ID"
    ),
    "secret-env-not-set": Case(
        _build("--secret", "id=tok,env=BKDBG_TEST_UNSET_SECRET"),
        _same("BKDBG_TEST_UNSET_SECRET"),
        r"export|src=PATH",
    ),
    "output-unknown-type": Case(
        _build("--output", "type=nosuch"), _same("'type=nosuch'"), r"local, tar"
    ),
    "output-no-dest": Case(_build("--output", "type=local"), _same("'type=local'"), r"dest="),
    "output-not-key-value": Case(
        _build("--output", "type=tar,dest"), _same("'type=tar,dest'"), r"key=value"
    ),
    "invoke-unknown-field": Case(
        _build("--invoke", "entrypoint=sh,bogus=1"),
        _same("'entrypoint=sh,bogus=1'"),
        r"use entrypoint",
    ),
    "invoke-bad-tty": Case(
        _build("--invoke", "entrypoint=sh,tty=maybe"),
        _same("'entrypoint=sh,tty=maybe'"),
        r"true or false",
    ),
    "invoke-unclosed-quote": Case(
        _build("--invoke", 'sh -c "echo'),
        _same("'sh -c \"echo'"),
        r"\b(close|add|quote the)\b",
    ),
    "unknown-address-scheme": Case(
        lambda c, _tmp: ["--addr", "foo://bar", "build", str(c)],
        _same("'foo://bar'"),
        r"unix:///PATH",
    ),
    "tls-ca-missing": Case(
        lambda c, tmp: [
            "--addr",
            "tcp://127.0.0.1:1234",
            "--tlscacert",
            str(tmp / "ca.pem"),
            "build",
            str(c),
        ],
        lambda _c, tmp: str(tmp / "ca.pem"),
        r"check|give|pass",
    ),
    "tls-key-missing": Case(
        lambda c, tmp: [
            "--addr",
            "tcp://127.0.0.1:1234",
            "--tlscert",
            str(tmp / "cert.pem"),
            "--tlskey",
            str(tmp / "key.pem"),
            "build",
            str(c),
        ],
        lambda _c, tmp: str(tmp / "cert.pem"),
        r"check|give|pass",
    ),
    "unreachable-unix-socket": Case(
        lambda c, tmp: ["--addr", f"unix://{tmp}/buildkitd.sock", "build", str(c)],
        lambda _c, tmp: f"unix://{tmp}/buildkitd.sock",
        r"start buildkitd|--addr",
    ),
    "attach-unknown-id": Case(
        lambda _c, _tmp: ["attach", "deadbeef"], _same("deadbeef"), r"bkdbg list"
    ),
    "kill-unknown-id": Case(
        lambda _c, _tmp: ["kill", "deadbeef"], _same("deadbeef"), r"bkdbg list"
    ),
    "disconnect-unknown-id": Case(
        lambda _c, _tmp: ["disconnect", "deadbeef"], _same("deadbeef"), r"bkdbg list"
    ),
    "root-under-a-file": Case(
        # root may write anywhere, but no one can create a directory under a regular file
        lambda c, _tmp: ["--root", "/etc/passwd/x", "build", str(c)],
        _same("/etc/passwd/x"),
        r"--root",
    ),
    "socket-path-too-long": Case(
        lambda c, _tmp: ["--root", "/tmp/" + "r" * 115, "build", str(c)],
        _same("/tmp/" + "r" * 115),
        r"shorter --root",
    ),
}


@pytest.mark.parametrize("case", LOCAL_CASES.values(), ids=LOCAL_CASES.keys())
def test_bad_input_one_line(case: Case, context: Path, tmp_path: Path, root: Path) -> None:
    result = run_bkdbg(*case.args(context, tmp_path))

    check_error(result, case.value(context, tmp_path), case.fix)
    assert_no_servers(root)
    long_root = Path("/tmp/" + "r" * 115)
    if long_root.exists():
        assert instance_ids(long_root) == []
        long_root.rmdir()


def test_unreachable_tcp_port(context: Path, root: Path) -> None:
    address = f"tcp://127.0.0.1:{closed_tcp_port()}"
    result = run_bkdbg("--addr", address, "build", str(context), timeout=30)
    check_error(result, address, r"start buildkitd|--addr")
    assert_no_servers(root)


# ---------------------------------------------------------------- reported by BuildKit


@pytest.fixture
def engine(buildkit_addr: str, no_leaked_containers: None) -> str:
    """Return the local BuildKit's address. The test fails if it leaves a build container."""
    return buildkit_addr


def test_dockerfile_syntax_error(engine: str, make_context: MakeContext, root: Path) -> None:
    context = make_context(f"FROM {TEST_IMAGE}\nRUNX echo broken\n")
    result = run_bkdbg("--addr", engine, "build", "--progress", "quiet", str(context))
    line = check_error(result, "Dockerfile:2", r"fix|check|edit")
    assert "RUNX" in line


def test_unknown_target(engine: str, context: Path, root: Path) -> None:
    result = run_bkdbg(
        "--addr", engine, "build", "--progress", "quiet", "--target", "nosuch", str(context)
    )
    check_error(result, "nosuch", r"base")
    assert_no_servers(root)


def test_invoke_command_not_in_image(engine: str, context: Path, root: Path) -> None:
    result = run_bkdbg(
        "--addr", engine, "build", "--progress", "quiet", "--invoke", "no-such-cmd", str(context)
    )
    check_error(result, "no-such-cmd", r"image|PATH|install|--invoke")
    assert_no_servers(root)


# ---------------------------------------------------------------- servers that died


def start_detached_server(engine: str, context: Path, tmp_path: Path, root: Path) -> str:
    """Start a server with a shell through `bkdbg run-script`, and return its id.

    The script ends with `detach`, so the server keeps running.
    """
    script = tmp_path / "start.txt"
    script.write_text(f"build --progress quiet --invoke sh {context}\ndetach\n")
    result = run_bkdbg("--addr", engine, "run-script", str(script))
    assert result.returncode == 0, describe(result)
    return only_instance(root)


@pytest.mark.parametrize("verb", ["attach", "kill"])
def test_dead_server_id(verb: str, engine: str, context: Path, tmp_path: Path, root: Path) -> None:
    instance_id = start_detached_server(engine, context, tmp_path, root)
    pid = server_pid(root, instance_id)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_running(pid), 5, f"server {pid} to die")

    result = run_bkdbg(verb, instance_id)

    check_error(result, instance_id, r"bkdbg list|remove|gone|not running")
    line = error_line(result)
    assert "not running" in line or "gone" in line, line
    # the next list reports the dead server once and removes it
    run_bkdbg("list")
    assert_no_servers(root)


# ---------------------------------------------------------------- run-script


def script_error(result: subprocess.CompletedProcess[str], script: Path, line: int) -> str:
    """Check that the failed script printed one stderr line, starting with FILE:LINE:."""
    assert result.returncode != 0, describe(result)
    assert "Traceback" not in result.stderr + result.stdout, describe(result)
    text = only_stderr_line(result)
    prefix = f"{script}:{line}: "
    assert text.removeprefix("bkdbg: error: ").startswith(prefix), describe(result)
    return text


def test_script_missing(tmp_path: Path, root: Path) -> None:
    missing = tmp_path / "missing.txt"
    check_error(run_bkdbg("run-script", str(missing)), str(missing), r"check|give|create")
    assert_no_servers(root)


def test_script_unreadable(tmp_path: Path, root: Path) -> None:
    # root reads any file whatever its mode, so a directory is used as an unreadable file
    directory = tmp_path / "script.d"
    directory.mkdir()
    check_error(run_bkdbg("run-script", str(directory)), str(directory), r"check|give|file")
    assert_no_servers(root)


def test_script_unknown_command(tmp_path: Path, root: Path) -> None:
    script = tmp_path / "monitor.txt"
    script.write_text("# a comment\n\nfrobnicate now\nps\n")
    line = script_error(run_bkdbg("run-script", str(script)), script, 3)
    assert "frobnicate" in line
    assert "help" in line
    assert_no_servers(root)


@pytest.mark.parametrize(
    ("command", "named"),
    [("build --no-such-flag .", "--no-such-flag"), ("exec", "exec"), ("attach a b c", "attach")],
    ids=["build-unknown-flag", "exec-without-command", "attach-extra-words"],
)
def test_script_bad_arguments(command: str, named: str, tmp_path: Path, root: Path) -> None:
    script = tmp_path / "monitor.txt"
    script.write_text(f"# a comment\n{command}\n")
    line = script_error(run_bkdbg("run-script", str(script)), script, 2)
    assert named in line
    assert_no_servers(root)

"""Security of a real detached server, started through the `bkdbg` command: file modes
under a permissive umask, connections from another uid, and secrets kept out of output,
logs and error messages.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.context import TEST_IMAGE, MakeContext
from tests.helpers.faults import (
    assert_no_servers,
    describe,
    only_instance,
    run_bkdbg,
    server_log,
    server_pid,
    stop_servers,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

OTHER_UID = 65534  # the uid of nobody, but switching to a uid needs no passwd entry
CONNECT_TIMEOUT = 5.0
# the HTTP/2 client connection preface (RFC 9113, section 3.4) that a gRPC client sends first
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SECRET_ENV = "SECRET_TOKEN"


@pytest.fixture
def root(no_leaked_containers: None) -> Iterator[Path]:
    """The BKDBG_ROOT of this test. Servers that a failed test left are stopped afterwards."""
    path = Path(os.environ["BKDBG_ROOT"])
    yield path
    stop_servers(path)


@pytest.fixture
def context(make_context: MakeContext) -> Path:
    return make_context(f"FROM {TEST_IMAGE}\nRUN echo built > /built\n")


def start_server(
    addr: str, context: Path, tmp_path: Path, *flags: str, umask: int | None = None
) -> None:
    """Start a server with a shell through `bkdbg run-script` and leave it running."""
    script = tmp_path / f"start-{time.monotonic_ns()}.txt"
    script.write_text(f"build --progress quiet --invoke sh {context}\ndetach\n")
    result = run_bkdbg("--addr", addr, *flags, "run-script", str(script), umask=umask)
    assert result.returncode == 0, describe(result)


def mode(path: Path) -> str:
    return oct(stat.S_IMODE(path.lstat().st_mode))


# ---------------------------------------------------------------- modes


def test_modes_under_open_umask(buildkit_addr, context, tmp_path):
    # bkdbg creates this root itself, so its mode comes from bkdbg too. It is in /tmp
    # because a socket path must stay under 108 bytes.
    root = Path(f"/tmp/bkdbg-umask-{os.getpid()}-{time.monotonic_ns()}")
    try:
        start_server(buildkit_addr, context, tmp_path, "--root", str(root), umask=0)
        instance = root / only_instance(root)
        pid = server_pid(root, instance.name)

        assert not stat.S_IMODE(root.stat().st_mode) & 0o022, f"root {root} is {mode(root)}"
        assert mode(instance) == "0o700"
        assert stat.S_ISSOCK((instance / "sock").lstat().st_mode)
        assert mode(instance / "sock") == "0o600"
        for path in sorted(instance.iterdir()):
            assert not path.lstat().st_mode & 0o077, f"{path} is {mode(path)}"
        client_log = Path(os.environ["XDG_STATE_HOME"]) / "bkdbg" / "client.log"
        if client_log.exists():
            assert not client_log.stat().st_mode & 0o077, f"{client_log} is {mode(client_log)}"

        result = run_bkdbg("--root", str(root), "kill", instance.name)
        assert result.returncode == 0, describe(result)
        assert_no_servers(root, [pid])
    finally:
        stop_servers(root)
        if root.exists():
            for path in root.iterdir():
                path.rmdir()
            root.rmdir()


# ---------------------------------------------------------------- other users


def closed_without_answer(sock: socket.socket) -> bool:
    """Send the HTTP/2 preface and return whether the server closed the connection unanswered."""
    try:
        sock.sendall(H2_PREFACE)
        return sock.recv(4096) == b""
    except (BrokenPipeError, ConnectionResetError):
        return True


def in_child_as_other_uid(path: Path, keep_file_access: bool) -> int:
    """Connect to the socket `path` from a forked child whose effective uid is OTHER_UID.

    Returns the child's exit code: 0 if the server closed the connection without a
    response, 1 if it sent one, 2 if file permissions denied the connect, 3 otherwise.

    With `keep_file_access`, the child keeps the real and saved uid 0 and sets its
    filesystem uid back to 0 (setfsuid), so that it passes the 0700 directory and 0600
    socket while the kernel still records the effective uid OTHER_UID as its peer
    credential (SO_PEERCRED reports the euid at connect time). This reaches the server's
    own uid check, which the file modes otherwise hide. Without it the child drops every
    uid, as a real other user would be.
    """
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)
    code = 3
    try:
        os.setgroups([])
        os.setresgid(OTHER_UID, OTHER_UID, OTHER_UID)
        if keep_file_access:
            os.setresuid(0, OTHER_UID, 0)
            ctypes.CDLL(None, use_errno=True).setfsuid(0)
        else:
            os.setresuid(OTHER_UID, OTHER_UID, OTHER_UID)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CONNECT_TIMEOUT)
            try:
                sock.connect(str(path))
            except PermissionError:
                code = 2
            else:
                code = 0 if closed_without_answer(sock) else 1
    finally:
        os._exit(code)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_other_uid_rejected(buildkit_addr, context, root, tmp_path):
    start_server(buildkit_addr, context, tmp_path)
    instance_id = only_instance(root)
    pid = server_pid(root, instance_id)
    public = root / instance_id / "sock"

    # a real other user cannot even reach the socket
    assert in_child_as_other_uid(public, keep_file_access=False) == 2
    # one that gets past the file modes is closed by the server's peer credential check
    assert in_child_as_other_uid(public, keep_file_access=True) == 0

    refusals = [
        line
        for line in server_log(root, instance_id).splitlines()
        if "reject" in line and str(OTHER_UID) in line
    ]
    assert len(refusals) == 1, server_log(root, instance_id)
    # the owner is still served
    script = tmp_path / "check.txt"
    script.write_text("exec cat /built\n")
    result = run_bkdbg("run-script", "--attach", instance_id, str(script))
    assert result.returncode == 0, describe(result)
    assert "built" in result.stdout

    assert instance_id in run_bkdbg("kill", instance_id).stdout
    assert_no_servers(root, [pid])


# ---------------------------------------------------------------- secrets


@pytest.fixture
def secret() -> str:
    return f"bkdbg-secret-{os.urandom(8).hex()}"


@pytest.fixture
def secret_env(secret: str) -> dict[str, str]:
    return dict(os.environ, **{SECRET_ENV: secret})


def secret_forms(secret: str) -> list[str]:
    """Return the secret and the encodings in which a log or JSON might carry it."""
    raw = secret.encode()
    return [secret, base64.b64encode(raw).decode(), raw.hex()]


def assert_secret_absent(secret: str, where: str, text: str) -> None:
    for form in secret_forms(secret):
        assert form not in text, f"the secret appears in {where}"


def secret_context(make_context: MakeContext, fail: bool = False) -> Path:
    """A context whose RUN step reads the secret `tok` and stores only its SHA-256."""
    nonce = time.time_ns()  # a new step each run, so the hash comes from this run's secret
    command = f"echo {nonce} && sha256sum /run/secrets/tok | cut -d' ' -f1 > /tokhash"
    if fail:
        command += " && echo failing on purpose && exit 3"
    return make_context(
        f"FROM {TEST_IMAGE}\nRUN --mount=type=secret,id=tok,required=true {command}\n"
    )


@pytest.mark.parametrize("progress", ["plain", "rawjson"])
def test_secret_not_in_progress(progress, buildkit_addr, make_context, root, secret, secret_env):
    context = secret_context(make_context)
    result = run_bkdbg(
        "--addr",
        buildkit_addr,
        "--debug",
        "build",
        "--progress",
        progress,
        "--secret",
        f"id=tok,env={SECRET_ENV}",
        "--invoke",
        "cat /tokhash",
        str(context),
        env=secret_env,
    )
    assert result.returncode == 0, describe(result)
    # the build did read the secret
    assert result.stdout.strip().endswith(hashlib.sha256(secret.encode()).hexdigest())
    assert_secret_absent(secret, "stdout", result.stdout)
    assert_secret_absent(secret, "stderr (progress)", result.stderr)
    assert_no_servers(root)


def test_secret_not_in_logs(buildkit_addr, make_context, root, tmp_path, secret, secret_env):
    context = secret_context(make_context)
    script = tmp_path / "secret.txt"
    script.write_text(
        f"build --progress plain --secret id=tok,env={SECRET_ENV} --invoke sh {context}\n"
        "exec cat /tokhash\nps\ndetach\n"
    )
    result = run_bkdbg(
        "--addr", buildkit_addr, "--debug", "run-script", str(script), env=secret_env
    )
    assert result.returncode == 0, describe(result)
    assert hashlib.sha256(secret.encode()).hexdigest() in result.stdout
    assert_secret_absent(secret, "run-script output", result.stdout + result.stderr)

    instance_id = only_instance(root)
    pid = server_pid(root, instance_id)
    # the server logs at DEBUG level here, the most it ever writes
    assert "DEBUG" in server_log(root, instance_id)
    for path in sorted((root / instance_id).iterdir()):
        if path.is_file():
            assert_secret_absent(secret, str(path), path.read_text(errors="replace"))
    state = Path(os.environ["XDG_STATE_HOME"])
    for path in sorted(state.rglob("*")):
        if path.is_file():
            assert_secret_absent(secret, str(path), path.read_text(errors="replace"))
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    assert_secret_absent(secret, "the server's command line", cmdline)

    listing = run_bkdbg("list")
    assert_secret_absent(secret, "bkdbg list", listing.stdout + listing.stderr)
    assert instance_id in run_bkdbg("kill", instance_id).stdout
    assert_no_servers(root, [pid])


def test_secret_not_in_errors(buildkit_addr, make_context, root, tmp_path, secret, secret_env):
    failing = secret_context(make_context, fail=True)
    secret_file = tmp_path / "token"
    secret_file.write_text(secret)
    runs = {
        "failed build": [
            "--addr",
            buildkit_addr,
            "--debug",
            "build",
            "--progress",
            "plain",
            "--secret",
            f"id=tok,env={SECRET_ENV}",
            str(failing),
        ],
        # the shell in the failed step's state runs `cat`, and bkdbg exits with its status 1
        "failed build with --invoke on error": [
            "--addr",
            buildkit_addr,
            "build",
            "--progress",
            "rawjson",
            "--secret",
            f"id=tok,src={secret_file}",
            "--invoke",
            "cat /nonexistent",
            "--on",
            "error",
            str(failing),
        ],
        "bad flag beside the secret": [
            "--addr",
            buildkit_addr,
            "build",
            "--secret",
            f"id=tok,env={SECRET_ENV}",
            "--build-arg",
            "=x",
            str(failing),
        ],
        "unreachable BuildKit": [
            "--addr",
            f"unix://{tmp_path}/none.sock",
            "build",
            "--secret",
            f"id=tok,env={SECRET_ENV}",
            str(failing),
        ],
    }
    for name, args in runs.items():
        result = run_bkdbg(*args, env=secret_env)
        assert result.returncode != 0, f"{name}\n{describe(result)}"
        assert "Traceback" not in result.stderr, f"{name}\n{describe(result)}"
        assert_secret_absent(secret, f"the output of the {name}", result.stdout + result.stderr)
    assert_no_servers(root)

"""The spare server: a process that has imported a server's modules and waits to become one.

A new server spends about 0.1 s starting Python and importing grpc, protobuf and bkdbg
before it can connect to BuildKit (measured on the 2-CPU VM of docs/benchmarks.md), while
buildx is a compiled program. So a server that started a first build later starts one
spare (`bkdbg __spare`) under its root. The next `bkdbg build` under that root claims the
spare through `ROOT/spare.sock` instead of forking a server, and the spare becomes that
client's server at once.

A claim is one JSON line from the client: the new instance's id, --debug, the server
idle timeout, and the client's arguments, environment, working directory, umask and
whether it runs on a terminal. The spare replies `pid N` once it accepts, then `ready`
once it serves (`serve_main` writes that line to the claim connection), or `stale` when
the client runs other bkdbg code, and exits then. A `{"ping": true}` line gets `pong`.

A spare exits after SPARE_ENV (default 10 minutes) without a claim, and as soon as its
socket is removed or replaced by a newer spare's.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from bkdbg import __version__
from bkdbg.daemon.instances import InstancePaths, open_private
from bkdbg.errors import UsageError
from bkdbg.options import parse_duration

if TYPE_CHECKING:
    from bkdbg.daemon.backend import FirstBuild

logger = logging.getLogger(__name__)

SPARE_ENV = "BKDBG_SPARE_SERVER"  # off, or how long a spare waits for a claim (e.g. 10m)
DEFAULT_WAIT = 600.0  # seconds
SOCKET_NAME = "spare.sock"
LOG_NAME = "spare.log"
CHECK_INTERVAL = 2.0  # seconds between checks that the socket is still this spare's
CLAIM_TIMEOUT = 2.0  # seconds for either side to send its line of a claim
MAX_LINE = 1 << 20
_OFF = ("off", "false", "no", "0")


def spare_wait(environ: dict[str, str] | os._Environ[str] | None = None) -> float | None:
    """Return how long a spare waits for a claim, or None when spares are off."""
    value = (os.environ if environ is None else environ).get(SPARE_ENV, "").strip()
    if value.lower() in _OFF:
        return None
    if not value:
        return DEFAULT_WAIT
    try:
        return parse_duration(value, SPARE_ENV)
    except UsageError:
        logger.warning("invalid %s value %r: spare servers are off", SPARE_ENV, value)
        return None


def code_fingerprint() -> str:
    """Return what identifies this bkdbg's code: version, interpreter, and source mtimes."""
    package = Path(__file__).resolve().parent.parent
    newest = 0
    pending = [str(package)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False) and entry.name != "__pycache__":
                    pending.append(entry.path)
                elif entry.name.endswith(".py"):
                    newest = max(newest, entry.stat().st_mtime_ns)
    return f"{__version__} {sys.executable} {package} {newest}"


def socket_path(root: Path) -> Path:
    return root / SOCKET_NAME


# ---------------------------------------------------------------- the client's side


def claim(root: Path, request: dict[str, Any]) -> tuple[socket.socket, int] | None:
    """Claim the spare under `root`; return the connection and the spare's pid, or None.

    The connection then carries the `ready` line. None when there is no spare, or it
    did not accept (the caller then starts a server itself).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CLAIM_TIMEOUT)
        sock.connect(str(socket_path(root)))
        sock.sendall(json.dumps({"claim": request}).encode() + b"\n")
        reply = _read_line(sock)
    except OSError as exc:
        logger.debug("no spare server under %s: %s", root, exc)
        sock.close()
        return None
    if not reply.startswith(b"pid "):
        logger.info("the spare server under %s did not accept: %r", root, reply)
        sock.close()
        return None
    sock.settimeout(None)
    return sock, int(reply[4:])


def ping(root: Path) -> int | None:
    """Return the pid of the spare that serves under `root`, or None."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CLAIM_TIMEOUT)
            sock.connect(str(socket_path(root)))
            sock.sendall(b'{"ping": true}\n')
            reply = _read_line(sock)
    except OSError:
        return None
    return int(reply[5:]) if reply.startswith(b"pong ") else None


def stop_spare(root: Path) -> int | None:
    """Stop the spare under `root`; return its pid, or None when there was none."""
    pid = ping(root)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return None
    return pid


def start_spare(root: Path, wait: float) -> None:
    """Start a spare under `root` unless one serves there already."""
    import subprocess

    if ping(root) is not None:
        return
    argv = [sys.executable, "-m", "bkdbg", "__spare", "--root", str(root), "--wait", f"{wait:g}"]
    with open_private(root / LOG_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   cwd="/", start_new_session=True)
    logger.info("started a spare server as pid %d", process.pid)
    # reaped here while this server lives, so it never stays a zombie meanwhile
    import threading

    threading.Thread(target=process.wait, name="reap-spare", daemon=True).start()


def _read_line(sock: socket.socket) -> bytes:
    received = b""
    while not received.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the end of the line")
        received += chunk
        if len(received) > MAX_LINE:
            raise ConnectionError("line too long")
    return received.rstrip(b"\n")


# ---------------------------------------------------------------- the spare's side


def spare_main(argv: list[str]) -> int:
    """Run a spare under --root until a client claims it (then serve) or its wait ends."""
    import argparse

    parser = argparse.ArgumentParser(prog="bkdbg __spare",
                                     description="Run a spare bkdbg server (not for direct use).")
    parser.add_argument("--root", required=True, help="bkdbg root directory")
    parser.add_argument("--wait", type=float, default=DEFAULT_WAIT, metavar="SECONDS",
                        help="exit after this many seconds without a claim")
    args = parser.parse_args(argv)
    root = Path(args.root)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s pid=%(process)d %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)

    _import_server()
    fingerprint = code_fingerprint()
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # no controlling terminal, as a server
    listener, inode = _listen(root)
    logger.info("spare server waiting on %s for %g s", socket_path(root), args.wait)
    try:
        claimed = _wait_for_claim(listener, root, inode, time.monotonic() + args.wait)
    except SystemExit:
        logger.info("spare server exits: stopped by a signal")
        return 0
    finally:
        _remove_socket(root, inode)
        listener.close()
    if claimed is None:
        logger.info("spare server exits without a claim")
        return 0

    serve_call = _take_claim(*claimed, root, fingerprint)
    if isinstance(serve_call, int):
        return serve_call
    # from here on the server logs to the instance log, which fds 1 and 2 now are too
    logging.getLogger().removeHandler(handler)
    from bkdbg.daemon.main import serve_main

    return serve_main(serve_call[0], first_build=serve_call[1])


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _wait_for_claim(listener: socket.socket, root: Path, inode: int,
                    deadline: float) -> tuple[socket.socket, dict[str, Any]] | None:
    """Answer pings until a claim arrives; return its connection and request."""
    while (conn := _next_connection(listener, root, inode, deadline)) is not None:
        request = _read_request(conn)
        if request is not None and isinstance(request.get("claim"), dict):
            return conn, request["claim"]
        pong = f"pong {os.getpid()}\n".encode()
        _answer(conn, pong if request and request.get("ping") else b"")
    return None


def _import_server() -> None:
    # what a launched server imports before its first build, and the CLI that derives it
    import bkdbg.cli  # noqa: F401
    import bkdbg.daemon.gateway_backend  # noqa: F401
    import bkdbg.daemon.main  # noqa: F401


def _listen(root: Path) -> tuple[socket.socket, int]:
    # bound under a name of its own, then renamed over any older socket in one step
    temporary = root / f".spare-{os.getpid()}.sock"
    temporary.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(temporary))
    os.chmod(temporary, 0o600)
    listener.listen(8)
    inode = os.stat(temporary).st_ino
    os.replace(temporary, socket_path(root))
    return listener, inode


def _next_connection(listener: socket.socket, root: Path, inode: int,
                     deadline: float) -> socket.socket | None:
    """Return the next connection from this uid; None once the wait ends or the socket is gone."""
    from bkdbg.daemon.peercred import peer_allowed

    while (remaining := deadline - time.monotonic()) > 0:
        if not select.select([listener], [], [], min(remaining, CHECK_INTERVAL))[0]:
            if not _owns_socket(root, inode):
                logger.info("spare server exits: %s was removed or replaced", socket_path(root))
                return None
            continue
        conn, _ = listener.accept()
        if peer_allowed(conn):
            return conn
        logger.warning("rejected a connection from another uid")
        conn.close()
    return None


def _owns_socket(root: Path, inode: int) -> bool:
    try:
        return os.stat(socket_path(root)).st_ino == inode
    except OSError:
        return False


def _remove_socket(root: Path, inode: int) -> None:
    if _owns_socket(root, inode):
        socket_path(root).unlink(missing_ok=True)


def _read_request(conn: socket.socket) -> dict[str, Any] | None:
    try:
        conn.settimeout(CLAIM_TIMEOUT)
        request = json.loads(_read_line(conn))
    except (OSError, ValueError) as exc:
        logger.warning("invalid request on the spare socket: %s", exc)
        return None
    return request if isinstance(request, dict) else None


def _answer(conn: socket.socket, line: bytes) -> None:
    try:
        if line:
            conn.sendall(line)
    except OSError as exc:
        logger.info("cannot answer on the spare socket: %s", exc)
    finally:
        conn.close()


def _take_claim(conn: socket.socket, request: dict[str, Any], root: Path,
                fingerprint: str) -> tuple[list[str], FirstBuild | None] | int:
    """Take on the claiming client's instance and environment.

    Returns the arguments of `serve_main` and the client's build, or the exit status
    of a spare that rejected the claim.
    """
    from bkdbg.cli import first_build
    from bkdbg.daemon.instances import is_instance_id
    from bkdbg.daemon.launcher import name_process, server_args

    if request.get("fingerprint") != fingerprint:
        logger.info("spare server exits: the client runs other bkdbg code")
        _answer(conn, b"stale\n")
        return 0
    try:
        if not is_instance_id(request["id"]):
            raise ValueError(f"invalid instance id {request['id']!r}")
        paths = InstancePaths(root, request["id"])
        os.environ.clear()
        os.environ.update(request["environ"])
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        build = first_build(request["argv"], bool(request["interactive"]))
        os.chdir("/")
        with open_private(paths.log_file, os.O_WRONLY | os.O_APPEND) as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        name_process(f"bkdbg-{paths.instance_id}")
        conn.sendall(f"pid {os.getpid()}\n".encode())
    except (OSError, KeyError, TypeError, ValueError) as exc:
        logger.warning("claim failed: %s", exc)
        _answer(conn, b"failed\n")
        return 1
    conn.settimeout(None)
    return server_args(paths, bool(request["debug"]), request["idle_timeout"], conn.detach()), build

"""The spare server: a process that has imported a server's modules and waits to become one.

A new server spends about 0.1 s starting Python and importing grpc, protobuf and bkdbg
before it can connect to BuildKit (measured on the 2-CPU VM of docs/benchmarks.md), while
buildx is a compiled program. So a server that started a first build then starts one
spare (`bkdbg __spare`, spareserver.py) under its root. The next `bkdbg build` under that
root claims the spare through `ROOT/spare.sock` instead of forking a server, and the
spare becomes that client's server at once.

A claim is one JSON line from the client: --debug, the server idle timeout, and the
client's arguments, environment, working directory, umask and whether it runs on a
terminal. The spare creates the instance and replies `pid PID ID` once it accepts, then
`ready` once it serves (`serve_main` writes that line to the claim's connection). It
replies `stale` when the client runs other bkdbg code, and exits then. A
`{"ping": true}` line gets `pong PID`.

A spare exits after SPARE_ENV (default 10 minutes) without a claim, and as soon as its
socket is removed or replaced by a newer spare's.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from bkdbg import __version__

# Nothing beyond the standard library and bkdbg's version is imported here, because
# `bkdbg build` claims a spare before its other imports (see early.py).

logger = logging.getLogger(__name__)

SPARE_ENV = "BKDBG_SPARE_SERVER"  # off, or how long a spare waits for a claim (e.g. 10m)
DEFAULT_WAIT = 600.0  # seconds
SOCKET_NAME = "spare.sock"
LOG_NAME = "spare.log"
CHECK_INTERVAL = 2.0  # seconds between checks that the socket is still this spare's
CLAIM_TIMEOUT = 2.0  # seconds for either side to send its line of a claim
MAX_LINE = 1 << 20
_OFF = ("off", "false", "no", "0")


class Claimed(NamedTuple):
    """A spare that accepted a claim: the connection that will carry `ready`, and the
    spare's pid and the instance it created."""

    sock: socket.socket
    pid: int
    instance_id: str


def spare_wait(environ: Mapping[str, str] | None = None) -> float | None:
    """Return how long a spare waits for a claim, or None when spares are off."""
    value = (os.environ if environ is None else environ).get(SPARE_ENV, "").strip()
    if value.lower() in _OFF:
        return None
    if not value:
        return DEFAULT_WAIT
    from bkdbg.errors import UsageError
    from bkdbg.options import parse_duration

    try:
        return parse_duration(value, SPARE_ENV)
    except UsageError:
        logger.warning("invalid %s value %r: spare servers are off", SPARE_ENV, value)
        return None


def code_fingerprint() -> str:
    """Return what identifies this bkdbg's code: version, interpreter, venv, and source mtimes."""
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
    # realpath, because `python` and `python3` of one venv are one interpreter; sys.prefix
    # tells venvs apart
    return f"{__version__} {os.path.realpath(sys.executable)} {sys.prefix} {package} {newest}"


def socket_path(root: Path) -> Path:
    return root / SOCKET_NAME


def claim(root: Path, request: dict[str, Any]) -> Claimed | None:
    """Claim the spare under `root`; None when there is none or it did not accept.

    The caller then starts a server itself.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CLAIM_TIMEOUT)
        sock.connect(str(socket_path(root)))
        sock.sendall(json.dumps({"claim": request}).encode() + b"\n")
        reply = read_line(sock).decode(errors="replace").split()
    except OSError as exc:
        logger.debug("no spare server under %s: %s", root, exc)
        sock.close()
        return None
    if len(reply) != 3 or reply[0] != "pid" or not reply[1].isdigit():
        logger.info("the spare server under %s did not accept the claim: %s", root, reply)
        sock.close()
        return None
    sock.settimeout(None)
    return Claimed(sock, int(reply[1]), reply[2])


def ping(root: Path) -> int | None:
    """Return the pid of the spare that serves under `root`, or None."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CLAIM_TIMEOUT)
            sock.connect(str(socket_path(root)))
            sock.sendall(b'{"ping": true}\n')
            reply = read_line(sock)
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
    import threading

    from bkdbg.daemon.instances import open_private

    if ping(root) is not None:
        return
    argv = [sys.executable, "-m", "bkdbg", "__spare", "--root", str(root), "--wait", f"{wait:g}"]
    with open_private(root / LOG_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   cwd="/", start_new_session=True)
    logger.info("started a spare server as pid %d", process.pid)
    # reaped here while this server lives, so it never stays a zombie meanwhile
    threading.Thread(target=process.wait, name="reap-spare", daemon=True).start()


def read_line(sock: socket.socket) -> bytes:
    received = b""
    while not received.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the end of the line")
        received += chunk
        if len(received) > MAX_LINE:
            raise ConnectionError("line too long")
    return received.rstrip(b"\n")

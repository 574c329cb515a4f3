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

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from bkdbg.daemon.early import CLAIM_TIMEOUT, SPARE_ENV, SPARE_OFF, read_line, socket_path
from bkdbg.errors import UsageError
from bkdbg.options import parse_duration

logger = logging.getLogger(__name__)

DEFAULT_WAIT = 600.0  # seconds
LOG_NAME = "spare.log"
MAX_LOG = 64 * 1024  # bytes of spare.log above which the next spare starts it anew
CHECK_INTERVAL = 2.0  # seconds between checks that the socket is still this spare's
STOP_TIMEOUT = 5.0  # seconds that stop_spare waits for the spare to exit


def spare_wait(environ: Mapping[str, str] | None = None) -> float | None:
    """Return how long a spare waits for a claim, or None when spares are off or the
    setting is invalid (which `bkdbg build` reports with `parse_spare_setting`)."""
    try:
        return parse_spare_setting(environ)
    except UsageError as exc:
        logger.warning("spare servers are off: %s", exc)
        return None


def parse_spare_setting(environ: Mapping[str, str] | None = None) -> float | None:
    """Return how long a spare waits for a claim, or None when SPARE_ENV turns them off.

    Raises UsageError naming an invalid value.
    """
    value = (os.environ if environ is None else environ).get(SPARE_ENV, "").strip()
    if value.lower() in SPARE_OFF:
        return None
    if not value:
        return DEFAULT_WAIT
    try:
        return parse_duration(value, SPARE_ENV)
    except UsageError:
        raise UsageError(
            f"invalid {SPARE_ENV} value: {value!r}: use off, or a duration such as 10m or 1h"
        ) from None


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


def stop_spare(root: Path, timeout: float = STOP_TIMEOUT) -> int | None:
    """Stop the spare under `root` and wait for its exit; return its pid, or None when
    there was none."""
    from bkdbg.daemon.instances import pid_alive

    pid = ping(root)
    if pid is None:
        return None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return None
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if pid_alive(pid):
        logger.warning("the spare server %d did not exit within %g s of SIGTERM", pid, timeout)
    return pid


def start_spare(root: Path, wait: float) -> None:
    """Start a spare under `root` unless one serves there already."""
    import subprocess
    import threading

    from bkdbg.daemon.instances import open_private

    if ping(root) is not None:
        return
    argv = [sys.executable, "-m", "bkdbg", "__spare", "--root", str(root), "--wait", f"{wait:g}"]
    # appended to, so that the previous spare's exit reason stays, unless it grew large
    log_path = root / LOG_NAME
    trim = os.O_TRUNC if log_path.exists() and log_path.stat().st_size > MAX_LOG else 0
    with open_private(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | trim) as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   cwd="/", start_new_session=True)
    logger.info("started a spare server as pid %d", process.pid)
    # reaped here while this server lives, so it never stays a zombie meanwhile
    threading.Thread(target=process.wait, name="reap-spare", daemon=True).start()

"""The spare server process, `bkdbg __spare --root ROOT --wait SECONDS` (see spare.py).

It imports what a server needs, then listens on ROOT/spare.sock, and replies to each ping
with its pid. On the first claim it creates the client's instance and takes on the
client's environment, working directory and umask. Then it derives the build from the
client's arguments and runs `serve_main` with that build, which writes the ready line to
the claim's connection.
"""

from __future__ import annotations

import argparse
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

from bkdbg.daemon.early import CLAIM_TIMEOUT, code_fingerprint, read_line, socket_path
from bkdbg.daemon.spare import CHECK_INTERVAL, DEFAULT_WAIT

if TYPE_CHECKING:
    from bkdbg.daemon.backend import FirstBuild

logger = logging.getLogger(__name__)


def spare_main(argv: list[str]) -> int:
    """Run a spare under --root until a client claims it (then serve) or its wait ends."""
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
        replaced = not _owns_socket(root, inode)
    except SystemExit:
        logger.info("spare server exits: stopped by a signal")
        return 0
    finally:
        _remove_socket(root, inode)
        listener.close()
    if claimed is None:
        logger.info("spare server exits: %s", f"{socket_path(root)} was removed or replaced"
                    if replaced else f"no claim within {args.wait:g} s")
        return 0

    serve_call = _take_claim(*claimed, root, fingerprint)
    if isinstance(serve_call, int):
        return serve_call
    # from here on the server logs to the instance log, which fds 1 and 2 now are too
    logging.getLogger().removeHandler(handler)
    from bkdbg.daemon.main import serve_main

    return serve_main(serve_call[0], first_build=serve_call[1], spares=True)


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _wait_for_claim(listener: socket.socket, root: Path, inode: int,
                    deadline: float) -> tuple[socket.socket, dict[str, Any]] | None:
    """Reply to pings until a claim arrives; return its connection and request."""
    while (conn := _next_connection(listener, root, inode, deadline)) is not None:
        request = _read_request(conn)
        if request is not None and isinstance(request.get("claim"), dict):
            return conn, request["claim"]
        pong = f"pong {os.getpid()}\n".encode()
        _answer(conn, pong if request and request.get("ping") else b"")
    return None


def _import_server() -> None:
    """Import what a server needs for its first build, and the commands that derive it.

    grpc imports its channel and server modules only when the first of each is made, and
    initializes its core then. That costs about 10 ms in all (grpcio 1.85, 2-CPU VM of
    docs/benchmarks.md), so a spare makes and drops one of each here.
    """
    import ctypes  # noqa: F401  (bkdbg.heap's tune_malloc)
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    import bkdbg.commands  # noqa: F401
    import bkdbg.daemon.gateway_backend  # noqa: F401
    import bkdbg.daemon.main  # noqa: F401

    grpc.insecure_channel("unix:/nonexistent").close()
    with ThreadPoolExecutor(max_workers=1) as executor:
        grpc.server(executor).stop(None)


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
        request = json.loads(read_line(conn))
    except (OSError, ValueError) as exc:
        logger.warning("invalid request on the spare socket: %s", exc)
        return None
    return request if isinstance(request, dict) else None


def _answer(conn: socket.socket, line: bytes) -> None:
    try:
        if line:
            conn.sendall(line)
    except OSError as exc:
        logger.info("cannot reply on the spare socket: %s", exc)
    finally:
        conn.close()


def _take_claim(conn: socket.socket, request: dict[str, Any], root: Path,
                fingerprint: str) -> tuple[list[str], FirstBuild | None] | int:
    """Take on the claiming client's environment and a new instance for it.

    Returns the arguments of `serve_main` and the client's build, or the exit status
    of a spare that rejected the claim.
    """
    from bkdbg.commands import first_build
    from bkdbg.daemon.instances import create_instance, open_private, remove_instance
    from bkdbg.daemon.launcher import name_process, server_args
    from bkdbg.errors import BkdbgError

    if request.get("fingerprint") != fingerprint:
        logger.info("spare server exits: the client runs other bkdbg code")
        _answer(conn, b"stale\n")
        return 0
    paths = None
    try:
        os.environ.clear()
        os.environ.update(request["environ"])
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        build = first_build(request["argv"], bool(request["interactive"]))
        os.chdir("/")
        paths = create_instance(root)
        with open_private(paths.log_file, os.O_WRONLY | os.O_APPEND) as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        name_process(f"bkdbg-{paths.instance_id}")
        conn.sendall(f"pid {os.getpid()} {paths.instance_id}\n".encode())
    except (BkdbgError, OSError, KeyError, TypeError, ValueError) as exc:
        logger.warning("claim failed: %s", exc)
        if paths is not None:
            remove_instance(paths)
        _answer(conn, b"failed\n")
        return 1
    conn.settimeout(None)
    return server_args(paths, bool(request["debug"]), request["idle_timeout"], conn.detach()), build

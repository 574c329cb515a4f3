"""The server's public socket: accept, check the peer's uid, and relay to the gRPC socket.

grpcio gives a handler neither the connection's file descriptor nor the peer credentials
of a unix socket. With grpcio 1.85, `context.peer()` is "unix:" and the auth context holds
only the security level, even with local (UDS) credentials. So the uid check happens here.
`FrontListener` accepts on `ROOT/ID/sock` itself, reads SO_PEERCRED, closes connections from
other uids with a log line, and copies bytes both ways between an accepted connection and
a new connection to the gRPC server's own socket in the 0700 instance directory. Each
accepted connection costs two relay threads; tests/test_daemon_peercred.py measures the
added round-trip latency.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

RELAY_CHUNK = 256 * 1024
ACCEPT_BACKLOG = 64
# struct ucred {pid_t pid; uid_t uid; gid_t gid;} from <sys/socket.h> on Linux
_UCRED = struct.Struct("3i")


def peer_uid(sock: socket.socket) -> int | None:
    """Return the uid of the process at the other end of a unix socket, None if unknown."""
    if hasattr(socket, "SO_PEERCRED"):
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        return int(_UCRED.unpack(raw)[1])
    if sys.platform == "darwin":
        return _darwin_peer_uid(sock)
    return None


def _darwin_peer_uid(sock: socket.socket) -> int | None:
    # struct xucred {u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[16];}
    # read with getsockopt(SOL_LOCAL=0, LOCAL_PEERCRED=1) as <sys/un.h> defines them
    raw = sock.getsockopt(0, 1, 76)
    return int(struct.unpack_from("Ii", raw)[1])


def peer_pid(sock: socket.socket) -> int | None:
    """Return the pid at the other end of a unix socket, None where the platform has none."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(raw)[0])


def peer_allowed(sock: socket.socket, uid: int | None = None) -> bool:
    """Return whether the peer of `sock` runs as `uid` (default: this process's uid).

    Where the platform gives no peer credentials, only the 0700 directory protects the
    socket, and every peer is allowed.
    """
    expected = os.getuid() if uid is None else uid
    actual = peer_uid(sock)
    return actual is None or actual == expected


def admit(conn: socket.socket, uid: int, what: str) -> bool:
    """Return whether `conn`'s peer runs as `uid`.

    A stranger's connection is logged as a rejected `what`. The caller counts it and then
    closes it, so the count is current by the time the stranger's side reads EOF.
    """
    if peer_allowed(conn, uid):
        return True
    logger.warning(
        "rejected %s from uid %s (pid %s): only uid %d may connect",
        what, peer_uid(conn), peer_pid(conn), uid,
    )
    return False


class FrontListener:
    """Accepts on `public_path` and relays each allowed connection to `backend_path`."""

    def __init__(self, public_path: Path, backend_path: Path, uid: int | None = None) -> None:
        self.public_path = public_path
        self.backend_path = backend_path
        self.uid = os.getuid() if uid is None else uid
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._relays: set[socket.socket] = set()
        self.rejected = 0

    def start(self) -> None:
        """Bind the public socket (mode 0600) and start accepting."""
        _remove_stale_socket(self.public_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(os.fspath(self.public_path))
        os.chmod(self.public_path, 0o600)
        listener.listen(ACCEPT_BACKLOG)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, name="front-accept", daemon=True)
        self._thread.start()
        logger.info("listening on %s (uid %d only)", self.public_path, self.uid)

    def close(self) -> None:
        """Stop accepting, close every relayed connection and remove the public socket."""
        self._closing.set()
        if self._listener is not None:
            # shutdown wakes the accept() of the other thread; close alone does not on Linux
            _shutdown_quietly(self._listener)
            self._listener.close()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            relays, self._relays = list(self._relays), set()
        for sock in relays:
            _shutdown_quietly(sock)
        _remove_stale_socket(self.public_path)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if not self._closing.is_set():
                    logger.exception("accept on %s failed", self.public_path)
                return
            self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        if not admit(conn, self.uid, "a connection"):
            self.rejected += 1
            conn.close()
            return
        try:
            backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            backend.connect(os.fspath(self.backend_path))
        except OSError as exc:
            logger.warning("cannot reach the gRPC socket %s: %s", self.backend_path, exc)
            backend.close()
            conn.close()
            return
        self._relay(conn, backend)

    def _relay(self, client: socket.socket, backend: socket.socket) -> None:
        with self._lock:
            self._relays.update((client, backend))
        pair = _RelayPair(client, backend, self._forget)
        pair.start()

    def _forget(self, *socks: socket.socket) -> None:
        with self._lock:
            self._relays.difference_update(socks)


class _RelayPair:
    """Two relay threads for one connection; the sockets close when both directions end."""

    def __init__(self, client: socket.socket, backend: socket.socket,
                 on_closed: Callable[..., None]) -> None:
        self.client = client
        self.backend = backend
        self.on_closed = on_closed
        self._remaining = 2
        self._lock = threading.Lock()

    def start(self) -> None:
        for source, target, name in ((self.client, self.backend, "up"),
                                     (self.backend, self.client, "down")):
            thread = threading.Thread(
                target=self._pump, args=(source, target), name=f"relay-{name}", daemon=True
            )
            thread.start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        relay_bytes(source, target)
        with self._lock:
            self._remaining -= 1
            last = self._remaining == 0
        if last:
            self.client.close()
            self.backend.close()
            self.on_closed(self.client, self.backend)


def relay_bytes(source: socket.socket, target: socket.socket) -> None:
    """Copy from `source` to `target` until EOF or an error, then half-close `target`."""
    buffer = bytearray(RELAY_CHUNK)
    view = memoryview(buffer)
    try:
        while True:
            count = source.recv_into(buffer)
            if count == 0:
                break
            target.sendall(view[:count])
    except OSError as exc:
        logger.debug("relay ended: %s", exc)
        # end the other direction too, so that the peer notices the connection drop
        _shutdown_quietly(source)
    _shutdown_quietly(target, socket.SHUT_WR)


def _shutdown_quietly(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


def _remove_stale_socket(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass

"""Tests for the server's front socket: the peer uid check and the relay to gRPC."""

from __future__ import annotations

import logging
import os
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bkdbg.daemon.peercred import FrontListener, peer_allowed, peer_uid

NOBODY = 65534


@pytest.fixture
def echo_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A unix socket server that echoes every byte back, standing in for gRPC."""
    directory = Path(os.environ["BKDBG_ROOT"])
    path = directory / "echo"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(16)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield path
    stop.set()
    server.shutdown(socket.SHUT_RDWR)
    server.close()


@pytest.fixture
def front(echo_backend: Path) -> Iterator[FrontListener]:
    listener = FrontListener(echo_backend.parent / "front", echo_backend)
    listener.start()
    yield listener
    listener.close()


def closed_by_server(sock: socket.socket) -> bool:
    """Send a few bytes; return whether the server closed the connection without a response.

    The server may close before the bytes arrive (EPIPE on send), or with the bytes unread,
    which makes the kernel send a reset (ECONNRESET rather than EOF).
    """
    try:
        sock.sendall(b"ping")
        return sock.recv(10) == b""
    except (BrokenPipeError, ConnectionResetError):
        return True


def round_trip(sock: socket.socket, payload: bytes) -> bytes:
    # a payload larger than the socket buffers is sent from a thread, or sendall would
    # block while the echo waits for this side to read
    sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
    if len(payload) > 64 * 1024:
        sender.start()
    else:
        sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the echo arrived"
        received += chunk
    if sender.is_alive():
        sender.join()
    return received


def test_peer_uid_of_socketpair_is_ours() -> None:
    left, right = socket.socketpair()
    with left, right:
        assert peer_uid(left) == os.getuid()


def test_peer_allowed_same_uid() -> None:
    left, right = socket.socketpair()
    with left, right:
        assert peer_allowed(left)


def test_peer_rejected_for_other_uid() -> None:
    # the peer is this process, so expecting another uid must fail the check
    left, right = socket.socketpair()
    with left, right:
        assert not peer_allowed(left, uid=os.getuid() + 1)


def test_front_socket_mode_0600(front: FrontListener) -> None:
    old_umask = os.umask(0)
    try:
        assert (front.public_path.stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old_umask)


def test_front_relays_both_ways(front: FrontListener) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(front.public_path))
        payload = os.urandom(1 << 20)
        assert round_trip(sock, payload) == payload


def test_front_rejects_wrong_uid(echo_backend: Path, caplog: pytest.LogCaptureFixture) -> None:
    # a listener that expects another uid treats this test process as a stranger
    listener = FrontListener(echo_backend.parent / "strict", echo_backend, uid=os.getuid() + 1)
    listener.start()
    try:
        with caplog.at_level(logging.WARNING, logger="bkdbg.daemon.peercred"), \
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(listener.public_path))
            sock.settimeout(5)
            assert closed_by_server(sock)
        assert listener.rejected == 1
        assert "rejected a connection from uid" in caplog.text
    finally:
        listener.close()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to switch to another uid")
def test_front_rejects_real_other_user(front: FrontListener, tmp_path: Path) -> None:
    # the socket is 0600 in a 0700 dir, so a real stranger cannot even connect. Open it up
    # here, so that the peer credential check itself must reject the connection.
    os.chmod(front.public_path, 0o666)
    for directory in front.public_path.parents:
        if directory == Path("/tmp"):
            break
        os.chmod(directory, 0o755)
    pid = os.fork()
    if pid == 0:  # child: switch to the user nobody, connect, report what the server did
        code = 3
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(front.public_path))
                code = 0 if closed_by_server(sock) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the other user's connection was served"
    assert front.rejected == 1


def test_front_close_removes_socket(echo_backend: Path) -> None:
    listener = FrontListener(echo_backend.parent / "gone", echo_backend)
    listener.start()
    listener.close()
    assert not listener.public_path.exists()


def test_front_drops_relay_when_client_dies(front: FrontListener, echo_backend: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(front.public_path))
    assert round_trip(sock, b"x") == b"x"
    sock.close()
    deadline = time.monotonic() + 5
    while front._relays and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not front._relays


def test_relay_latency(front: FrontListener, echo_backend: Path) -> None:
    """Measure the round trip added by the relay; prints the medians."""

    def median_rtt(path: Path) -> float:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            samples = []
            for _ in range(500):
                start = time.perf_counter()
                round_trip(sock, b"0123456789abcdef")
                samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    direct = median_rtt(echo_backend)
    relayed = median_rtt(front.public_path)
    print(f"\nround trip of 16 bytes: direct {direct * 1e6:.0f} us, "
          f"through the relay {relayed * 1e6:.0f} us")
    # generous: the relay adds two thread hand-offs per direction
    assert relayed < direct + 0.005

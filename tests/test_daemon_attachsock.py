"""Tests for the attach socket: framing, the peer uid check, takeover and the stream's end.

Servers run in this process with the fake backend of tests/test_daemon_support.py, as in
tests/test_daemon_session.py.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bkdbg.daemon import api_pb2 as pb
from bkdbg.daemon.attachserver import AttachListener
from bkdbg.daemon.attachsock import (
    FRAME_ERROR,
    MAX_FRAME,
    FrameError,
    SocketAttachStream,
    recv_frame,
    send_frame,
)
from bkdbg.daemon.client import DaemonClient
from bkdbg.daemon.instances import InstancePaths
from bkdbg.daemon.main import run_in_process
from bkdbg.daemon.messages import Closed, TakenOver
from bkdbg.daemon.rpc import GrpcAttachStream
from bkdbg.errors import NotAttached, ServerUnreachable
from tests.test_daemon_session import Reader, finish, options, second_client
from tests.test_daemon_support import FakeBackend

WAIT = 10.0  # seconds for anything a test waits for


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def client(backend: FakeBackend) -> Iterator[DaemonClient]:
    client = run_in_process(None, backend=backend)
    yield client
    client.close()


@pytest.fixture
def context_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ctx"
    directory.mkdir()
    return directory


# ---------------------------------------------------------------- framing


def test_frame_round_trip() -> None:
    left, right = socket.socketpair()
    with left, right:
        send_frame(left, b"hello")
        send_frame(left, b"", FRAME_ERROR)
        assert recv_frame(right) == (b"m", b"hello")
        assert recv_frame(right) == (FRAME_ERROR, b"")


def test_frame_eof_between_frames() -> None:
    left, right = socket.socketpair()
    with right:
        send_frame(left, b"last")
        left.close()
        assert recv_frame(right) == (b"m", b"last")
        assert recv_frame(right) is None


def test_frame_eof_inside_frame() -> None:
    left, right = socket.socketpair()
    with right:
        left.sendall(b"m\x00\x00\x00\x10abc")
        left.close()
        with pytest.raises(FrameError, match="inside a frame"):
            recv_frame(right)


def test_frame_too_large() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"m" + (MAX_FRAME + 1).to_bytes(4, "big"))
        with pytest.raises(FrameError, match="too large"):
            recv_frame(right)


# ---------------------------------------------------------------- the server's socket


def test_attach_socket_mode_0600(client: DaemonClient) -> None:
    path = client.paths.attach_socket
    assert path.parent == client.paths.directory
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_attach_uses_socket(client: DaemonClient, context_dir: Path) -> None:
    finish(client.build(options(context_dir, ["sh"])))
    reader = Reader(client.attach())
    assert isinstance(reader.stream, SocketAttachStream)
    reader.stream.send_stdin(b"echo over-socket\n")
    assert b"over-socket" in reader.output_until(b"over-socket")
    reader.stream.close()


def test_attach_falls_back_to_grpc(client: DaemonClient, context_dir: Path) -> None:
    finish(client.build(options(context_dir, ["sh"])))
    client.paths.attach_socket.unlink()
    reader = Reader(client.attach())
    assert isinstance(reader.stream, GrpcAttachStream)
    reader.stream.send_stdin(b"echo over-grpc\n")
    assert b"over-grpc" in reader.output_until(b"over-grpc")
    reader.stream.close()


def test_attach_error_reaches_client(client: DaemonClient) -> None:
    with pytest.raises(NotAttached, match="no process runs"):
        client.attach()


def test_attach_first_message_not_start(client: DaemonClient) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(os.fspath(client.paths.attach_socket))
        send_frame(sock, pb.AttachInput(stdin=b"x").SerializeToString())
        frame = recv_frame(sock)
    assert frame is not None
    assert frame[0] == FRAME_ERROR
    assert frame[1].startswith(b"UsageError\n")


def test_attach_rejects_wrong_uid(client: DaemonClient, tmp_path: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    # a listener that expects another uid treats this test process as a stranger
    path = client.paths.directory / "strict"
    listener = AttachListener(path, client._server.session, uid=os.getuid() + 1)  # type: ignore[union-attr]
    listener.start()
    try:
        with caplog.at_level(logging.WARNING, logger="bkdbg.daemon.attachserver"), \
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(os.fspath(path))
            sock.settimeout(WAIT)
            start = pb.AttachInput(start=pb.AttachStart(client_id=client.client_id))
            assert not answered(sock, start)
        assert listener.rejected == 1
        assert "rejected an attach connection from uid" in caplog.text
    finally:
        listener.close()
    assert not path.exists()


def answered(sock: socket.socket, request: pb.AttachInput) -> bool:
    """Send `request`; return whether the server sent a frame before closing."""
    try:
        send_frame(sock, request.SerializeToString())
        return recv_frame(sock) is not None
    except ConnectionError:
        # a reset: the server closed the connection before it read the request
        return False


# ---------------------------------------------------------------- takeover and the end


def test_takeover_over_socket(client: DaemonClient, context_dir: Path) -> None:
    finish(client.build(options(context_dir, ["sh"])))
    other = second_client(client)
    try:
        first = Reader(client.attach())
        second = Reader(other.attach())
        assert first.end() == TakenOver(other.client_id)
        second.stream.send_stdin(b"echo from-second\n")
        assert b"from-second" in second.output_until(b"from-second")
    finally:
        other.close()


def test_disconnect_ends_with_closed(client: DaemonClient, context_dir: Path) -> None:
    finish(client.build(options(context_dir, ["sh"])))
    other = second_client(client)
    try:
        reader = Reader(other.attach())
        assert client.disconnect(other.client_id) == 1
        ended = reader.end()
        assert isinstance(ended, Closed), ended
        assert "disconnected by client" in ended.reason
    finally:
        other.close()


def test_shutdown_ends_with_closed(backend: FakeBackend, context_dir: Path) -> None:
    client = run_in_process(None, backend=backend)
    finish(client.build(options(context_dir, ["sh"])))
    reader = Reader(client.attach())
    client.shutdown()
    ended = reader.end()
    assert isinstance(ended, Closed), ended
    assert "shutting down" in ended.reason
    assert not client.paths.attach_socket.exists()
    client.close()


def test_detach_delivers_input_first(client: DaemonClient, context_dir: Path) -> None:
    finish(client.build(options(context_dir, ["sh"])))
    stream = client.attach()
    stream.send_stdin(b"echo kept-output > detach-marker\n")
    stream.close()
    # the shell's echo may have reached the first stream before it closed, so check the
    # command's effect instead of the replayed output
    reader = Reader(client.attach(replay=True))
    reader.stream.send_stdin(b"cat detach-marker\n")
    assert b"kept-output" in reader.output_until(b"kept-output")
    reader.stream.close()


# a stand-in server that accepts one attach and then hangs until it is killed
FAKE_SERVER = """
import socket, sys, time
from bkdbg.daemon import api_pb2 as pb
from bkdbg.daemon.attachsock import recv_frame, send_frame
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen(1)
print("ready", flush=True)
conn, _ = listener.accept()
recv_frame(conn)
send_frame(conn, pb.AttachOutput(attached=pb.Attached(process_id="p1")).SerializeToString())
time.sleep(60)
"""


def test_dead_server_noticed(tmp_path: Path) -> None:
    paths = InstancePaths(tmp_path, "deadbeef")
    paths.directory.mkdir()
    command = [sys.executable, "-c", FAKE_SERVER, os.fspath(paths.attach_socket)]
    with subprocess.Popen(command, stdout=subprocess.PIPE) as server:
        try:
            notice_dead_server(server, paths)
        finally:
            server.kill()


def notice_dead_server(server: subprocess.Popen[bytes], paths: InstancePaths) -> None:
    assert server.stdout is not None
    assert server.stdout.readline() == b"ready\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.fspath(paths.attach_socket))
    stream = SocketAttachStream(sock, paths, pb.AttachStart(), lambda: False)
    reader = Reader(stream)
    os.kill(server.pid, signal.SIGKILL)
    started = time.monotonic()
    # the reader puts the exception that ended the stream before its final None
    messages = reader.until(lambda m: m is None)
    assert isinstance(messages[-2], ServerUnreachable), messages
    assert time.monotonic() - started < 2.0

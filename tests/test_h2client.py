"""ExecProcess on its own HTTP/2 connection: a fake server for status handling, then BuildKit."""

import socket
import struct
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from bkdbg.buildkit_proto import gateway_pb2, ops_pb2
from bkdbg.gateway import h2frames as h2
from bkdbg.gateway.container import Container, ProcessConfig
from bkdbg.gateway.h2client import H2StreamCall, StreamError
from bkdbg.gateway.hpack import encode_headers
from tests.test_container import WAIT, Output, image_build  # noqa: F401 (fixture)

# ---------------------------------------------------------------- fake server


def grpc_message(msg: gateway_pb2.ExecMessage) -> bytes:
    body = msg.SerializeToString()
    return struct.pack(">BI", 0, len(body)) + body


def serve_once(server: socket.socket, frames: bytes) -> bytes:
    """Read the client's preface and headers, send `frames`, return what the client sent."""
    received = server.recv(65536)
    server.sendall(h2.frame(h2.SETTINGS, 0, 0) + frames)
    return received


def fake_call(frames: bytes) -> tuple[H2StreamCall[gateway_pb2.ExecMessage], bytes]:
    client, server = socket.socketpair()
    requests: Iterator[gateway_pb2.ExecMessage] = iter(())
    call = H2StreamCall(
        client, b"", "/x/Exec", [("k", "v")], requests, gateway_pb2.ExecMessage.FromString
    )
    call.start()
    sent = serve_once(server, frames)
    server.close()
    return call, sent


def headers(fields: list[tuple[str, str]], end_stream: bool = False) -> bytes:
    flags = h2.FLAG_END_HEADERS | (h2.FLAG_END_STREAM if end_stream else 0)
    return h2.frame(h2.HEADERS, flags, 1, encode_headers(fields))


def test_messages_split_across_frames():
    first = grpc_message(gateway_pb2.ExecMessage(ProcessID="p", Started={}))
    second = grpc_message(gateway_pb2.ExecMessage(ProcessID="p", Done={}))
    data = first + second
    frames = (
        headers([(":status", "200"), ("content-type", "application/grpc")])
        + h2.frame(h2.DATA, 0, 1, data[:3])
        + h2.frame(h2.DATA, 0, 1, data[3:])
        + headers([("grpc-status", "0")], end_stream=True)
    )
    call, sent = fake_call(frames)
    kinds = [m.WhichOneof("Input") for batch in call.batches() for m in batch]
    assert kinds == ["Started", "Done"]
    assert sent.startswith(h2.PREFACE)


def test_error_status_raises():
    frames = headers([(":status", "200")]) + headers(
        [("grpc-status", "13"), ("grpc-message", "boom%20here")], end_stream=True
    )
    call, _ = fake_call(frames)
    with pytest.raises(StreamError) as caught:
        list(call.batches())
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == "boom here"


def test_http_error_status_raises():
    call, _ = fake_call(headers([(":status", "404")], end_stream=True))
    with pytest.raises(StreamError) as caught:
        list(call.batches())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "404" in caught.value.details()


def test_dropped_connection_raises():
    call, _ = fake_call(headers([(":status", "200")]))
    with pytest.raises(StreamError) as caught:
        list(call.batches())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------- real BuildKit


@pytest.fixture
def h2_container(image_build) -> Iterator[Container]:  # noqa: F811 (fixture argument)
    assert image_build.result is not None
    dial = image_build._conn.h2_dialer
    if dial is None:
        pytest.skip("the test address has no HTTP/2 dialer (only unix:// and docker:// do)")
    root = ops_pb2.Mount(dest="/", mountType=ops_pb2.BIND, resultID=image_build.result.ref_id)
    created = Container.create(image_build, [root], dial=dial)
    try:
        yield created
    finally:
        created.release()


def test_h2_stdin_larger_than_windows(h2_container):
    out = Output()
    process = h2_container.start(ProcessConfig(args=["/bin/sh", "-c", "wc -c"], env=[]), out)
    process.write(b"x" * 3_000_000)  # three 1 MiB frames, each over the 64 KiB default window
    process.close_stdin()
    assert process.wait(WAIT) == 0
    assert out.text().strip() == "3000000"
    assert out.eof == {1, 2}


def test_h2_output_complete_and_status(h2_container):
    out = Output()
    script = "head -c 5000000 /dev/zero | tr '\\0' a; echo oops >&2; exit 3"
    process = h2_container.start(ProcessConfig(args=["/bin/sh", "-c", script], env=[]), out)
    process.close_stdin()
    assert process.wait(WAIT) == 3
    assert bytes(out.data[1]) == b"a" * 5_000_000
    assert out.text(2) == "oops\n"


def test_h2_tty_resize(h2_container):
    out = Output()
    config = ProcessConfig(args=["/bin/sh"], env=["PS1=$ "], tty=True, rows=20, cols=70)
    process = h2_container.start(config, out)
    process.write(b"stty size\n")
    out.wait_for("20 70")
    process.resize(33, 101)
    # BuildKit applies a Resize in another goroutine than stdin, so give it a moment
    time.sleep(0.2)
    process.write(b"stty size; exit 4\n")
    out.wait_for("33 101")
    assert process.wait(WAIT) == 4


def test_h2_release_ends_running_process(h2_container):
    process = h2_container.start(ProcessConfig(args=["/bin/sleep", "30"], env=[]), Output())
    start = time.monotonic()
    h2_container.release()
    assert process.done.wait(WAIT)
    assert time.monotonic() - start < 10


def test_h2_abandon_cancels(h2_container):
    process = h2_container.start(ProcessConfig(args=["/bin/sleep", "30"], env=[]), Output())
    ended = threading.Event()
    threading.Thread(target=lambda: (process.done.wait(WAIT), ended.set()), daemon=True).start()
    process.abandon()
    assert ended.wait(WAIT)
    assert process.done.is_set()

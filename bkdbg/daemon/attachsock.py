"""The attach socket's framing and its client side, `SocketAttachStream`.

An attach over gRPC passes each keystroke through grpcio on both ends and through the
uid-checking relay in `peercred.py`. The server therefore also accepts attach streams on a
plain unix socket, `ROOT/ID/io` (0600, in the 0700 instance directory), and checks the
peer's uid when it accepts a connection.

Each frame is one kind byte, a 4-byte big-endian payload length and the payload. A
`FRAME_MESSAGE` payload is an `AttachInput` (client to server) or an `AttachOutput`
(server to client) from api.proto. The client's first message is `start`, as on the gRPC
Attach stream. The server's first frame is `Attached`, or a `FRAME_ERROR` whose payload is
the error's class name, a newline and its message. The client ends its input by shutting
down its write side; the server closes the connection after a final message or detach.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import re
import signal
import socket
import struct
import threading
from collections.abc import Callable, Iterator

from google.protobuf.message import DecodeError

from bkdbg.daemon import api_pb2 as pb
from bkdbg.daemon.convert import attach_output_from_pb
from bkdbg.daemon.instances import InstancePaths
from bkdbg.daemon.messages import ERROR_CLASSES, TERMINAL_MESSAGES, Attached, AttachMessage
from bkdbg.errors import BkdbgError, ServerError, ServerUnreachable, UsageError

logger = logging.getLogger(__name__)

FRAME_MESSAGE = b"m"
FRAME_ERROR = b"e"
MAX_FRAME = 16 * 1024 * 1024  # bytes, the same limit as the gRPC messages
_HEADER = struct.Struct(">cI")
# real-time signals by the names BuildKit accepts besides RTMIN and RTMAX
_REALTIME = re.compile(r"^RT(MIN\+|MAX-)([1-9]|1[0-5])$")


class FrameError(Exception):
    """A frame that breaks the attach socket protocol."""


def send_frame(sock: socket.socket, payload: bytes, kind: bytes = FRAME_MESSAGE) -> None:
    sock.sendall(_HEADER.pack(kind, len(payload)) + payload)


def recv_frame(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """Return the next (kind, payload), or None at EOF between frames.

    Raises FrameError for EOF inside a frame or a length above MAX_FRAME.
    """
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    kind, size = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise FrameError(f"attach frame too large: {size} bytes (maximum {MAX_FRAME})")
    payload = _recv_exact(sock, size) if size else b""
    if payload is None:
        raise FrameError("attach connection closed inside a frame")
    return kind, payload


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    chunks = []
    remaining = size
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            if remaining == size:
                return None
            raise FrameError("attach connection closed inside a frame")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def signal_name(name: str) -> str:
    """Return a signal name without the SIG prefix; raises UsageError if it is unknown."""
    bare = name.upper().removeprefix("SIG")
    if f"SIG{bare}" not in signal.Signals.__members__ and not _REALTIME.match(bare):
        raise UsageError(f"unknown signal: {name}: use a name such as INT, TERM or KILL")
    return bare


def error_payload(exc: BkdbgError) -> bytes:
    return f"{type(exc).__name__}\n{exc}".encode()


def error_from_payload(payload: bytes) -> BkdbgError:
    kind, _, message = payload.decode(errors="replace").partition("\n")
    return ERROR_CLASSES.get(kind, ServerError)(message)


# ---------------------------------------------------------------- the client side


def connect_attach_socket(paths: InstancePaths) -> socket.socket | None:
    """Connect to the server's attach socket; None when it has none (an older server)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.fspath(paths.attach_socket))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        logger.debug("no attach socket at %s (%s): attaching over gRPC", paths.attach_socket, exc)
        sock.close()
        return None
    except OSError:
        sock.close()
        raise
    return sock


class AttachStream(abc.ABC):
    """One attach stream: send input, iterate over Attached, Output and a final message.

    Iteration ends after Exited, TakenOver or Closed, or after `close()`. Creating the
    stream waits for the server's Attached message, available as `attached`.
    """

    attached: Attached
    _closed: bool

    def send_stdin(self, data: bytes) -> None:
        if data:
            self._send(pb.AttachInput(stdin=data))

    def close_stdin(self) -> None:
        self._send(pb.AttachInput(stdin_eof=True))

    def resize(self, rows: int, cols: int) -> None:
        self._send(pb.AttachInput(resize=pb.Resize(rows=rows, cols=cols)))

    def signal(self, name: str) -> None:
        """Send a signal by name, with or without the SIG prefix; raises UsageError if unknown."""
        self._send(pb.AttachInput(signal=signal_name(name)))

    @abc.abstractmethod
    def _send(self, request: pb.AttachInput) -> None: ...

    def __iter__(self) -> Iterator[AttachMessage]:
        while not self._closed:
            message = self._next()
            if message is None:
                return
            yield message
            if isinstance(message, TERMINAL_MESSAGES):
                self._after_final()
                return

    @abc.abstractmethod
    def _after_final(self) -> None:
        """Release what the stream holds once the server's final message was read."""

    @abc.abstractmethod
    def close(self, timeout: float = 1.0) -> None:
        """Detach: the process keeps running, and the server keeps its output again."""

    @abc.abstractmethod
    def _next(self) -> AttachMessage | None: ...

    def _expect_attached(self, instance_id: str) -> None:
        """Take the server's first message into `attached`; anything else is a version skew."""
        first = self._next()
        if not isinstance(first, Attached):
            self.close()
            raise ServerError(
                f"bkdbg server {instance_id} sent {type(first).__name__} before "
                "Attached: use the same bkdbg version for client and server"
            )
        self.attached = first


class SocketAttachStream(AttachStream):
    """An attach stream on the attach socket.

    Input is sent from the caller's thread. Iteration ends after Exited, TakenOver or
    Closed, or after `close()`. A connection that ends without one of those raises
    ServerUnreachable.
    """

    def __init__(self, sock: socket.socket, paths: InstancePaths, start: pb.AttachStart,
                 client_closed: Callable[[], bool],
                 lost_error: Callable[[], BkdbgError] | None = None) -> None:
        """Send `start` on `sock` and wait for Attached.

        `client_closed` returns whether the owning client was closed, which makes a lost
        connection end the iteration quietly. `lost_error` returns the error raised for a
        connection that ends without a final message.
        """
        self._sock = sock
        self._paths = paths
        self._client_closed = client_closed
        self._lost_error = lost_error
        self._closed = False
        self._ended = False
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._send(pb.AttachInput(start=start), force=True)
        self._expect_attached(paths.instance_id)

    # ------------------------------------------------------------ input

    def _send(self, request: pb.AttachInput, force: bool = False) -> None:
        if self._closed and not force:
            return
        try:
            with self._send_lock:
                send_frame(self._sock, request.SerializeToString())
        except OSError as exc:
            # the reading side reports the lost connection
            logger.debug("attach input to %s failed: %s", self._paths.instance_id, exc)

    # ------------------------------------------------------------ output

    def _after_final(self) -> None:
        pass  # _next closed the connection when it read the final message

    def _next(self) -> AttachMessage | None:
        if self._ended:
            return None
        try:
            with self._read_lock:
                frame = recv_frame(self._sock)
        except (OSError, FrameError) as exc:
            return self._lost(exc)
        if frame is None:
            return self._lost(None)
        kind, payload = frame
        if kind == FRAME_ERROR:
            self._end()
            raise error_from_payload(payload)
        output = pb.AttachOutput()
        try:
            output.ParseFromString(payload)
        except DecodeError as exc:
            return self._lost(exc)
        message = attach_output_from_pb(output)
        if isinstance(message, TERMINAL_MESSAGES):
            self._end()
        return message

    def _end(self) -> None:
        """Close the connection after the server's last frame or after losing it."""
        self._ended = True
        with self._send_lock:
            self._sock.close()

    def _lost(self, exc: Exception | None) -> AttachMessage | None:
        """Return None after a close here; otherwise raise ServerUnreachable."""
        self._end()
        if self._closed or self._client_closed():
            return None
        logger.info("attach connection to %s ended without a final message: %s",
                    self._paths.instance_id, exc or "EOF")
        if self._lost_error is not None:
            raise self._lost_error()
        raise ServerUnreachable(
            f"bkdbg server {self._paths.instance_id} closed the attach connection: "
            "run bkdbg list"
        )

    # ------------------------------------------------------------ closing

    def close(self, timeout: float = 1.0) -> None:
        """Detach: the process keeps running, and the server keeps its output again.

        Input sent before is delivered first, because the server reads up to the end of
        the input before it closes the connection; after `timeout` seconds the connection
        is closed anyway.
        """
        if self._closed:
            return
        self._closed = True
        if self._ended:
            return
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
        drained = threading.Thread(target=self._discard_output, name="attach-discard",
                                   daemon=True)
        drained.start()
        drained.join(timeout)
        if drained.is_alive():
            logger.debug("attach connection of %s did not end; closing it",
                         self._paths.instance_id)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        drained.join(timeout)
        with self._send_lock:
            self._sock.close()

    def abort(self) -> None:
        """Close the connection at once, without waiting for the server."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with self._send_lock:
            self._sock.close()

    def __del__(self) -> None:
        # an abandoned stream detaches, as a garbage-collected gRPC call is cancelled
        if self._sock.fileno() != -1:
            self.abort()

    def _discard_output(self) -> None:
        with contextlib.suppress(OSError, FrameError), self._read_lock:
            while recv_frame(self._sock) is not None:
                pass

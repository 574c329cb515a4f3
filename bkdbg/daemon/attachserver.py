"""The server side of the attach socket (framing in `attachsock.py`).

`AttachListener` accepts on `ROOT/ID/io` and closes connections from other uids with a
log line. Each allowed connection gets two threads. The connection's own thread sends the
attachment's queued output, and a reader thread forwards stdin, resizes, signals and
stdin EOF to the process. The attach bookkeeping is the gRPC Attach handler's
(`service.start_attachment`, `service.apply_input`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from pathlib import Path

from google.protobuf.message import DecodeError

from bkdbg.daemon import api_pb2 as pb
from bkdbg.daemon.attachsock import FRAME_ERROR, FrameError, error_payload, recv_frame, send_frame
from bkdbg.daemon.convert import attach_output_to_pb
from bkdbg.daemon.messages import TERMINAL_MESSAGES
from bkdbg.daemon.peercred import ACCEPT_BACKLOG, admit
from bkdbg.daemon.processes import Attachment, ManagedProcess
from bkdbg.daemon.service import apply_input, start_attachment
from bkdbg.daemon.session import Session
from bkdbg.errors import BkdbgError, UsageError

logger = logging.getLogger(__name__)


class AttachListener:
    """Serves attach streams of `session` on `path` to processes of `uid` only."""

    def __init__(self, path: Path, session: Session, uid: int | None = None) -> None:
        self.path = path
        self.session = session
        self.uid = os.getuid() if uid is None else uid
        self.rejected = 0
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}

    def start(self) -> None:
        """Bind the socket (mode 0600) and start accepting."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(os.fspath(self.path))
        os.chmod(self.path, 0o600)
        listener.listen(ACCEPT_BACKLOG)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, name="attach-accept",
                                        daemon=True)
        self._thread.start()
        logger.info("attach socket listening on %s (uid %d only)", self.path, self.uid)

    def close(self, grace: float = 2.0) -> None:
        """Stop accepting, wait up to `grace` s for the connections to end, then close them.

        Call it after `Session.close`, which queues Closed for every attachment, so that
        each client reads Closed before its connection ends.
        """
        self._closing.set()
        if self._listener is not None:
            # shutdown wakes the accept() of the other thread; close alone does not on Linux
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        if self._thread is not None:
            self._thread.join(timeout=2)
        deadline = time.monotonic() + grace
        with self._lock:
            connections = list(self._connections.items())
        for conn, thread in connections:
            thread.join(max(0.0, deadline - time.monotonic()))
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if not self._closing.is_set():
                    logger.exception("accept on %s failed", self.path)
                return
            if not admit(conn, self.uid, "an attach connection"):
                self.rejected += 1
                conn.close()
                continue
            self._serve_in_thread(conn)

    def _serve_in_thread(self, conn: socket.socket) -> None:
        thread = threading.Thread(target=self._serve, args=(conn,), name="attach-conn",
                                  daemon=True)
        with self._lock:
            self._connections[conn] = thread
        thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            started = self._start(conn)
            if started is not None:
                serve_attachment(conn, self.session, *started)
        except (OSError, FrameError, DecodeError) as exc:
            logger.info("attach connection ended: %s", exc)
        finally:
            with self._lock:
                self._connections.pop(conn, None)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _start(self, conn: socket.socket) -> tuple[ManagedProcess, Attachment] | None:
        """Read the start message and attach; on failure send the error and return None."""
        frame = recv_frame(conn)
        first = pb.AttachInput()
        if frame is not None:
            first.ParseFromString(frame[1])
        try:
            if first.WhichOneof("input") != "start":
                raise UsageError(
                    "invalid attach request: the first message must be start: "
                    "use the same bkdbg version for client and server"
                )
            return start_attachment(self.session, first.start)
        except BkdbgError as exc:
            logger.info("attach failed: %s: %s", type(exc).__name__, exc)
            send_frame(conn, error_payload(exc), FRAME_ERROR)
            return None


def serve_attachment(conn: socket.socket, session: Session, process: ManagedProcess,
                     attachment: Attachment) -> None:
    """Send the attachment's output until a final message or detach, with a reader thread."""
    clients = session.clients
    clients.stream_opened(attachment.client_id)
    reader = threading.Thread(
        target=pump_socket_input, args=(conn, process, attachment),
        name=f"attach-in-{process.id}-{attachment.client_id}", daemon=True,
    )
    reader.start()
    try:
        send_outputs(conn, attachment)
    finally:
        process.detach(attachment)
        clients.stream_closed(attachment.client_id)
        # wakes the reader when the output side ended first
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        reader.join(timeout=2)


def send_outputs(conn: socket.socket, attachment: Attachment) -> None:
    """Send queued output to the client until a final message, or until detach aborts the queue."""
    while (message := attachment.queue.get_joined()) is not None:
        send_frame(conn, attach_output_to_pb(message).SerializeToString())
        if isinstance(message, TERMINAL_MESSAGES):
            return


def pump_socket_input(conn: socket.socket, process: ManagedProcess,
                      attachment: Attachment) -> None:
    """Forward the client's input to the process until the client shuts down its side."""
    try:
        while (frame := recv_frame(conn)) is not None:
            request = pb.AttachInput()
            request.ParseFromString(frame[1])
            apply_input(request, process, attachment)
    except (OSError, FrameError, DecodeError) as exc:
        logger.debug("attach input of client %s ended: %s", attachment.client_id, exc)
    # the end of input is how a client detaches, after its last input
    process.detach(attachment)

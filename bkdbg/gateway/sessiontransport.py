"""The ways the session's HTTP/2 connection reaches BuildKit.

The session (bkdbg.gateway.session) serves an HTTP/2 connection on which BuildKit is the
client. Its bytes travel one of three ways, the cheapest one the connection allows:

* ``docker://``: a connection of its own upgraded by the engine's ``POST /session``,
  which then carries the session's bytes as they are (buildx's docker driver does the
  same). The engine then has no gRPC messages to unwrap. A build of 20,000 small files
  and 200 MB, whose content the engine's cache already held, cost the engine 2.6 CPU
  seconds instead of 4.0 (Docker Engine 26.1.5 on a 2-CPU VM, two builds each way).
* ``unix://``: `Control.Session` on an HTTP/2 connection of its own (`H2StreamCall`).
* otherwise: `Control.Session` on the grpcio channel.

Each transport sends what the session server queues in its outbox, in a thread of its
own, until the outbox closes. Its `received()` yields what BuildKit sends until the
connection ends.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from bkdbg.buildkit_proto import control_pb2, control_pb2_grpc
from bkdbg.errors import BuildkitError
from bkdbg.gateway.connection import ControlClient, H2Dialer, SessionDialer
from bkdbg.gateway.h2client import H2StreamCall
from bkdbg.gateway.h2frames import Outbox

logger = logging.getLogger(__name__)

SESSION_METHOD = "/moby.buildkit.v1.Control/Session"
# max bytes per write to BuildKit, below the 4 MiB messages Docker Engine's gRPC server takes
BATCH_SIZE = 1024 * 1024
READ_SIZE = 256 * 1024  # bytes per socket read of the /session connection


class SessionTransport(Protocol):
    """A started connection that carries the session's bytes to and from BuildKit."""

    @property
    def method(self) -> str:
        """What opened the connection, for messages: the RPC or the HTTP request."""
        ...

    def received(self) -> Iterator[bytes]:
        """Yield what BuildKit sends until the connection ends.

        Raises grpc.RpcError when `Control.Session` fails.
        """
        ...

    def cancel(self) -> None:
        """End the connection, so that `received` ends or raises CANCELLED."""
        ...


def open_transport(
    control: control_pb2_grpc.ControlStub,
    metadata: Sequence[tuple[str, str]],
    outbox: Outbox,
    name: str,
) -> SessionTransport:
    """Open the cheapest transport `control` allows and start sending `outbox` on it.

    `metadata` are the session's ``x-docker-expose-session-*`` pairs, and `name` names
    the writer thread. Raises BuildkitError when a connection of its own cannot be opened.
    """
    if isinstance(control, ControlClient):
        if control.session_dialer is not None:
            try:
                return EngineSession(control.session_dialer, metadata, outbox, name)
            except OSError as exc:
                logger.warning("POST /session failed, using Control.Session instead: %s", exc)
        if control.h2_dialer is not None:
            return SessionStream(control.h2_dialer, metadata, outbox)
    return ChannelSession(control, metadata, outbox)


def _messages(outbox: Outbox) -> Iterator[control_pb2.BytesMessage]:
    while (data := outbox.take(BATCH_SIZE)) is not None:
        yield control_pb2.BytesMessage(data=data)


class ChannelSession:
    """`Control.Session` on the grpcio channel, whose request thread sends the outbox."""

    method = "Control.Session"

    def __init__(
        self,
        control: control_pb2_grpc.ControlStub,
        metadata: Sequence[tuple[str, str]],
        outbox: Outbox,
    ) -> None:
        self._call: Any = control.Session(_messages(outbox), metadata=metadata)

    def received(self) -> Iterator[bytes]:
        for message in self._call:
            yield message.data

    def cancel(self) -> None:
        self._call.cancel()


class SessionStream:
    """`Control.Session` on an HTTP/2 connection of its own, outside grpcio."""

    method = "Control.Session"

    def __init__(self, dial: H2Dialer, metadata: Sequence[tuple[str, str]], outbox: Outbox):
        try:
            sock, initial = dial()
        except OSError as exc:
            raise BuildkitError(
                f"{self.method} failed: {exc}: check that BuildKit runs and retry"
            ) from exc
        self._call = H2StreamCall(
            sock,
            initial,
            SESSION_METHOD,
            metadata,
            _messages(outbox),
            control_pb2.BytesMessage.FromString,
        )
        self._call.start()

    def received(self) -> Iterator[bytes]:
        for batch in self._call.batches():
            yield b"".join(message.data for message in batch)

    def cancel(self) -> None:
        self._call.cancel()


class EngineSession:
    """A connection upgraded by Docker Engine's ``POST /session``, carrying raw bytes.

    Raises OSError when the engine cannot be reached or rejects the upgrade.
    """

    method = "POST /session"

    def __init__(
        self,
        dial: SessionDialer,
        metadata: Sequence[tuple[str, str]],
        outbox: Outbox,
        name: str,
    ) -> None:
        self._sock, self._initial = dial(metadata)
        self._cancelled = False
        # held around every use of the socket by the writer, so that the reader closes
        # it only between two writes
        self._send_lock = threading.Lock()
        writer = threading.Thread(target=self._send, args=(outbox,), name=name, daemon=True)
        # not joined: it ends when the outbox closes or the connection drops
        writer.start()

    def _send(self, outbox: Outbox) -> None:
        try:
            while (data := outbox.take(BATCH_SIZE)) is not None:
                with self._send_lock:
                    self._sock.sendall(data)
            with self._send_lock:
                self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            logger.debug("%s: sending ended: %s", self.method, exc)

    def received(self) -> Iterator[bytes]:
        reason = "BuildKit closed the connection"
        try:
            if self._initial:
                yield self._initial
            buffer = bytearray(READ_SIZE)
            while count := self._sock.recv_into(buffer):
                yield bytes(buffer[:count])
        except OSError as exc:
            reason = f"the connection to BuildKit failed: {exc}"
        finally:
            with self._send_lock:
                self._sock.close()
        if not self._cancelled:
            logger.warning("%s: %s", self.method, reason)

    def cancel(self) -> None:
        self._cancelled = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already disconnected or closed

"""The calls of the session's HTTP/2 server: streams, call details and the servicer context."""

from __future__ import annotations

import base64
import queue
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn, Protocol

import grpc

from bkdbg.gateway.h2frames import DEFAULT_WINDOW


class StreamCancelled(Exception):
    """The peer reset the stream, or the connection ended, while a handler used it."""


class AbortRpc(Exception):
    """Raised by `ServerContext.abort` to end a call with a status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class ResponseBatch(list[Any]):
    """Responses of one call that the server sends together, in as few frames as it can.

    A handler yields a batch in place of single responses to save the per-message cost
    of framing and of waking the connection's writer. The server serializes each item
    as its own gRPC message, so the peer receives the same messages either way.
    """


class Metadatum(NamedTuple):
    key: str
    value: str | bytes


@dataclass
class CallDetails:
    """The call details that a GenericRpcHandler uses to pick the method handler."""

    method: str
    invocation_metadata: tuple[tuple[str, str | bytes], ...]


@dataclass
class H2Stream:
    """One gRPC call on the connection."""

    id: int
    method: str = ""
    metadata: tuple[Metadatum, ...] = ()
    send_window: int = DEFAULT_WINDOW
    requests: queue.SimpleQueue[bytes | None] = field(default_factory=queue.SimpleQueue)
    buffer: bytearray = field(default_factory=bytearray)
    unacked: int = 0  # received bytes not yet returned to the peer's window
    remote_closed: bool = False
    cancelled: bool = False
    finished: bool = False
    headers_sent: bool = False
    callbacks: list[Callable[[], None]] = field(default_factory=list)


class CallOwner(Protocol):
    """The interface of the server that runs a call's ServerContext and RequestStream."""

    def add_callback(self, stream: H2Stream, callback: Callable[[], None]) -> bool: ...

    def cancel_stream(self, stream_id: int) -> None: ...

    def consumed(self, stream: H2Stream, size: int) -> None: ...


class RequestStream:
    """The request messages of one call: the request iterator that handlers receive.

    Besides waiting in `next()`, a handler can ask `ready()` whether a message or the end
    of the requests has arrived, and so read requests between its responses without a
    thread of its own.
    """

    def __init__(
        self, owner: CallOwner, stream: H2Stream, deserialize: Callable[[bytes], Any]
    ) -> None:
        self._owner = owner
        self._stream = stream
        self._deserialize = deserialize
        self._ended = False

    def __iter__(self) -> RequestStream:
        return self

    def __next__(self) -> Any:
        if self._ended:
            raise StopIteration
        message = self._stream.requests.get()
        if message is None:
            self._ended = True
            raise StopIteration
        self._owner.consumed(self._stream, len(message) + 5)  # with its gRPC prefix
        return self._deserialize(message)

    def ready(self) -> bool:
        """Return whether `next()` returns without waiting."""
        return self._ended or not self._stream.requests.empty()


class ServerContext(grpc.ServicerContext):
    """The part of grpc.ServicerContext that session services use, for one H2Stream."""

    def __init__(self, server: CallOwner, stream: H2Stream) -> None:
        self._server = server
        self._stream = stream
        self._code: grpc.StatusCode | None = None
        self._details = ""

    def invocation_metadata(self) -> tuple[Metadatum, ...]:
        return self._stream.metadata

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise AbortRpc(code, details)

    def abort_with_status(self, status: grpc.Status) -> NoReturn:
        raise AbortRpc(status.code, status.details)

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return self._server.add_callback(self._stream, callback)

    def is_active(self) -> bool:
        return not (self._stream.cancelled or self._stream.finished)

    def cancel(self) -> bool:
        self._server.cancel_stream(self._stream.id)
        return True

    def time_remaining(self) -> float:
        return float("inf")  # BuildKit sets no deadline on session calls

    def peer(self) -> str:
        return "buildkit-session"

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def auth_context(self) -> dict[str, Any]:
        return {}

    def send_initial_metadata(self, initial_metadata: Any) -> None:
        """Not supported: responses carry only the standard headers."""

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        """Not supported: trailers carry only the status."""

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details


def metadatum(name: str, value: str) -> Metadatum:
    if name.endswith("-bin"):
        padded = value + "=" * (-len(value) % 4)
        return Metadatum(name, base64.b64decode(padded))
    return Metadatum(name, value)

"""The client's side of the server's gRPC calls: error translation and the streaming calls.

This is the one place where `grpc.RpcError` from a server becomes a `bkdbg.errors`
exception. It is the class named in the `bkdbg-error` trailing metadata when the server
sent one, else a class chosen by status code (UNAVAILABLE means that no server responds at
the socket). `GrpcAttachStream` attaches to a process of a server without an attach
socket, and `EventStream` follows a server's events.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from bkdbg import errors
from bkdbg.daemon import api_pb2 as pb
from bkdbg.daemon.attachsock import AttachStream
from bkdbg.daemon.convert import ERROR_KEY, attach_output_from_pb, event_from_pb
from bkdbg.daemon.instances import InstancePaths
from bkdbg.daemon.messages import ERROR_CLASSES, AttachMessage, ServerEvent
from bkdbg.errors import BkdbgError, ServerError, ServerUnreachable, UsageError

if TYPE_CHECKING:
    from bkdbg.daemon.client import DaemonClient

logger = logging.getLogger(__name__)

DETACH_TIMEOUT = 1.0  # seconds for the server to take the last input of a closing stream


# ---------------------------------------------------------------- errors


def translate(exc: grpc.RpcError, paths: InstancePaths) -> BkdbgError:
    """Return the bkdbg error for a failed call to the server of `paths`."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else "") or str(code)
    kind = _error_kind(exc)
    if kind in ERROR_CLASSES:
        return ERROR_CLASSES[kind](details)
    instance = paths.instance_id
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ServerUnreachable(
            f"bkdbg server {instance} is not running or not responding: {paths.socket}: "
            "run bkdbg list"
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return UsageError(details)
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
        return errors.NotAttached(details)
    return ServerError(
        f"bkdbg server {instance} failed: {details}: see its log {paths.log_file}"
    )


def _error_kind(exc: grpc.RpcError) -> str:
    if not isinstance(exc, grpc.Call):
        return ""
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_KEY:
            return str(value)
    return ""


# ---------------------------------------------------------------- streams


class GrpcAttachStream(AttachStream):
    """An attach stream on the gRPC Attach call, for servers without an attach socket."""

    def __init__(self, client: DaemonClient, start: pb.AttachStart) -> None:
        self._client = client
        self._requests: queue.Queue[pb.AttachInput | None] = queue.Queue()
        self._requests.put(pb.AttachInput(start=start))
        self._closed = False
        # gRPC fails a call read from two threads at once (error 8, too many operations)
        self._read_lock = threading.Lock()
        self._call = client.stub.Attach(self._request_iterator())
        self._expect_attached(client.instance_id)

    def _request_iterator(self) -> Iterator[pb.AttachInput]:
        while (request := self._requests.get()) is not None:
            yield request

    def _send(self, request: pb.AttachInput) -> None:
        if not self._closed:
            self._requests.put(request)

    def _after_final(self) -> None:
        self._end_requests()

    def _next(self) -> AttachMessage | None:
        try:
            with self._read_lock:
                return attach_output_from_pb(next(self._call))
        except StopIteration:
            self._end_requests()
            return None
        except grpc.RpcError as exc:
            self._end_requests()
            if self._cancelled_here(exc):
                return None
            raise translate(exc, self._client.paths) from exc

    def _discard_output(self) -> None:
        with contextlib.suppress(grpc.RpcError, StopIteration):
            while True:
                with self._read_lock:
                    next(self._call)

    def _cancelled_here(self, exc: grpc.RpcError) -> bool:
        cancelled = isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.CANCELLED
        return cancelled and (self._closed or self._client.closed)

    def _end_requests(self) -> None:
        # lets gRPC's thread that reads the request iterator finish
        self._requests.put(None)

    def close(self, timeout: float = DETACH_TIMEOUT) -> None:
        """Detach: the process keeps running, and the server keeps its output again.

        Input sent before is delivered first: the server ends the stream once it read it,
        or the stream is cancelled after `timeout` seconds.
        """
        if self._closed:
            return
        self._closed = True
        ended = threading.Event()
        self._call.add_done_callback(lambda _: ended.set())
        self._end_requests()
        # gRPC reports the end of the call only once the output before it was read
        threading.Thread(target=self._discard_output, name="attach-discard", daemon=True).start()
        if not ended.wait(timeout):
            logger.debug("attach stream of %s did not end; cancelling it", self._client.instance_id)
        self._call.cancel()


class EventStream:
    """Server events for one client, until `close()` or the server ends the stream."""

    def __init__(self, client: DaemonClient) -> None:
        self._client = client
        self._closed = False
        self._call = client.stub.Events(pb.EventsRequest(client_id=client.client_id))

    def __iter__(self) -> Iterator[ServerEvent]:
        try:
            for event in self._call:
                yield event_from_pb(event)
        except grpc.RpcError as exc:
            cancelled = isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.CANCELLED
            if cancelled and (self._closed or self._client.closed):
                return
            raise translate(exc, self._client.paths) from exc

    def close(self) -> None:
        self._closed = True
        self._call.cancel()

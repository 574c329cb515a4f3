"""The client session: gRPC services that BuildKit calls back on during a build.

The session is an HTTP/2 connection on which BuildKit is the gRPC client and we are
the server. It travels inside `Control.Session`, a bidirectional stream of raw bytes, or
for a Docker Engine on a connection of its own (see bkdbg.gateway.sessiontransport).
The session serves it with `H2Server` (bkdbg.gateway.h2server): one thread feeds it
the bytes BuildKit sends, and the transport's writer thread sends the frames it queues,
in batches. No socket or port is opened for BuildKit to dial.

Served: FileSync (local dirs: context, Dockerfile, named contexts), FileSend (exports),
Auth (registry credentials), Secrets, SSH (agent forwarding) and Health/Check, which
BuildKit calls every 5 s and which closes the session after two failures
(session/grpc.go, monitorHealth).
"""

from __future__ import annotations

import logging
import secrets as randomness
import string
import threading
from collections.abc import Mapping, Sequence
from concurrent import futures
from typing import Protocol

import grpc

from bkdbg.buildkit_proto import control_pb2_grpc
from bkdbg.errors import BuildkitError
from bkdbg.gateway.auth import AuthService
from bkdbg.gateway.filesend import ExportDestination, FileSendService
from bkdbg.gateway.filesync import FileSyncService, LocalDir
from bkdbg.gateway.h2frames import ProtocolError
from bkdbg.gateway.h2server import H2Server
from bkdbg.gateway.secrets import SecretsService
from bkdbg.gateway.sessiontransport import SessionTransport, open_transport
from bkdbg.gateway.sshforward import SSHService
from bkdbg.options import SecretSpec, SSHSpec

logger = logging.getLogger(__name__)

HEADER_ID = "x-docker-expose-session-uuid"
HEADER_NAME = "x-docker-expose-session-name"
HEADER_SHARED_KEY = "x-docker-expose-session-sharedkey"
HEADER_METHOD = "x-docker-expose-session-grpc-method"

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVING = b"\x08\x01"  # grpc.health.v1.HealthCheckResponse{status: SERVING}

ID_ALPHABET = string.ascii_lowercase + string.digits
ID_LENGTH = 25  # as BuildKit's identity.NewID

# Each open call uses a thread for its whole life: health checks, a DiffCopy per local
# dir (BuildKit opens several at once), exports and one per SSH agent connection of a
# RUN step. The pool starts its threads on demand, so a generous size costs nothing
# while idle, and it keeps health checks answered during a large upload.
SERVER_THREADS = 32
START_TIMEOUT = 10.0  # seconds to wait for BuildKit's first bytes on the session stream
STOP_TIMEOUT = 5.0  # seconds for the pump thread to end in close()


class SessionService(Protocol):
    """A service of the session: its handler, the methods it announces, its lifetime."""

    @property
    def METHODS(self) -> Sequence[str]: ...  # noqa: N802 (a class constant in each service)

    def handler(self) -> grpc.GenericRpcHandler: ...

    def start(self) -> None: ...

    def close(self) -> None: ...


def new_session_id() -> str:
    return "".join(randomness.choice(ID_ALPHABET) for _ in range(ID_LENGTH))


def _health_check(request: bytes, context: grpc.ServicerContext) -> bytes:
    return SERVING


def health_handler() -> grpc.GenericRpcHandler:
    """Return a Health/Check handler on raw bytes (no grpcio-health-checking needed)."""
    method: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(_health_check)
    return grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": method})


class Session:
    """One BuildKit session, from `start()` until `close()` (also a context manager).

    `control` is a ControlStub or a channel to BuildKit; with a `ControlClient` (what
    `Connection.control` returns) the session may run on a connection of its own.
    `local_dirs` maps the names BuildKit requests (`context`, `dockerfile`, named
    contexts) to directories.
    `exports` receive what the exporters of a solve send back, by exporter index.
    """

    def __init__(
        self,
        control: control_pb2_grpc.ControlStub | grpc.Channel,
        shared_key: str,
        local_dirs: Mapping[str, LocalDir | str] | None = None,
        secrets: Sequence[SecretSpec] = (),
        ssh: Sequence[SSHSpec] = (),
        exports: Sequence[ExportDestination] | None = None,
        *,
        name: str = "bkdbg",
    ) -> None:
        if isinstance(control, grpc.Channel):
            control = control_pb2_grpc.ControlStub(control)
        self.id = new_session_id()
        self.name = name
        self.shared_key = shared_key
        self._control = control
        dirs = {
            key: value if isinstance(value, LocalDir) else LocalDir(value)
            for key, value in (local_dirs or {}).items()
        }
        self._services: list[SessionService] = [
            FileSyncService(dirs),
            FileSendService(exports or ()),
            AuthService(),
            SecretsService(secrets),
            SSHService(ssh),
        ]
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self._first_bytes = threading.Event()
        self._start_settled = threading.Event()  # set on the first bytes or the stream's end
        self._ended = threading.Event()
        self._end_error: grpc.RpcError | None = None
        self._executor: futures.ThreadPoolExecutor | None = None
        self._server: H2Server | None = None
        self._transport: SessionTransport | None = None
        self._incoming: threading.Thread | None = None

    @property
    def methods(self) -> list[str]:
        """The full gRPC method paths the session serves, as announced to BuildKit."""
        served = [HEALTH_CHECK]
        for service in self._services:
            served.extend(service.METHODS)
        return served

    @property
    def ended(self) -> bool:
        """True once the session stream has ended, by close() or by BuildKit."""
        return self._ended.is_set()

    def __enter__(self) -> Session:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Serve the session and open its connection to BuildKit; wait until BuildKit responds.

        Raises UsageError for an unusable --ssh value, and BuildkitError when BuildKit
        rejects or drops the session or sends nothing within 10 s. Call `close()` in
        every case.
        """
        with self._lock:
            if self._started or self._closed:
                raise RuntimeError("a Session can be started only once")
            self._started = True
        for service in self._services:
            service.start()
        self._executor = futures.ThreadPoolExecutor(
            max_workers=SERVER_THREADS, thread_name_prefix=f"session-{self.id[:8]}"
        )
        handlers = [health_handler()] + [service.handler() for service in self._services]
        self._server = H2Server(handlers, self._executor, name=f"session {self.id[:8]}")
        self._server.start()
        self._transport = open_transport(
            self._control, self._metadata(), self._server.outbox, f"session-{self.id[:8]}-out"
        )
        self._incoming = threading.Thread(
            target=self._pump_incoming, name=f"session-{self.id[:8]}-in", daemon=True
        )
        self._incoming.start()
        self._wait_started()
        logger.info(
            "session %s started on %s (%d methods)",
            self.id,
            type(self._transport).__name__,
            len(self.methods),
        )

    def _metadata(self) -> list[tuple[str, str]]:
        metadata = [
            (HEADER_ID, self.id),
            (HEADER_NAME, self.name),
            (HEADER_SHARED_KEY, self.shared_key),
        ]
        metadata.extend((HEADER_METHOD, method) for method in self.methods)
        return metadata

    def _wait_started(self) -> None:
        """Wait for BuildKit's HTTP/2 preface, the first bytes it sends on a new session."""
        self._start_settled.wait(START_TIMEOUT)
        if self._first_bytes.is_set():
            return
        assert self._transport is not None
        method = self._transport.method
        if self._end_error is not None:
            code = self._end_error.code()
            details = self._end_error.details()
            raise BuildkitError(
                f"{method} failed: BuildKit returned {code.name}: {details}: "
                "check that BuildKit runs and accepts sessions"
            ) from self._end_error
        if self._ended.is_set():
            raise BuildkitError(
                f"{method} failed: BuildKit ended the session at once: "
                "check the BuildKit daemon's log"
            )
        raise BuildkitError(
            f"{method} failed: BuildKit sent nothing in {START_TIMEOUT:.0f} s: "
            "check that BuildKit is healthy and retry"
        )

    def _pump_incoming(self) -> None:
        """Feed the server what BuildKit sends, until the connection ends."""
        assert self._server is not None and self._transport is not None
        try:
            for data in self._transport.received():
                self._first_bytes.set()
                self._start_settled.set()
                self._server.feed(data)
        except grpc.RpcError as exc:
            self._end_error = exc
            if not self._closed:
                logger.warning("session %s ended by BuildKit: %s", self.id, exc.code().name)
        except ProtocolError as exc:
            logger.warning("session %s: BuildKit broke the HTTP/2 protocol: %s", self.id, exc)
            self._transport.cancel()
        finally:
            self._ended.set()
            self._start_settled.set()
            self._server.close()

    def close(self) -> None:
        """End the connection and every call the session serves; safe to repeat."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._transport is not None:
            self._transport.cancel()
        if self._server is not None:
            self._server.close()
        if self._incoming is not None:
            self._incoming.join(STOP_TIMEOUT)
        if self._executor is not None:
            # handlers still running see their calls cancelled at their next send
            self._executor.shutdown(wait=False, cancel_futures=True)
        for service in self._services:
            service.close()
        logger.info("session %s closed", self.id)

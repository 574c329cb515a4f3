"""gRPC channels to BuildKit, and the translation of BuildKit's gRPC errors.

`connect()` tries each candidate address in order and returns the first one at which
BuildKit responds to a cheap `Control.Info` call. `map_rpc_error()` turns a `grpc.RpcError`
from BuildKit into the matching `bkdbg.errors` class; the rest of `bkdbg/gateway/` uses
it so that gRPC errors are translated in this one place.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import grpc

from bkdbg.buildkit_proto import control_pb2, control_pb2_grpc
from bkdbg.errors import (
    BkdbgError,
    BuildCancelled,
    BuildkitError,
    BuildkitLost,
    BuildkitUnreachable,
    UsageError,
)
from bkdbg.gateway.address import (
    DEFAULT_BUILDKITD_SOCKET,
    Address,
    TLSOptions,
    candidate_addresses,
    parse_address,
)
from bkdbg.gateway.dockerbridge import DockerBridge, dial_engine, dial_session

logger = logging.getLogger(__name__)

H2Dialer = Callable[[], tuple[socket.socket, bytes]]
"""Opens a connection that speaks HTTP/2 to BuildKit; returns it and bytes already read."""

SessionDialer = Callable[[Sequence[tuple[str, str]]], tuple[socket.socket, bytes]]
"""Opens a connection for a client session with the given headers, and returns it with
the bytes already read."""

MAX_MESSAGE_LENGTH = 16 * 1024 * 1024  # bytes, the limit buildctl and buildx set too

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_LENGTH),
    ("grpc.max_receive_message_length", MAX_MESSAGE_LENGTH),
    # grpc-go servers (buildkitd, dockerd) close connections that ping more often than every
    # 5 minutes unless they set a keepalive policy, and neither does (moby/buildkit, moby/moby).
    ("grpc.keepalive_time_ms", 5 * 60 * 1000),
    ("grpc.keepalive_timeout_ms", 20 * 1000),
    ("grpc.http2.max_pings_without_data", 0),
]

START_HINT = (
    "start buildkitd or Docker, or pass --addr (scripts/local-buildkit.sh start runs a local one)"
)


class ControlClient(control_pb2_grpc.ControlStub):  # type: ignore[misc]
    """A stub of BuildKit's Control service that also carries its connection's dialers.

    `Session` uses them to carry its connection outside grpcio (see `Connection`).
    """

    def __init__(
        self,
        channel: grpc.Channel,
        h2_dialer: H2Dialer | None,
        session_dialer: SessionDialer | None,
    ) -> None:
        super().__init__(channel)
        self.h2_dialer = h2_dialer
        self.session_dialer = session_dialer


@dataclass
class Connection:
    """An open gRPC channel to BuildKit.

    `address` is the address used, in canonical form (``docker://`` resolved to its
    engine). `warnings` contains lines for the CLI to print, such as plain TCP without TLS.
    `bridge` is the Docker bridge behind ``docker://`` and ``docker-container://``.
    `h2_dialer` opens a new HTTP/2 connection to BuildKit outside grpcio (see `h2client`),
    for ``unix://`` and ``docker://`` only; it is None for the other schemes.
    `session_dialer` opens a connection through the Docker Engine's session endpoint, for
    ``docker://`` only.
    """

    address: str
    channel: grpc.Channel
    warnings: list[str] = field(default_factory=list)
    bridge: DockerBridge | None = None
    h2_dialer: H2Dialer | None = None
    session_dialer: SessionDialer | None = None

    @property
    def control(self) -> ControlClient:
        """A stub of BuildKit's Control service on this channel."""
        return ControlClient(self.channel, self.h2_dialer, self.session_dialer)

    def map_error(self, exc: grpc.RpcError, what: str) -> BkdbgError:
        """Translate an RPC error on this connection with `map_rpc_error`."""
        return map_rpc_error(exc, what, self.address)

    def close(self) -> None:
        """Close the channel, then the bridge and its live connections."""
        self.channel.close()
        if self.bridge is not None:
            self.bridge.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class _Unreachable(Exception):
    """The reason one candidate address did not respond, in a few words."""


def connect(
    address: str | None,
    tls: TLSOptions | None = None,
    timeout: float = 5.0,
    *,
    environ: Mapping[str, str] | None = None,
    default_socket: str = DEFAULT_BUILDKITD_SOCKET,
) -> Connection:
    """Connect to the first candidate address at which BuildKit responds.

    `address` is `--addr` (None: ``BUILDKIT_HOST``, then `default_socket` when it exists,
    then the Docker Engine at ``DOCKER_HOST``). Each candidate must respond to `Control.Info`
    within `timeout` seconds. Raises UsageError for an invalid address or TLS option, and
    BuildkitUnreachable naming every address tried when none responds.
    """
    environ = os.environ if environ is None else environ
    if tls is not None and tls.enabled:
        tls.validate()

    tried: list[str] = []
    reasons: list[str] = []
    for text in candidate_addresses(address, environ, default_socket):
        parsed = parse_address(text, environ)
        _check_tls_scheme(parsed, tls)
        try:
            return _open(parsed, tls, timeout)
        except _Unreachable as exc:
            logger.info("BuildKit not reachable at %s: %s", parsed, exc)
            tried.append(parsed.text)
            reasons.append(f"{parsed} ({exc})")

    raise BuildkitUnreachable(
        f"cannot reach BuildKit: tried {', '.join(reasons)}: {START_HINT}", tried
    )


def _check_tls_scheme(address: Address, tls: TLSOptions | None) -> None:
    if tls is not None and tls.enabled and address.scheme != "tcp":
        raise UsageError(
            f"TLS options need a tcp:// address: {address}: pass --addr tcp://HOST:PORT, "
            "or drop --tlscacert, --tlscert, --tlskey and --tlsservername"
        )


def _open(address: Address, tls: TLSOptions | None, timeout: float) -> Connection:
    warnings: list[str] = []
    bridge: DockerBridge | None = None
    if address.scheme == "unix":
        _check_socket(address.path or "")
        channel = grpc.insecure_channel(f"unix:{address.path}", CHANNEL_OPTIONS)
    elif address.scheme == "tcp":
        channel = _tcp_channel(address, tls, warnings)
    else:
        bridge = _start_bridge(address, timeout)
        channel = grpc.insecure_channel(bridge.target, CHANNEL_OPTIONS)

    connection = Connection(
        address.text,
        channel,
        warnings,
        bridge,
        _h2_dialer(address, timeout),
        _session_dialer(address, timeout),
    )
    try:
        _probe(connection, timeout)
    except _Unreachable:
        connection.close()
        raise
    logger.info("connected to BuildKit at %s", address)
    for warning in warnings:
        logger.warning("%s", warning)
    return connection


def _h2_dialer(address: Address, timeout: float) -> H2Dialer | None:
    if address.scheme == "unix":
        return functools.partial(_dial_unix, address.path or "", timeout)
    if address.scheme == "docker":
        return functools.partial(dial_engine, address, timeout)
    return None


def _session_dialer(address: Address, timeout: float) -> SessionDialer | None:
    if address.scheme == "docker":
        return functools.partial(dial_session, address, timeout)
    return None


def _dial_unix(path: str, timeout: float) -> tuple[socket.socket, bytes]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.settimeout(None)
    except OSError:
        sock.close()
        raise
    return sock, b""


def _check_socket(path: str) -> None:
    if not os.path.exists(path):
        raise _Unreachable("no such socket")
    if not os.access(path, os.R_OK | os.W_OK):
        raise _Unreachable("permission denied: run as a user who may open the socket")


def _tcp_channel(address: Address, tls: TLSOptions | None, warnings: list[str]) -> grpc.Channel:
    target = address.engine_url.removeprefix("tcp://")
    if tls is None or not tls.enabled:
        warning = (
            f"connecting to BuildKit at {address} without TLS: anyone who can reach the port "
            "can run builds: pass --tlscacert, --tlscert and --tlskey to use TLS"
        )
        warnings.append(warning)
        return grpc.insecure_channel(target, CHANNEL_OPTIONS)

    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read_optional(tls.ca),
        private_key=_read_optional(tls.key),
        certificate_chain=_read_optional(tls.cert),
    )
    options = list(CHANNEL_OPTIONS)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(target, credentials, options)


def _read_optional(path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise UsageError(
            f"cannot read TLS file: {path}: {exc.strerror}: check its permissions"
        ) from exc


def _start_bridge(address: Address, timeout: float) -> DockerBridge:
    bridge = DockerBridge(address, timeout)
    try:
        bridge.start()
    except BuildkitUnreachable as exc:
        raise _Unreachable(bridge.last_error or str(exc)) from exc
    return bridge


def _probe(connection: Connection, timeout: float) -> None:
    try:
        connection.control.Info(control_pb2.InfoRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        code = _code(exc)
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return  # BuildKit before v0.11 has no Info, but it did respond
        bridge_error = connection.bridge.last_error if connection.bridge else None
        raise _Unreachable(bridge_error or _probe_reason(exc, timeout)) from exc


def _probe_reason(exc: grpc.RpcError, timeout: float) -> str:
    code = _code(exc)
    details = _details(exc)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no response within {timeout:g} s"
    if "http1.x server" in details:
        return "an HTTP/1 server responded, not gRPC: for a Docker Engine use docker://unix://PATH"
    if code == grpc.StatusCode.UNAVAILABLE:
        last = details.rsplit(": ", 1)[-1].strip()
        return last[:1].lower() + last[1:]
    return f"{code.name}: {details}"


def map_rpc_error(exc: grpc.RpcError, what: str, address: str) -> BkdbgError:
    """Translate an RPC error from BuildKit at `address` into a `bkdbg.errors` class.

    `what` names the request, for example ``"Control.Solve"``. UNAVAILABLE becomes
    BuildkitLost, CANCELLED BuildCancelled, and everything else BuildkitError.
    Raise the result ``from exc``.
    """
    code = _code(exc)
    details = _details(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return BuildkitLost(
            f"{what} failed: BuildKit at {address} is unavailable ({details}): "
            "check that BuildKit still runs and retry",
            [address],
        )
    if code == grpc.StatusCode.CANCELLED:
        return BuildCancelled(f"{what} cancelled: {details or 'no reason given'}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return BuildkitError(
            f"{what} timed out: BuildKit at {address} did not respond in time: retry, "
            "or check the BuildKit daemon's load and log"
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return BuildkitError(
            f"{what} not supported: BuildKit at {address} does not implement it ({details}): "
            "use a newer BuildKit"
        )
    return BuildkitError(
        f"{what} failed: BuildKit at {address} returned {code.name}: {details or 'no details'}"
    )


def _code(exc: grpc.RpcError) -> grpc.StatusCode:
    if isinstance(exc, grpc.Call):
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.UNKNOWN


def _details(exc: grpc.RpcError) -> str:
    if isinstance(exc, grpc.Call):
        return str(exc.details() or "")
    return str(exc)

"""`DaemonClient`: the only way the shell talks to a bkdbg server.

Its calls turn `grpc.RpcError` into `bkdbg.errors` exceptions with `rpc.translate`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

import bkdbg
from bkdbg import errors
from bkdbg.daemon import api_pb2 as pb
from bkdbg.daemon import api_pb2_grpc
from bkdbg.daemon.attachsock import AttachStream, SocketAttachStream, connect_attach_socket
from bkdbg.daemon.convert import (
    build_event_from_pb,
    process_info_from_pb,
    server_status_from_pb,
)
from bkdbg.daemon.instances import (
    InstancePaths,
    create_instance,
    ensure_root,
    find_instance,
    read_record,
    resolve_root,
    server_alive,
    wait_pid_gone,
)
from bkdbg.daemon.launcher import LAUNCH_TIMEOUT, spawn_server
from bkdbg.daemon.messages import (
    BuildEvent,
    InstanceInfo,
    ProcessInfo,
    ServerStatus,
    build_error,
)
from bkdbg.daemon.rpc import EventStream, GrpcAttachStream, translate
from bkdbg.errors import BkdbgError, ServerUnreachable
from bkdbg.heap import tune_malloc
from bkdbg.options import BuildOptions

if TYPE_CHECKING:
    from bkdbg.daemon.server import Server

logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 1.0  # seconds for Hello or Info from a server that should be running
STOP_TIMEOUT = 10.0  # seconds for a server to exit after Shutdown
LOST_SERVER_WAIT = 0.5  # seconds for a server's pid to go after its attach connection ended
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]


def client_version() -> str:
    return bkdbg.__version__


# ---------------------------------------------------------------- the client


class DaemonClient:
    """A connection to one server; make one with `launch`, `connect` or `run_in_process`."""

    def __init__(self, paths: InstancePaths, channel: grpc.Channel) -> None:
        self.paths = paths
        self._channel = channel
        self._stub = api_pb2_grpc.DebuggerStub(channel)
        self._server: Server | None = None
        self.client_id = ""
        self.server_pid = 0
        self.server_version = ""
        self.closed = False
        self._said_goodbye = False
        # closed with the client, as closing the channel cancels the gRPC streams
        self._socket_streams: weakref.WeakSet[SocketAttachStream] = weakref.WeakSet()

    @property
    def instance_id(self) -> str:
        return self.paths.instance_id

    @property
    def stub(self) -> api_pb2_grpc.DebuggerStub:
        """The server's gRPC stub, for the streaming calls in `rpc.py`."""
        return self._stub

    @property
    def root(self) -> Path:
        return self.paths.root

    # ------------------------------------------------------------ making clients

    @classmethod
    def launch(cls, root: str | os.PathLike[str] | None = None, debug: bool = False,
               idle_timeout: float | None = None, name: str = "",
               timeout: float = LAUNCH_TIMEOUT) -> DaemonClient:
        """Start a new detached server under `root` and connect to it."""
        root_path = ensure_root(resolve_root(root))
        paths = create_instance(root_path)
        spawn_server(paths, debug, idle_timeout, timeout)
        return cls.connect(root_path, paths.instance_id, name=name)

    @classmethod
    def connect(cls, root: str | os.PathLike[str] | None, instance_id: str,
                timeout: float = PROBE_TIMEOUT, name: str = "",
                check_version: bool = True) -> DaemonClient:
        """Connect to a running server and send Hello.

        Raises UnknownInstance for an id without a directory, ServerUnreachable when the
        server does not respond within `timeout` seconds, and VersionMismatch.
        """
        root_path = resolve_root(root)
        paths = find_instance(root_path, instance_id)
        if paths is None:
            raise errors.UnknownInstance(
                f"no bkdbg server with id {instance_id}: {root_path}: run bkdbg list"
            )
        client = cls(paths, _open_channel(paths))
        try:
            client.hello(name, timeout, check_version)
        except ServerUnreachable:
            client.close(say_goodbye=False)
            raise _unreachable_error(paths) from None
        except BkdbgError:
            client.close(say_goodbye=False)
            raise
        return client

    def own_server(self, server: Server) -> None:
        """Make `close()` stop `server`, which runs in this process (--detach=false)."""
        self._server = server

    # ------------------------------------------------------------ unary calls

    def hello(self, name: str = "", timeout: float = PROBE_TIMEOUT,
              check_version: bool = True) -> str:
        """Register with the server and check its version; returns this client's id."""
        request = pb.HelloRequest(client_version=client_version(), client_pid=os.getpid(),
                                  client_name=name)
        with self._translated():
            response = self._stub.Hello(request, timeout=timeout)
        self.client_id = response.client_id
        self.server_pid = response.server_pid
        self.server_version = response.server_version
        if check_version and response.server_version != client_version():
            raise errors.VersionMismatch(
                f"bkdbg server {self.instance_id} runs version {response.server_version}, "
                f"this client is version {client_version()}: "
                f"stop it with bkdbg kill {self.instance_id}"
            )
        return self.client_id

    def info(self, timeout: float | None = None) -> ServerStatus:
        with self._translated():
            return server_status_from_pb(self._stub.Info(pb.InfoRequest(), timeout=timeout))

    def rollback(self, init: bool = False, term: str | None = None, rows: int = 0,
                 cols: int = 0) -> str:
        """Restart the interactive process in a new container; returns its process id.

        `term` (default: $TERM), `rows` and `cols` describe this client's terminal, for a
        tty process; the same holds for `build`, `reload` and `exec`.
        """
        request = pb.RollbackRequest(init=init, client_id=self.client_id,
                                     terminal=_terminal(term, rows, cols))
        with self._translated():
            return str(self._stub.Rollback(request).process_id)

    def exec(self, args: list[str], env: list[str] | None = None, user: str = "",
             cwd: str = "", tty: bool = False, term: str | None = None, rows: int = 0,
             cols: int = 0) -> str:
        """Start a process in the current container; returns its process id."""
        request = pb.ExecRequest(args=args, env=env or [], user=user, cwd=cwd, tty=tty,
                                 client_id=self.client_id,
                                 terminal=_terminal(term, rows, cols))
        with self._translated():
            return str(self._stub.Exec(request).process_id)

    def list_processes(self) -> list[ProcessInfo]:
        with self._translated():
            response = self._stub.ListProcesses(pb.ListProcessesRequest())
        return [process_info_from_pb(p) for p in response.processes]

    def disconnect(self, client_id: str = "") -> int:
        """End one client's streams, or every other client's; returns how many."""
        request = pb.DisconnectRequest(client_id=client_id, requester_id=self.client_id)
        with self._translated():
            return int(self._stub.Disconnect(request).disconnected)

    def goodbye(self, end_session: bool = False) -> bool:
        """Leave; with end_session the server stops unless another client is there.

        Returns whether the server is stopping.
        """
        request = pb.GoodbyeRequest(client_id=self.client_id, end_session=end_session)
        with self._translated():
            stopping = bool(self._stub.Goodbye(request).shutting_down)
        self._said_goodbye = True
        return stopping

    def cancel_build(self) -> bool:
        """Cancel the server's running build; return False when none was running."""
        request = pb.CancelBuildRequest(client_id=self.client_id)
        with self._translated():
            return bool(self._stub.CancelBuild(request).cancelled)

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop the server: release containers, cancel the build, exit; then wait for it."""
        with self._translated():
            self._stub.Shutdown(pb.ShutdownRequest(), timeout=timeout)
        self._said_goodbye = True
        if wait:
            self.wait_stopped()

    def wait_stopped(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Wait until the server process is gone; returns False after `timeout` s."""
        if self._server is not None:
            return self._server.wait_stopped(timeout)
        return wait_pid_gone(self.server_pid, self.instance_id, timeout)

    # ------------------------------------------------------------ streams

    def build(self, options: BuildOptions, term: str | None = None, rows: int = 0,
              cols: int = 0) -> Iterator[BuildEvent]:
        """Start the build; yields BuildProgress batches, then one BuildDone."""
        request = pb.BuildRequest(options_json=options.to_json(), client_id=self.client_id,
                                  terminal=_terminal(term, rows, cols))
        return self._build_events(self._stub.Build(request))

    def reload(self, term: str | None = None, rows: int = 0,
               cols: int = 0) -> Iterator[BuildEvent]:
        """Rebuild with the same options; yields like `build`."""
        request = pb.ReloadRequest(client_id=self.client_id, terminal=_terminal(term, rows, cols))
        return self._build_events(self._stub.Reload(request))

    def _build_events(self, call: Any) -> Iterator[BuildEvent]:
        try:
            with self._translated():
                for event in call:
                    yield build_event_from_pb(event)
        finally:
            # a caller that stops early leaves the build running in the server
            call.cancel()

    def attach(self, process_id: str = "", tty: bool = False, rows: int = 0, cols: int = 0,
               read_only: bool = False, replay: bool = True) -> AttachStream:
        """Attach to a process (empty id: the interactive one); raises NotAttached if none.

        The stream uses the server's attach socket, or the gRPC Attach call when the
        server has no attach socket.
        """
        start = pb.AttachStart(process_id=process_id, client_id=self.client_id, tty=tty,
                               rows=rows, cols=cols, read_only=read_only, replay=replay)
        tune_malloc()  # before frames of up to 1 MiB arrive
        try:
            sock = connect_attach_socket(self.paths)
        except OSError as exc:
            raise ServerUnreachable(
                f"cannot connect to the attach socket of bkdbg server {self.instance_id}: "
                f"{self.paths.attach_socket}: {exc}"
            ) from exc
        if sock is None:
            return GrpcAttachStream(self, start)
        stream = SocketAttachStream(sock, self.paths, start, lambda: self.closed,
                                    self._lost_server_error)
        self._socket_streams.add(stream)
        return stream

    def _lost_server_error(self) -> BkdbgError:
        # the kernel closes a killed server's sockets a moment before its pid is gone
        if self._server is None:
            wait_pid_gone(self.server_pid, self.instance_id, LOST_SERVER_WAIT)
        return _unreachable_error(self.paths)

    def events(self) -> EventStream:
        return EventStream(self)

    # ------------------------------------------------------------ closing

    def close(self, say_goodbye: bool = True) -> None:
        """Close the connection; a server in this process stops."""
        if say_goodbye and not self._said_goodbye and self.client_id:
            with contextlib.suppress(BkdbgError):
                with self._translated():
                    self._stub.Goodbye(pb.GoodbyeRequest(client_id=self.client_id),
                                       timeout=PROBE_TIMEOUT)
            self._said_goodbye = True
        self.closed = True
        for stream in list(self._socket_streams):
            stream.abort()
        self._channel.close()
        if self._server is not None:
            self._server.request_stop("its in-process client closed")
            self._server.wait_stopped(STOP_TIMEOUT)

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except grpc.RpcError as exc:
            raise translate(exc, self.paths) from exc


# ---------------------------------------------------------------- instances


def list_instances(root: str | os.PathLike[str] | None = None) -> list[InstanceInfo]:
    """Probe every instance under `root`; stale ones are returned once and removed."""
    from bkdbg.daemon import admin

    return admin.list_instances(root)


def kill_instance(root: str | os.PathLike[str] | None, instance_id: str) -> str:
    """Stop a server and remove its directory; returns "stopped", or "stale" for a dead one."""
    from bkdbg.daemon import admin

    return admin.kill_instance(root, instance_id)


# ---------------------------------------------------------------- helpers


def _terminal(term: str | None, rows: int, cols: int) -> pb.Terminal:
    term = os.environ.get("TERM", "") if term is None else term
    return pb.Terminal(term=term, rows=rows, cols=cols)


def open_client(paths: InstancePaths) -> DaemonClient:
    """Return a client for the server of `paths` without saying Hello (for probes)."""
    return DaemonClient(paths, _open_channel(paths))


def _open_channel(paths: InstancePaths) -> grpc.Channel:
    return grpc.insecure_channel(f"unix:{paths.socket}", options=CHANNEL_OPTIONS)


def _unreachable_error(paths: InstancePaths) -> ServerUnreachable:
    record = read_record(paths)
    if record.pid is not None and not server_alive(record):
        return ServerUnreachable(
            f"bkdbg server {paths.instance_id} is not running: its process {record.pid} "
            "is gone: run bkdbg list to remove it"
        )
    return ServerUnreachable(
        f"bkdbg server {paths.instance_id} does not answer: {paths.socket}: "
        f"see its log {paths.log_file}, or stop it with bkdbg kill {paths.instance_id}"
    )


__all__ = [
    "AttachStream",
    "GrpcAttachStream",
    "SocketAttachStream",
    "DaemonClient",
    "EventStream",
    "InstanceInfo",
    "open_client",
    "build_error",
    "kill_instance",
    "list_instances",
    "translate",
]

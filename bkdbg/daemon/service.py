"""The `Debugger` gRPC servicer: protobuf in, `Session` calls, protobuf out.

A `BkdbgError` ends an RPC with a status code and the error's class name in the trailing
metadata key `bkdbg-error`, so `DaemonClient` can raise the same class on its side.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NoReturn

import grpc

from bkdbg.daemon import api_pb2 as pb
from bkdbg.daemon import api_pb2_grpc
from bkdbg.daemon.backend import Terminal
from bkdbg.daemon.buildrun import BuildRun
from bkdbg.daemon.convert import (
    ERROR_KEY,
    attach_output_to_pb,
    build_event_to_pb,
    event_to_pb,
    process_info_to_pb,
    server_status_to_pb,
)
from bkdbg.daemon.messages import TERMINAL_MESSAGES, ServerStatus
from bkdbg.daemon.processes import Attachment, ManagedProcess
from bkdbg.daemon.session import Session
from bkdbg.errors import (
    BkdbgError,
    BuildkitError,
    NotAttached,
    ServerError,
    UsageError,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerIdentity:
    instance_id: str
    pid: int
    started: float
    version: str


def status_code(exc: BkdbgError) -> grpc.StatusCode:
    """Return the status code for an error; never UNAVAILABLE, which means "no server"."""
    if isinstance(exc, UsageError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, NotAttached | ServerError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, BuildkitError):
        return grpc.StatusCode.ABORTED
    return grpc.StatusCode.UNKNOWN


def abort(context: grpc.ServicerContext, exc: BkdbgError) -> NoReturn:
    logger.info("request failed: %s: %s", type(exc).__name__, exc)
    context.set_trailing_metadata(((ERROR_KEY, type(exc).__name__),))
    context.abort(status_code(exc), str(exc))


# the generated module is not type-checked (see pyproject.toml), so its base class is Any
class DebuggerService(api_pb2_grpc.DebuggerServicer):  # type: ignore[misc]
    """Serves one `Session`; `request_stop` ends the server after the current replies."""

    def __init__(self, session: Session, identity: ServerIdentity,
                 request_stop: Callable[[str], None]) -> None:
        self.session = session
        self.identity = identity
        self.request_stop = request_stop

    # ------------------------------------------------------------ unary calls

    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloResponse:
        record = self.session.clients.register(request.client_pid, request.client_name)
        if request.client_version != self.identity.version:
            logger.warning("client %s runs bkdbg %s, this server %s", record.id,
                           request.client_version, self.identity.version)
        return pb.HelloResponse(
            server_version=self.identity.version,
            instance_id=self.identity.instance_id,
            server_pid=self.identity.pid,
            client_id=record.id,
        )

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.ServerInfo:
        session = self.session
        options = session.options
        status = ServerStatus(
            instance_id=self.identity.instance_id,
            pid=self.identity.pid,
            started=self.identity.started,
            build_state=session.build_state,
            clients=session.clients.infos(session.attached_processes()),
            context=options.context if options else "",
            current_process=session.current_process,
            buildkit_address=session.address,
            version=self.identity.version,
            last_exit_code=session.last_exit_code,
        )
        return server_status_to_pb(status)

    def Rollback(self, request: pb.RollbackRequest,
                 context: grpc.ServicerContext) -> pb.RollbackResponse:
        self.session.clients.touch()
        try:
            process_id = self.session.rollback(request.init, _terminal(request.terminal))
        except BkdbgError as exc:
            abort(context, exc)
        return pb.RollbackResponse(process_id=process_id)

    def Exec(self, request: pb.ExecRequest, context: grpc.ServicerContext) -> pb.ExecResponse:
        self.session.clients.touch()
        try:
            process_id = self.session.exec(
                list(request.args), list(request.env), request.user, request.cwd, request.tty,
                _terminal(request.terminal),
            )
        except BkdbgError as exc:
            abort(context, exc)
        return pb.ExecResponse(process_id=process_id)

    def ListProcesses(self, request: pb.ListProcessesRequest,
                      context: grpc.ServicerContext) -> pb.ListProcessesResponse:
        processes = [process_info_to_pb(p) for p in self.session.list_processes()]
        return pb.ListProcessesResponse(processes=processes)

    def Disconnect(self, request: pb.DisconnectRequest,
                   context: grpc.ServicerContext) -> pb.DisconnectResponse:
        count = self.session.disconnect(request.client_id, request.requester_id)
        return pb.DisconnectResponse(disconnected=count)

    def Goodbye(self, request: pb.GoodbyeRequest,
                context: grpc.ServicerContext) -> pb.GoodbyeResponse:
        stopping = self.session.goodbye(request.client_id, request.end_session)
        return pb.GoodbyeResponse(shutting_down=stopping)

    def CancelBuild(self, request: pb.CancelBuildRequest,
                    context: grpc.ServicerContext) -> pb.CancelBuildResponse:
        cancelled = self.session.cancel_build(request.client_id)
        return pb.CancelBuildResponse(cancelled=cancelled)

    def Shutdown(self, request: pb.ShutdownRequest,
                 context: grpc.ServicerContext) -> pb.ShutdownResponse:
        self.request_stop("a client requested Shutdown")
        return pb.ShutdownResponse()

    # ------------------------------------------------------------ streams

    def Build(self, request: pb.BuildRequest,
              context: grpc.ServicerContext) -> Iterator[pb.BuildEvent]:
        try:
            run = self.session.start_build(request.options_json, _terminal(request.terminal))
        except BkdbgError as exc:
            abort(context, exc)
        yield from self._stream_run(run, request.client_id, context)

    def Reload(self, request: pb.ReloadRequest,
               context: grpc.ServicerContext) -> Iterator[pb.BuildEvent]:
        try:
            run = self.session.reload(_terminal(request.terminal))
        except BkdbgError as exc:
            abort(context, exc)
        yield from self._stream_run(run, request.client_id, context)

    def _stream_run(self, run: BuildRun, client_id: str,
                    context: grpc.ServicerContext) -> Iterator[pb.BuildEvent]:
        client_id = self.session.clients.ensure(client_id).id
        if not self._open_stream(client_id, context, run.stop_listening):
            return
        for event in run.stream():
            yield build_event_to_pb(event)

    def Events(self, request: pb.EventsRequest,
               context: grpc.ServicerContext) -> Iterator[pb.Event]:
        clients = self.session.clients
        client_id = clients.ensure(request.client_id).id
        subscription = clients.subscribe(client_id)

        def end() -> None:
            subscription.end()
            clients.unsubscribe(subscription)

        if not self._open_stream(client_id, context, end):
            return
        while (event := subscription.get()) is not None:
            yield event_to_pb(event)

    def Attach(self, request_iterator: Iterator[pb.AttachInput],
               context: grpc.ServicerContext) -> Iterator[pb.AttachOutput]:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("input") != "start":
            abort(context, UsageError(
                "invalid attach request: the first message must be start: "
                "use the same bkdbg version for client and server"
            ))
        try:
            process, attachment = start_attachment(self.session, first.start)
        except BkdbgError as exc:
            abort(context, exc)
        client_id = attachment.client_id
        if not self._open_stream(client_id, context, lambda: process.detach(attachment)):
            process.detach(attachment)
            return
        pump = threading.Thread(
            target=pump_input, args=(request_iterator, process, attachment),
            name=f"attach-in-{process.id}-{client_id}", daemon=True,
        )
        # not joined: it ends when the client closes its side or the RPC ends
        pump.start()
        yield from _outputs(attachment)

    def _open_stream(self, client_id: str, context: grpc.ServicerContext,
                     on_end: Callable[[], None]) -> bool:
        """Count a stream of `client_id` until the RPC ends; False if it already ended."""
        clients = self.session.clients
        clients.stream_opened(client_id)

        def closed() -> None:
            on_end()
            clients.stream_closed(client_id)

        if context.add_callback(closed):
            return True
        closed()
        return False


def _terminal(terminal: pb.Terminal) -> Terminal:
    return Terminal(terminal.term, terminal.rows, terminal.cols)


def start_attachment(session: Session,
                     start: pb.AttachStart) -> tuple[ManagedProcess, Attachment]:
    """Attach the client of an attach stream's start message; raises BkdbgError."""
    client_id = session.clients.ensure(start.client_id).id
    return session.attach(start.process_id, client_id, start.read_only, start.replay,
                          (start.rows, start.cols))


def _outputs(attachment: Attachment) -> Iterator[pb.AttachOutput]:
    while (message := attachment.queue.get_joined()) is not None:
        yield attach_output_to_pb(message)
        if isinstance(message, TERMINAL_MESSAGES):
            return


def pump_input(requests: Iterator[pb.AttachInput], process: ManagedProcess,
               attachment: Attachment) -> None:
    """Forward one attach stream's input to the process until the client's side ends."""
    try:
        for request in requests:
            apply_input(request, process, attachment)
    except grpc.RpcError:
        # gRPC ends the request iterator this way when the RPC is cancelled or finished
        logger.debug("attach input of client %s ended", attachment.client_id)
        return
    # the client closed its side: that is how it detaches, after its last input
    process.detach(attachment)


def apply_input(request: pb.AttachInput, process: ManagedProcess,
                attachment: Attachment) -> None:
    """Forward one input message after start to the process; failures are logged."""
    kind = request.WhichOneof("input")
    try:
        if kind == "stdin":
            process.write(attachment, request.stdin)
        elif kind == "stdin_eof":
            process.close_stdin(attachment)
        elif kind == "resize":
            process.resize(attachment, request.resize.rows, request.resize.cols)
        elif kind == "signal":
            process.signal(attachment, request.signal)
        else:
            logger.warning("ignored a %s message from client %s after start",
                           kind, attachment.client_id)
    except (BkdbgError, ValueError) as exc:
        # ValueError: a signal name that the container runtime does not know
        logger.warning("%s for process %s from client %s failed: %s",
                       kind, process.id, attachment.client_id, exc)

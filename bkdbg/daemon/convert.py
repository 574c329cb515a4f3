"""Conversions between `bkdbg.daemon.messages` values and the `api.proto` messages."""

from __future__ import annotations

import dataclasses
import json

from bkdbg.daemon import api_pb2 as pb
from bkdbg.daemon.messages import (
    Attached,
    AttachMessage,
    BuildDone,
    BuildEvent,
    BuildProgress,
    ClientInfo,
    Closed,
    Exited,
    Output,
    ProcessInfo,
    ServerEvent,
    ServerStatus,
    TakenOver,
)
from bkdbg.errors import FailedStep

# trailing metadata key of a failed RPC: the name of the bkdbg.errors class it raised
ERROR_KEY = "bkdbg-error"

# ---------------------------------------------------------------- attach output


def attach_output_to_pb(message: AttachMessage) -> pb.AttachOutput:
    if isinstance(message, Output):
        return pb.AttachOutput(data=pb.Output(
            fd=message.fd, data=message.data, dropped_bytes=message.dropped_bytes
        ))
    if isinstance(message, Attached):
        return pb.AttachOutput(attached=pb.Attached(
            process_id=message.process_id, args=message.args, tty=message.tty,
            replayed_bytes=message.replayed_bytes,
        ))
    if isinstance(message, Exited):
        return pb.AttachOutput(exited=pb.ProcessExited(
            code=message.code, message=message.message, replaced_by=message.replaced_by
        ))
    if isinstance(message, TakenOver):
        return pb.AttachOutput(taken_over=pb.TakenOver(by_client=message.by_client))
    return pb.AttachOutput(closed=message.reason)


def attach_output_from_pb(output: pb.AttachOutput) -> AttachMessage:
    kind = output.WhichOneof("output")
    if kind == "data":
        return Output(output.data.fd, output.data.data, output.data.dropped_bytes)
    if kind == "attached":
        item = output.attached
        return Attached(item.process_id, list(item.args), item.tty, item.replayed_bytes)
    if kind == "exited":
        return Exited(output.exited.code, output.exited.message, output.exited.replaced_by)
    if kind == "taken_over":
        return TakenOver(output.taken_over.by_client)
    return Closed(output.closed or "closed by the server")


# ---------------------------------------------------------------- builds


def build_event_to_pb(event: BuildEvent) -> pb.BuildEvent:
    if isinstance(event, BuildProgress):
        return pb.BuildEvent(progress_json=event.events_json)
    step = event.failed_step
    return pb.BuildEvent(done=pb.BuildDone(
        ok=event.ok,
        error=event.error,
        error_kind=event.error_kind,
        failed_step_json=json.dumps(dataclasses.asdict(step)) if step is not None else "",
        process_id=event.process_id,
        notes=event.notes,
    ))


def build_event_from_pb(event: pb.BuildEvent) -> BuildEvent:
    if event.WhichOneof("event") == "progress_json":
        return BuildProgress(event.progress_json)
    done = event.done
    return BuildDone(
        ok=done.ok,
        error=done.error,
        error_kind=done.error_kind,
        failed_step=failed_step_from_json(done.failed_step_json),
        process_id=done.process_id,
        notes=list(done.notes),
    )


def failed_step_from_json(text: str) -> FailedStep | None:
    """Decode a FailedStep, ignoring fields this version does not know."""
    if not text:
        return None
    raw = json.loads(text)
    known = {f.name for f in dataclasses.fields(FailedStep)}
    return FailedStep(**{key: value for key, value in raw.items() if key in known})


# ---------------------------------------------------------------- server state


def process_info_to_pb(info: ProcessInfo) -> pb.ProcessInfo:
    return pb.ProcessInfo(
        id=info.id, args=info.args, state=info.state, exit_code=info.exit_code,
        tty=info.tty, current=info.current, attached_client=info.attached_client,
    )


def process_info_from_pb(info: pb.ProcessInfo) -> ProcessInfo:
    return ProcessInfo(
        id=info.id, args=list(info.args), state=info.state, exit_code=info.exit_code,
        tty=info.tty, current=info.current, attached_client=info.attached_client,
    )


def server_status_to_pb(status: ServerStatus) -> pb.ServerInfo:
    return pb.ServerInfo(
        instance_id=status.instance_id,
        pid=status.pid,
        started_unix=status.started,
        build_state=status.build_state,
        clients=[client.id for client in status.clients],
        client_details=[
            pb.ClientInfo(id=c.id, pid=c.pid, name=c.name, attached_process=c.attached_process)
            for c in status.clients
        ],
        context=status.context,
        current_process=status.current_process,
        buildkit_address=status.buildkit_address,
        version=status.version,
        last_exit_code=status.last_exit_code,
    )


def server_status_from_pb(info: pb.ServerInfo) -> ServerStatus:
    return ServerStatus(
        instance_id=info.instance_id,
        pid=info.pid,
        started=info.started_unix,
        build_state=info.build_state,
        clients=[
            ClientInfo(c.id, c.pid, c.name, c.attached_process) for c in info.client_details
        ],
        context=info.context,
        current_process=info.current_process,
        buildkit_address=info.buildkit_address,
        version=info.version,
        last_exit_code=info.last_exit_code,
    )


def event_to_pb(event: ServerEvent) -> pb.Event:
    return pb.Event(kind=event.kind, message=event.message, process_id=event.process_id)


def event_from_pb(event: pb.Event) -> ServerEvent:
    return ServerEvent(event.kind, event.message, event.process_id)

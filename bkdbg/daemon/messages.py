"""Plain values exchanged with a server, as both the server's session and `DaemonClient` use them.

The service converts them to and from the `api.proto` messages, so neither the session nor
the shell touches protobuf classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bkdbg import errors
from bkdbg.errors import BkdbgError, FailedStep

# ---------------------------------------------------------------- attach stream output


@dataclass(frozen=True)
class Attached:
    """First message of an attach stream: which process, and how much output was replayed."""

    process_id: str
    args: list[str]
    tty: bool
    replayed_bytes: int = 0


@dataclass(frozen=True)
class Output:
    """Output of a process on `fd` (1 stdout, 2 stderr).

    `dropped_bytes` counts output discarded just before this chunk because the client
    read more slowly than the process wrote.
    """

    fd: int
    data: bytes
    dropped_bytes: int = 0


@dataclass(frozen=True)
class Exited:
    """The process ended; `replaced_by` names the process that reload or rollback started."""

    code: int
    message: str = ""
    replaced_by: str = ""


@dataclass(frozen=True)
class TakenOver:
    """Another client attached with input; this stream ends."""

    by_client: str


@dataclass(frozen=True)
class Closed:
    """The server ended this stream: a `disconnect`, or the server shutting down."""

    reason: str


AttachMessage = Attached | Output | Exited | TakenOver | Closed
# messages after which the server ends the attach stream
TERMINAL_MESSAGES = (Exited, TakenOver, Closed)

# ---------------------------------------------------------------- builds


@dataclass(frozen=True)
class BuildProgress:
    """One batch of progress events, as JSON made by `bkdbg.progress.events_to_json`."""

    events_json: str


@dataclass(frozen=True)
class BuildDone:
    """The outcome of a build or a reload.

    `ok` is the build's result. `error` may be set with `ok` true, when the build worked
    but the interactive process could not start. `error_kind` is the name of the error's
    class in `bkdbg.errors`. `process_id` is the interactive process started on the result
    (or in the failed step's state), empty when none was requested or it could not start.
    """

    ok: bool
    error: str = ""
    error_kind: str = ""
    failed_step: FailedStep | None = None
    process_id: str = ""
    notes: list[str] = field(default_factory=list)


BuildEvent = BuildProgress | BuildDone

# ---------------------------------------------------------------- server state


@dataclass(frozen=True)
class ProcessInfo:
    """A process of the server, running or exited."""

    id: str
    args: list[str]
    state: str
    exit_code: int = 0
    tty: bool = False
    current: bool = False
    attached_client: str = ""


@dataclass(frozen=True)
class ClientInfo:
    """A client that has a stream open to the server."""

    id: str
    pid: int = 0
    name: str = ""
    attached_process: str = ""


@dataclass(frozen=True)
class ServerEvent:
    """A server event for a client.

    `kind` is build-finished, process-started, process-exited, disconnected or shutdown.
    """

    kind: str
    message: str = ""
    process_id: str = ""


@dataclass(frozen=True)
class ServerStatus:
    """A server's response to Info.

    `build_state` is idle, building, built, failed or cancelled; `started` is Unix seconds.
    """

    instance_id: str
    pid: int
    started: float
    build_state: str
    clients: list[ClientInfo]
    context: str = ""
    current_process: str = ""
    buildkit_address: str = ""
    version: str = ""
    last_exit_code: int = 0


@dataclass(frozen=True)
class InstanceInfo:
    """One server instance as `bkdbg list` shows it.

    `state` is running, unresponsive (its process lives but does not respond), starting,
    or stale (its process is gone, and listing removed its directory). `status` is the
    server's Info response when it sent one.
    """

    instance_id: str
    state: str
    pid: int | None
    started: float
    context: str = ""
    version: str = ""
    directory: str = ""
    status: ServerStatus | None = None


# classes a server may name in its `bkdbg-error` metadata; each takes one message argument
ERROR_CLASSES: dict[str, type[BkdbgError]] = {
    cls.__name__: cls
    for cls in (
        errors.UsageError, errors.BuildkitUnreachable, errors.BuildkitLost,
        errors.BuildkitError, errors.BuildFailed,
        errors.BuildCancelled, errors.ContainerError, errors.CommandNotFound,
        errors.ServerError, errors.NotAttached,
    )
}


def build_error(done: BuildDone) -> BkdbgError | None:
    """Return the error a BuildDone reports, as its bkdbg.errors class, or None."""
    if not done.error:
        return None
    if done.error_kind == "BuildFailed":
        return errors.BuildFailed(done.error, done.failed_step)
    return ERROR_CLASSES.get(done.error_kind, errors.ServerError)(done.error)

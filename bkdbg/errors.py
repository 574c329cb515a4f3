"""bkdbg's exceptions, one tree, caught by the CLI at its base.

* BkdbgError - base of every error bkdbg reports to the user as one line.
    * UsageError - bad user input: an option value, a CSV form, a path, a script line.
    * BuildkitUnreachable - no BuildKit responded at any address tried.
        * BuildkitLost - BuildKit stopped answering during a request.
    * BuildkitError - BuildKit answered with an error we do not map more precisely.
        * BuildFailed - the solve failed; carries the failed step, when BuildKit named one.
        * BuildCancelled - the solve was cancelled (Ctrl-C, kill, shutdown).
        * ContainerError - a container or process could not start or was lost.
            * CommandNotFound - the process's executable does not exist in the image.
    * ProcessExit - a container process ended; carries its exit status (not an error to print).
    * ServerError - the detached bkdbg server failed or refused a request.
        * ServerUnreachable - no server answers at an instance's socket (dead or stale).
        * UnknownInstance - no instance has the requested id.
        * VersionMismatch - the server runs another bkdbg version than the client.
        * NotAttached - the request needs a process or container the server does not have.

Lower layers raise these and translate `grpc.RpcError` at one boundary only: in
`bkdbg/gateway/` for BuildKit, and in `bkdbg/daemon/client.py` for the server. Every
message reads ``<what failed>: <value>: <what to do>``; the CLI prefixes ``bkdbg: error: ``.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field


class BkdbgError(Exception):
    """Base class: an error reported to the user as one line, exit status 1."""

    exit_code = 1


class UsageError(BkdbgError):
    """Raised for bad user input: option values, CSV forms, paths, script lines."""


class BuildkitUnreachable(BkdbgError):
    """Raised when no BuildKit responded at any of the addresses tried."""

    def __init__(self, message: str, addresses: list[str] | None = None) -> None:
        super().__init__(message)
        self.addresses = addresses or []


class BuildkitLost(BuildkitUnreachable):
    """Raised when BuildKit stopped responding during a request (restarted, say)."""


class BuildkitError(BkdbgError):
    """Raised when BuildKit responds to a request with an error."""


@dataclass
class FailedStep:
    """Where and how a build step failed, as BuildKit's error details describe it.

    `mount_ids` hold the state after the failed command and `input_ids` the state before
    it, one per mount of the failed exec op (`None` when BuildKit gave no id); both stay
    valid only while the gateway build that produced them is open.
    """

    message: str
    exit_code: int | None = None
    filename: str | None = None
    line: int | None = None
    instruction: str | None = None
    source_lines: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    cwd: str = "/"
    user: str = ""
    vertex_name: str | None = None
    logs: list[str] = field(default_factory=list)
    is_exec: bool = False


class BuildFailed(BuildkitError):
    """Raised when a solve fails; `step` describes the failed step when known."""

    def __init__(self, message: str, step: FailedStep | None = None) -> None:
        super().__init__(message)
        self.step = step


class BuildCancelled(BuildkitError):
    """Raised when a solve was cancelled before it finished."""


class ContainerError(BuildkitError):
    """Raised when a container or process could not start, or was lost."""


class CommandNotFound(ContainerError):
    """Raised when the executable of a process does not exist in the image."""


class ProcessExit(BkdbgError):
    """Raised (or returned) when a container process ends; `code` is its exit status.

    A process killed by signal N has code 128+N, as in a shell.
    """

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or f"process exited with status {code}")
        self.code = code
        self.exit_code = code


class ServerError(BkdbgError):
    """Raised when the detached bkdbg server fails or refuses a request."""


class ServerUnreachable(ServerError):
    """Raised when no server answers at an instance's socket."""


class UnknownInstance(ServerError):
    """Raised when no instance has the requested id."""


class VersionMismatch(ServerError):
    """Raised when the server runs another bkdbg version than the client."""


class NotAttached(ServerError):
    """Raised when a request needs a process or container that the server does not have."""


def report_error(exc: BkdbgError, debug: bool) -> int:
    """Print `exc` as one `bkdbg: error:` line (after its traceback with `debug`).

    Returns the exit status: the process's for a ProcessExit, else 1.
    """
    if debug:
        traceback.print_exception(exc)
    print(f"bkdbg: error: {exc}", file=sys.stderr)
    return exc.code if isinstance(exc, ProcessExit) else 1

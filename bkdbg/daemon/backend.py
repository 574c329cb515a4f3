"""Protocols for the session's access to BuildKit, so that tests can use a fake backend.

`bkdbg.daemon.gateway_backend.GatewayBackend` implements them with `bkdbg.gateway`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from bkdbg.options import BuildOptions, InvokeConfig
from bkdbg.progress import ProgressEvent

# receives (fd, data) for each output chunk and (fd, b"") at EOF of that fd
OutputSink = Callable[[int, bytes], None]
ProgressSink = Callable[[list[ProgressEvent]], None]

# container states: the build result, or the failed step after / before its command ran
STATE_RESULT = "result"
STATE_FAILED = "failed"
STATE_FAILED_INIT = "failed-init"


@dataclass(frozen=True)
class Terminal:
    """The requesting client's terminal, for tty processes: $TERM and the window size."""

    term: str = ""
    rows: int = 0
    cols: int = 0


@dataclass(frozen=True)
class FirstBuild:
    """The build that a launching client's command line requests, which its server starts
    before the client connects (see `Session.start_first_build`)."""

    options_json: str
    terminal: Terminal


@dataclass
class ProcessSpec:
    """A process to start in a container; `native` is the backend's own process config."""

    args: list[str]
    tty: bool
    env: list[str] = field(default_factory=list)
    user: str = ""
    cwd: str = ""
    rows: int = 0
    cols: int = 0
    native: Any = None


class ProcessHandle(Protocol):
    """A running container process (`bkdbg.gateway.debug_container.DebugProcess`)."""

    @property
    def done(self) -> threading.Event: ...

    def write(self, data: bytes) -> None: ...

    def close_stdin(self) -> None: ...

    def resize(self, rows: int, cols: int) -> None: ...

    def signal(self, name: str) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    @property
    def command_not_found(self) -> bool:
        """True when the process ended because its executable is not in the image."""
        ...


class ContainerHandle(Protocol):
    """A debug container on one build state."""

    def run(self, spec: ProcessSpec, sink: OutputSink) -> ProcessHandle: ...

    def release(self) -> None: ...


class BuildHandle(Protocol):
    """One open build: solve it, then start containers on its result or failed step."""

    address: str

    def solve(self) -> None:
        """Run the build; raises BuildFailed, BuildCancelled or another BuildkitError."""

    def export(self) -> list[str]:
        """Export the outputs (-o, -t) of a solved build; returns notes to show."""

    def can_debug_failure(self) -> bool:
        """Return whether a container can start in the failed step's state."""

    def new_container(self, state: str) -> ContainerHandle: ...

    def process_spec(self, invoke: InvokeConfig, state: str, terminal: Terminal) -> ProcessSpec:
        """Return the process to start for `invoke` in a container of `state`."""

    def cancel(self) -> None:
        """Cancel a running solve from another thread."""

    def close(self) -> None:
        """Release every container and ref and end the build; idempotent."""


class Backend(Protocol):
    """Starts builds; one server keeps one backend for its whole life."""

    def start_build(self, options: BuildOptions, on_progress: ProgressSink) -> BuildHandle:
        """Connect to BuildKit and open a build; raises BuildkitUnreachable and UsageError."""

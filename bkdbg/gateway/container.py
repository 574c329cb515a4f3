"""Containers and processes on BuildKit's gateway: NewContainer, ExecProcess, ReleaseContainer.

Each process gets its own `LLBBridge.ExecProcess` stream, because a bad frame (a File for
an fd not in `Init.Fds`, a second EOF) makes BuildKit end the whole stream with every
process on it. The frame order on a stream, as seen from BuildKit v0.13 (Docker Engine
26.1.5) to v0.32.2, is Init --> Started <-- File... Exit <-- File EOF... <-- Done <--, and
Done comes only after the client sends EOF on fd 0 when fd 0 is in `Init.Fds`.

Ending a stream ends its processes: BuildKit cancels a process when the stream that
started it closes, so a stream stays open until its Done.
"""

from __future__ import annotations

import logging
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from bkdbg.buildkit_proto import gateway_pb2, ops_pb2
from bkdbg.errors import ContainerError
from bkdbg.gateway.h2client import H2StreamCall, StreamError

logger = logging.getLogger(__name__)

Sink = Callable[[int, bytes], None]
"""Receives (fd, data) for output and (fd, b"") at EOF of that fd, on the receiver thread."""

Dialer = Callable[[], tuple[socket.socket, bytes]]
"""Opens an HTTP/2 connection to BuildKit for one ExecProcess stream (`Connection.h2_dialer`)."""

EXEC_PATH = f"/{gateway_pb2.DESCRIPTOR.services_by_name['LLBBridge'].full_name}/ExecProcess"

START_TIMEOUT = 30.0  # seconds from Init to Started, which took 2-50 ms on BuildKit v0.13 and v0.32
RELEASE_TIMEOUT = (
    30.0  # seconds for ReleaseContainer, which took 2-40 ms on BuildKit v0.13 and v0.32
)
RELEASE_GRACE = 2.0  # seconds for running processes to end after ReleaseContainer
UNKNOWN_STATUS = 255  # BuildKit's own code for "no exit status"
MAX_STDIN_CHUNK = 1 << 20  # bytes per File frame, well under the 16 MiB message limit

# Linux signal numbers, by the names BuildKit accepts in a Signal frame (moby/sys
# signal.SignalMap, which has no SIG prefix). BuildKit ends the stream for an unknown name.
_NAMED_SIGNALS = {
    "HUP": 1, "INT": 2, "QUIT": 3, "ILL": 4, "TRAP": 5, "ABRT": 6, "IOT": 6, "BUS": 7,
    "FPE": 8, "KILL": 9, "USR1": 10, "SEGV": 11, "USR2": 12, "PIPE": 13, "ALRM": 14,
    "TERM": 15, "STKFLT": 16, "CHLD": 17, "CLD": 17, "CONT": 18, "STOP": 19, "TSTP": 20,
    "TTIN": 21, "TTOU": 22, "URG": 23, "XCPU": 24, "XFSZ": 25, "VTALRM": 26, "PROF": 27,
    "WINCH": 28, "IO": 29, "POLL": 29, "PWR": 30, "SYS": 31,
}  # fmt: skip
_RTMIN, _RTMAX = 34, 64
SIGNALS: dict[str, int] = {
    **_NAMED_SIGNALS,
    "RTMIN": _RTMIN,
    **{f"RTMIN+{i}": _RTMIN + i for i in range(1, 16)},
    **{f"RTMAX-{i}": _RTMAX - i for i in range(14, 0, -1)},
    "RTMAX": _RTMAX,
}


def signal_name(name: str) -> str:
    """Return the wire name of a signal given as `INT`, `SIGINT` or `sigint`.

    Raises ValueError naming the signal when BuildKit does not know it.
    """
    wire = name.strip().upper()
    if wire.startswith("SIG"):
        wire = wire[3:]
    if wire not in SIGNALS:
        raise ValueError(f"unknown signal: {name!r}: use a name such as INT, TERM or KILL")
    return wire


def describe_frame(msg: Any) -> str:
    """Render one ExecMessage as a log line: kind, process id and sizes, never payload bytes."""
    kind = msg.WhichOneof("Input")
    head = f"{kind} pid={msg.ProcessID}"
    if kind == "Init":
        init = msg.Init
        return f"{head} argc={len(init.Meta.args)} fds={list(init.Fds)} tty={init.Tty}"
    if kind == "File":
        size = "EOF" if msg.File.EOF else f"{len(msg.File.Data)} bytes"
        return f"{head} fd={msg.File.Fd} {size}"
    if kind == "Resize":
        return f"{head} rows={msg.Resize.Rows} cols={msg.Resize.Cols}"
    if kind == "Signal":
        return f"{head} signal={msg.Signal.Name}"
    if kind == "Exit":
        error = msg.Exit.Error.message if msg.Exit.HasField("Error") else ""
        return f"{head} code={msg.Exit.Code} error={error!r}"
    return head


def exit_status(code: int) -> int:
    """Map an Exit frame's code to a shell-style status; codes above 255 become 255."""
    # runc reports a death by signal N as 128+N already; BuildKit sends 255 when it has no
    # status and 4294967295 (-1 as uint32) for a process it cancelled
    return code if 0 <= code <= 255 else UNKNOWN_STATUS


def rpc_details(exc: grpc.RpcError) -> tuple[grpc.StatusCode | None, str]:
    """Return the status code and message of a failed call (None and str(exc) if unknown)."""
    if isinstance(exc, grpc.Call | StreamError):
        return exc.code(), exc.details() or ""
    return None, str(exc)


def _is_output(msg: Any) -> bool:
    return msg.WhichOneof("Input") == "File" and bool(msg.File.Data) and not msg.File.EOF


class BridgeOwner(Protocol):
    """The part of a gateway build that containers use: the LLBBridge stub and call metadata."""

    @property
    def bridge(self) -> Any: ...

    @property
    def call_metadata(self) -> Sequence[tuple[str, str]]: ...


@dataclass(frozen=True)
class ProcessConfig:
    """How to start one process in a container (BuildKit's `Init` frame).

    `rows` and `cols` are sent as a Resize right after Started when `tty` is set and both
    are non-zero. `fds` lists the fds the process gets from the stream; BuildKit connects
    the others to /dev/null.
    """

    args: list[str]
    env: list[str] = field(default_factory=list)
    cwd: str = ""
    user: str = ""
    tty: bool = False
    rows: int = 0
    cols: int = 0
    fds: tuple[int, ...] = (0, 1, 2)


class Process:
    """One process in a container, on its own ExecProcess stream.

    A single receiver thread reads the stream, hands output to the sink and records the
    exit. With `dial`, the stream runs on its own HTTP/2 connection (`H2StreamCall`),
    else on the owner's grpcio channel. Use `Container.start` to make one.
    """

    def __init__(
        self,
        owner: BridgeOwner,
        container_id: str,
        config: ProcessConfig,
        sink: Sink,
        dial: Dialer | None = None,
    ) -> None:
        self.id = f"{container_id}:{secrets.token_hex(8)}"
        self.container_id = container_id
        self.config = config
        self.done = threading.Event()
        self.exited = threading.Event()
        self.exit_code: int | None = None
        self.exit_error = ""
        self._owner = owner
        self._sink = sink
        self._started = threading.Event()
        self._start_failure: str | None = None
        self._lost: str | None = None
        self._stdin_open = 0 in config.fds
        self._last_signal: str | None = None
        self._lock = threading.Lock()
        self._outgoing: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._call: Any = None
        self._dial = dial

    # ---------------------------------------------------------------- start

    def start(self, security: ops_pb2.SecurityMode, timeout: float) -> None:
        """Send Init and wait for Started; raise ContainerError if the process did not start."""
        meta = ops_pb2.Meta(
            args=self.config.args, env=self.config.env, cwd=self.config.cwd, user=self.config.user
        )
        init = gateway_pb2.InitMessage(
            ContainerID=self.container_id,
            Meta=meta,
            Fds=list(self.config.fds),
            Tty=self.config.tty,
            Security=security,
        )
        self._send(gateway_pb2.ExecMessage(ProcessID=self.id, Init=init))
        self._call = self._open_call()
        threading.Thread(target=self._receive, name=f"exec-{self.id}", daemon=True).start()

        if not self._started.wait(timeout):
            self._call.cancel()
            raise ContainerError(
                f"process did not start: {self.id}: no Started within {timeout:g} s; "
                "BuildKit may be overloaded or the container is gone"
            )
        if self._start_failure is not None:
            raise ContainerError(f"process could not start: {self.id}: {self._start_failure}")

    def _open_call(self) -> Any:
        if self._dial is not None:
            try:
                sock, initial = self._dial()
            except OSError as exc:
                logger.warning("process %s: %s; using the gRPC channel", self.id, exc)
            else:
                call = H2StreamCall(
                    sock,
                    initial,
                    EXEC_PATH,
                    self._owner.call_metadata,
                    self._requests(),
                    gateway_pb2.ExecMessage.FromString,
                )
                call.start()
                return call
        return self._owner.bridge.ExecProcess(self._requests(), metadata=self._owner.call_metadata)

    def _requests(self) -> Iterator[Any]:
        # ends (half-closes the stream) only after Done or when the process is abandoned
        while True:
            msg = self._outgoing.get()
            if msg is None:
                return
            yield msg

    # ---------------------------------------------------------------- receive

    def _receive(self) -> None:
        """Read the stream until it ends, dispatching each frame of this process."""
        try:
            for batch in self._batches():
                self._dispatch_batch(batch)
        except grpc.RpcError as exc:
            code, details = rpc_details(exc)
            self._end_stream(f"stream failed: {code.name if code else 'error'}: {details}")
        except Exception:
            logger.exception("receiver of process %s failed", self.id)
            self._call.cancel()
            self._end_stream("receiver failed; see the log")
        else:
            self._end_stream("stream ended without Exit")

    def _batches(self) -> Iterator[list[Any]]:
        if isinstance(self._call, H2StreamCall):
            return self._call.batches()
        return ([msg] for msg in self._call)

    def _dispatch_batch(self, batch: list[Any]) -> None:
        """Dispatch the frames of one read, joining consecutive output of one fd.

        One sink call per read instead of one per 4-32 KiB frame keeps the fan-out to
        attached clients off the per-frame cost.
        """
        run_fd, run = -1, list[bytes]()
        for msg in batch:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("<-- %s", describe_frame(msg))
            if msg.ProcessID != self.id:
                logger.debug("dropping frame for unknown process %s", msg.ProcessID)
            elif self._started.is_set() and _is_output(msg):
                if msg.File.Fd != run_fd:
                    self._flush_output(run_fd, run)
                    run_fd, run = msg.File.Fd, []
                run.append(msg.File.Data)
            else:
                self._flush_output(run_fd, run)
                run_fd, run = -1, []
                self._dispatch(msg)
        self._flush_output(run_fd, run)

    def _flush_output(self, fd: int, chunks: list[bytes]) -> None:
        if chunks:
            self._sink(fd, chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _dispatch(self, msg: Any) -> None:
        kind = msg.WhichOneof("Input")
        if not self._started.is_set():
            self._on_first_frame(kind, msg)
        elif kind == "File":
            self._sink(msg.File.Fd, b"" if msg.File.EOF else msg.File.Data)
        elif kind == "Exit":
            self._on_exit(msg.Exit)
        elif kind == "Done":
            self._finish()
        else:
            logger.debug("ignoring %s frame for running process %s", kind, self.id)

    def _on_first_frame(self, kind: str, msg: Any) -> None:
        if kind == "Started":
            if self.config.tty and self.config.rows and self.config.cols:
                size = gateway_pb2.ResizeMessage(Rows=self.config.rows, Cols=self.config.cols)
                self._send(gateway_pb2.ExecMessage(ProcessID=self.id, Resize=size))
            self._started.set()
            return
        if kind == "Exit":
            self._on_exit(msg.Exit)
            self._start_failure = f"it exited with code {msg.Exit.Code}: {self.exit_error}"
        else:
            self._start_failure = f"protocol error: {kind} frame before Started"
            self._call.cancel()
        self._started.set()

    def _on_exit(self, exit_msg: Any) -> None:
        self.exit_error = exit_msg.Error.message if exit_msg.HasField("Error") else ""
        self.exit_code = exit_status(exit_msg.Code)
        if self.exit_code == UNKNOWN_STATUS and self._last_signal is not None:
            # NOTE: when a signal kills an init, BuildKit v0.13 sends 255 with the error "runc
            # did not terminate successfully: exit status -1". The signal sent last is the
            # likely cause, so the status is 128+N for it, as a shell reports it.
            if self.exit_error.endswith("exit status -1"):
                self.exit_code = 128 + SIGNALS[self._last_signal]
        self.exited.set()
        # BuildKit sends Done only after stdin EOF
        self.close_stdin(_after_exit=True)

    def _finish(self) -> None:
        self.done.set()
        self._outgoing.put(None)

    def _end_stream(self, reason: str) -> None:
        if not self._started.is_set():
            self._start_failure = reason
        elif not self.exited.is_set():
            self._lost = reason
            logger.warning("process %s lost: %s", self.id, reason)
        elif not self.done.is_set():
            logger.debug("process %s: %s after Exit", self.id, reason)
        self._started.set()
        self._finish()

    # ---------------------------------------------------------------- send

    def _send(self, msg: Any) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("--> %s", describe_frame(msg))
        self._outgoing.put(msg)

    def _check_running(self) -> None:
        if self.exited.is_set() or self.done.is_set():
            raise ContainerError(f"process has ended: {self.id}: start a new process")

    def write(self, data: bytes) -> None:
        """Send `data` to the process's stdin.

        Raises ContainerError once the process has ended or its stdin is closed.
        """
        with self._lock:
            self._check_running()
            if not self._stdin_open:
                raise ContainerError(f"stdin is closed: {self.id}: start a new process")
            for start in range(0, len(data), MAX_STDIN_CHUNK):
                chunk = data[start : start + MAX_STDIN_CHUNK]
                self._send(self._file_frame(gateway_pb2.FdMessage(Fd=0, Data=chunk)))

    def close_stdin(self, *, _after_exit: bool = False) -> None:
        """Send EOF on stdin; a second call does nothing (a second EOF would end the stream)."""
        with self._lock:
            if not self._stdin_open:
                return
            if not _after_exit:
                self._check_running()
            self._stdin_open = False
            self._send(self._file_frame(gateway_pb2.FdMessage(Fd=0, EOF=True)))

    def resize(self, rows: int, cols: int) -> None:
        """Set the terminal size of a tty process; for a process without tty, do nothing."""
        if not self.config.tty:
            logger.debug("ignoring resize of process %s, which has no tty", self.id)
            return
        with self._lock:
            self._check_running()
            resize = gateway_pb2.ResizeMessage(Rows=rows, Cols=cols)
            self._send(gateway_pb2.ExecMessage(ProcessID=self.id, Resize=resize))

    def signal(self, name: str) -> None:
        """Send a signal by name (`INT` or `SIGINT`); raise ValueError for an unknown name."""
        wire = signal_name(name)
        with self._lock:
            self._check_running()
            signal = gateway_pb2.SignalMessage(Name=wire)
            self._send(gateway_pb2.ExecMessage(ProcessID=self.id, Signal=signal))
            self._last_signal = wire

    def _file_frame(self, fd_msg: Any) -> Any:
        return gateway_pb2.ExecMessage(ProcessID=self.id, File=fd_msg)

    # ---------------------------------------------------------------- wait

    def wait(self, timeout: float | None = None) -> int:
        """Wait until all output arrived and return the exit status (128+N for signal N).

        Raises TimeoutError after `timeout` seconds, and ContainerError when the stream
        ended without an Exit frame.
        """
        if not self.done.wait(timeout):
            raise TimeoutError(f"process {self.id} still running after {timeout:g} s")
        if self.exit_code is None:
            raise ContainerError(f"process lost: {self.id}: {self._lost}")
        return self.exit_code

    def abandon(self) -> None:
        """Cancel the stream, which makes BuildKit kill the process if it still runs."""
        if self._call is not None and not self.done.is_set():
            self._call.cancel()


class Container:
    """A gateway container: its mounts live until `release`; each process has a stream."""

    def __init__(
        self,
        owner: BridgeOwner,
        container_id: str,
        security: ops_pb2.SecurityMode = ops_pb2.SANDBOX,
        dial: Dialer | None = None,
    ) -> None:
        self.id = container_id
        self.security = security
        self._owner = owner
        self._dial = dial
        self._processes: list[Process] = []
        self._lock = threading.Lock()
        self._released = False

    @classmethod
    def create(
        cls,
        owner: BridgeOwner,
        mounts: Sequence[Any],
        *,
        network: ops_pb2.NetMode = ops_pb2.UNSET,
        security: ops_pb2.SecurityMode = ops_pb2.SANDBOX,
        platform: Any = None,
        hostname: str = "",
        extra_hosts: Sequence[Any] = (),
        dial: Dialer | None = None,
    ) -> Container:
        """Create a container with `mounts` (pb.Mount); raise ContainerError if BuildKit fails.

        With `dial`, each process's ExecProcess stream gets its own HTTP/2 connection.
        """
        # the moby executor takes letters and digits only ("invalid container id")
        container_id = f"bkdbg{secrets.token_hex(10)}"
        request = gateway_pb2.NewContainerRequest(
            ContainerID=container_id,
            Mounts=list(mounts),
            Network=network,
            platform=platform,
            hostname=hostname,
            extraHosts=list(extra_hosts),
        )
        try:
            owner.bridge.NewContainer(request, metadata=owner.call_metadata)
        except grpc.RpcError as exc:
            _, details = rpc_details(exc)
            if "no such job" in details:
                # BuildKit forgot the build: it restarted, or the build was cancelled
                raise ContainerError(
                    f"could not create container: BuildKit no longer has this build "
                    f"({details}): type reload to build again"
                ) from exc
            raise ContainerError(f"could not create container: {details}") from exc
        logger.info("created container %s with %d mounts", container_id, len(request.Mounts))
        return cls(owner, container_id, security, dial)

    @property
    def released(self) -> bool:
        return self._released

    def start(self, config: ProcessConfig, sink: Sink, timeout: float = START_TIMEOUT) -> Process:
        """Start a process; the first one is the container's init, later ones are execs.

        Raises ContainerError if the container was released or the process did not start.
        """
        with self._lock:
            if self._released:
                raise ContainerError(f"container was released: {self.id}: create a new one")
            process = Process(self._owner, self.id, config, sink, self._dial)
            self._processes.append(process)
        process.start(self.security, timeout)
        return process

    def release(self) -> None:
        """Release the container, killing its processes; later calls do nothing.

        A failed ReleaseContainer is logged, not raised, because release runs on cleanup paths.
        """
        with self._lock:
            if self._released:
                return
            self._released = True

        # NOTE: BuildKit v0.13 (Docker Engine 26.1.5) reports the Exit of a process without
        # a tty only after its stdin EOF. ReleaseContainer waits for those exits, so it
        # would block on any such process whose stdin is still open.
        for process in self._processes:
            process.close_stdin(_after_exit=True)
        try:
            self._owner.bridge.ReleaseContainer(
                gateway_pb2.ReleaseContainerRequest(ContainerID=self.id),
                metadata=self._owner.call_metadata,
                timeout=RELEASE_TIMEOUT,
            )
        except grpc.RpcError as exc:
            self._log_release_error(exc)
        else:
            logger.info("released container %s", self.id)
        self._end_processes()

    def _log_release_error(self, exc: grpc.RpcError) -> None:
        code, details = rpc_details(exc)
        # BuildKit reports the first failed process ("exit code: N"), a killed init
        # (CANCELLED) or an init that already ended ("not found"), but releases anyway
        if code == grpc.StatusCode.CANCELLED or "exit code" in details or "not found" in details:
            logger.info("released container %s (%s)", self.id, details)
        else:
            logger.warning("release of container %s failed: %s: %s", self.id, code, details)

    def _end_processes(self) -> None:
        deadline = time.monotonic() + RELEASE_GRACE
        for process in self._processes:
            if not process.done.wait(max(0.0, deadline - time.monotonic())):
                logger.warning("process %s did not end after release; cancelling", process.id)
                process.abandon()

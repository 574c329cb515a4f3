"""A debugging container that survives failing processes.

BuildKit ends a gateway container as soon as any of its processes exits non-zero: it
kills the first process (the container's init) and every later exec fails at once
(seen on v0.13 in Docker Engine 26.1.5 and on v0.32.2). The container also ends when its
init exits, whatever the status. So a `DebugContainer` starts a keeper as init, a shell
that blocks in `read` on a stdin that is never written, and runs every user process as an
exec wrapped in `/bin/sh -c WRAPPER`. The wrapper always exits 0 and reports the real
status out of band, as an APC escape sequence (ESC _ ... ESC \\) carrying a per-process
nonce at the end of the output: on fd 1 under a tty (where fd 2 is merged into it), on
fd 2 otherwise. `DebugProcess` strips these markers from the output stream. The scripts
and the marker parser are in `wrapper.py`.

A first process with a tty and no named user needs no separate keeper: it runs as the
init, wrapped in LEAD, which becomes the keeper once the command ends. That saves a
`runc exec` and a round trip before the first prompt (about 45 ms on Docker Engine 26.1.5).

Images without /bin/sh get buildx's behaviour instead: the first user process is the init
and later ones are plain execs, so a failing exec ends the container.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Mapping
from typing import Any

from bkdbg.errors import BuildCancelled, ContainerError
from bkdbg.gateway.container import (
    SIGNALS,
    START_TIMEOUT,
    Container,
    Dialer,
    Process,
    ProcessConfig,
    Sink,
    signal_name,
)
from bkdbg.gateway.invoke import DebugBuild, container_spec
from bkdbg.gateway.wrapper import (
    KEEPER,
    LEAD,
    SIGNAL_HELPER,
    USER_CHECK,
    WRAPPER,
    MarkerStripper,
)

logger = logging.getLogger(__name__)

STATES = ("result", "failed", "failed-init")
HELPER_TIMEOUT = 10.0  # seconds for a helper exec (user check, signal) to finish
PID_TIMEOUT = 5.0  # seconds to wait for the wrapper to report the child's pid

# ---------------------------------------------------------------- processes


class DebugProcess:
    """A user process in a DebugContainer, with the Process interface.

    `wait()` returns the status of the user's command, not of its wrapper, and
    `command_not_found` is set when the command does not exist in the container (the
    status is then 127). Without a keeper (`nonce` None), it passes everything through.

    A `lead` process is the container's init, wrapped in LEAD. It has ended, output
    included, once it reports its status, while its init goes on holding the container.
    Until `DebugContainer` knows that it started (`wait_reported`, then `confirm`), its
    output is held back, so that a lead that could not start leaves the sink untouched.
    """

    def __init__(
        self,
        container: DebugContainer,
        config: ProcessConfig,
        sink: Sink,
        nonce: str | None,
        *,
        lead: bool = False,
    ) -> None:
        self.config = config
        self.command_not_found = False
        self._container = container
        self._sink = sink
        self._nonce = nonce
        self._lead = lead
        self._marker_fd = 1 if config.tty else 2
        self._stripper = MarkerStripper(nonce, self._on_marker) if nonce else None
        self._status: int | None = None
        self._child_pid: int | None = None
        self._pid_known = threading.Event()  # also set when a lead's init ended first
        self._inner: Process | None = None
        # lead only: whether the command (or its init) ended, and the output kept until confirm
        self._ended = threading.Event()
        self._end_pending = False
        self._held_output: list[tuple[int, bytes]] | None = [] if lead else None
        self._discarded = False
        self._deliver_lock = threading.Lock()

    def start(self) -> None:
        config = self._wrapped_config() if self._nonce else self.config
        self._inner = self._container.container.start(config, self._on_output)
        if self._lead:
            threading.Thread(
                target=self._watch_init, name=f"lead-{self._inner.id}", daemon=True
            ).start()

    @property
    def inner(self) -> Process:
        if self._inner is None:
            raise ContainerError("process not started: call start() first")
        return self._inner

    @property
    def id(self) -> str:
        return self.inner.id

    @property
    def done(self) -> threading.Event:
        return self._ended if self._lead else self.inner.done

    def _wrapped_config(self) -> ProcessConfig:
        assert self._nonce is not None
        args = [
            "/bin/sh",
            "-c",
            LEAD if self._lead else WRAPPER,
            "bkdbg",
            self._nonce,
            str(self._marker_fd),
            self.config.cwd or "/",
            *self.config.args,
        ]
        fds = tuple(sorted(set(self.config.fds) | {self._marker_fd}))
        return ProcessConfig(
            args=args,
            env=self.config.env,
            cwd="/",
            user=self.config.user,
            tty=self.config.tty,
            rows=self.config.rows,
            cols=self.config.cols,
            fds=fds,
        )

    # ---------------------------------------------------------------- lead start

    def wait_reported(self, timeout: float) -> bool:
        """Wait until a lead's wrapper reports; False if its init ended or `timeout` passed."""
        return self._pid_known.wait(timeout) and (
            self._child_pid is not None or self._status is not None
        )

    def confirm(self) -> None:
        """Deliver a lead's held-back output, and from now on deliver it as it comes."""
        with self._deliver_lock:
            held_output, self._held_output = self._held_output or [], None
            for fd, data in held_output:
                self._sink(fd, data)

    def discard(self) -> None:
        """Drop a lead that could not start: nothing more of it reaches the sink."""
        with self._deliver_lock:
            self._held_output, self._discarded = None, True

    def _deliver(self, fd: int, data: bytes) -> None:
        if not self._lead:
            self._sink(fd, data)
            return
        with self._deliver_lock:
            if self._discarded:
                return
            if self._held_output is not None:
                self._held_output.append((fd, data))
            else:
                self._sink(fd, data)

    def _watch_init(self) -> None:
        self.inner.done.wait()
        self._end_output()
        self._pid_known.set()

    # ---------------------------------------------------------------- output

    def _on_output(self, fd: int, data: bytes) -> None:
        if self._lead and (not data or self._ended.is_set()):
            return  # an init's streams end only with the container: _end_output ends ours
        if self._stripper is None or fd != self._marker_fd:
            self._deliver(fd, data)
        elif data:
            plain = self._stripper.feed(data)
            if plain:
                self._deliver(fd, plain)
            if self._end_pending:
                self._end_output()
        else:
            rest = self._stripper.flush()
            if rest:
                self._deliver(fd, rest)
            self._deliver(fd, b"")

    def _on_marker(self, kind: str, value: int) -> None:
        if kind == "pid":
            self._child_pid = value
            self._pid_known.set()
            return
        self._status = value
        self.command_not_found = kind == "notfound"
        self._pid_known.set()
        if self._lead:
            self._end_pending = True  # _on_output ends it after delivering what preceded the marker
            return
        # BuildKit v0.13 reports the wrapper's Exit only after stdin EOF when there is no tty
        self.inner.close_stdin()

    def _end_output(self) -> None:
        """End a lead's output with EOF on each output fd, as BuildKit ends a process's."""
        if self._ended.is_set():
            return
        assert self._stripper is not None
        rest = self._stripper.flush()
        if rest:
            self._deliver(self._marker_fd, rest)
        for fd in self.config.fds:
            if fd != 0:
                self._deliver(fd, b"")
        self._ended.set()

    # ---------------------------------------------------------------- input

    def _check_running(self) -> None:
        if self._status is not None or self._ended.is_set():
            raise ContainerError(f"process has ended: {self.id}: start a new process")

    def write(self, data: bytes) -> None:
        """Send `data` to stdin; raise ContainerError once the process has ended."""
        self._check_running()
        self.inner.write(data)

    def close_stdin(self) -> None:
        """Send EOF on stdin (once); for a lead, whose stdin is the init's, do nothing."""
        if not self._lead:
            self.inner.close_stdin()

    def resize(self, rows: int, cols: int) -> None:
        """Set the terminal size (tty processes only)."""
        self._check_running()
        self.inner.resize(rows, cols)

    def signal(self, name: str) -> None:
        """Send a signal by name to the user's command; raise ValueError for unknown names."""
        wire = signal_name(name)
        if self._nonce is None:
            self.inner.signal(wire)
            return
        self._check_running()
        if not self._pid_known.wait(PID_TIMEOUT) or self._child_pid is None:
            self._check_running()
            raise ContainerError(f"process has no pid yet: {self.id}: try again")
        self._container.signal_pid(self._child_pid, SIGNALS[wire])

    # ---------------------------------------------------------------- wait

    def wait(self, timeout: float | None = None) -> int:
        """Wait until all output arrived; return the command's exit status.

        Raises TimeoutError after `timeout` seconds and ContainerError when the process
        was lost.
        """
        if self._lead:
            if not self._ended.wait(timeout):
                raise TimeoutError(f"process {self.id} still running after {timeout:g} s")
            if self._status is not None:
                return self._status
        wrapper_status = self.inner.wait(timeout)
        if self._stripper is None or self._status is not None:
            return wrapper_status if self._status is None else self._status
        if wrapper_status != 0:
            return wrapper_status  # the wrapper itself was killed, e.g. 137 by release
        logger.warning("process %s ended without reporting its status", self.id)
        return 255


# ---------------------------------------------------------------- container


class DebugContainer:
    """A container for debugging a build: on its result or in its failed step's state.

    `state` is `result` (the result ref mounted at `/`: `ref_id`, by default the one of
    `build.result`), `failed` (every mount of the failed exec op after the failure) or
    `failed-init` (the same mounts before it ran). `image_config` gives the platform of a
    result. `dial` (`Connection.h2_dialer`) gives each process stream its own HTTP/2
    connection. Raises ContainerError when the container cannot be created.
    """

    def __init__(
        self,
        build: DebugBuild,
        state: str,
        image_config: Mapping[str, Any] | None = None,
        *,
        ref_id: str | None = None,
        dial: Dialer | None = None,
    ) -> None:
        if state not in STATES:
            raise ValueError(f"unknown container state: {state!r}: use {', '.join(STATES)}")
        self.state = state
        self._build = build
        self._spec = container_spec(build, state, image_config, ref_id)
        self._dial = dial
        self.container = Container.create(build, dial=dial, **self._spec)
        # False once /bin/sh turned out to be missing. The init starts with the first
        # process: that process itself when it can lead (see _can_lead), else a keeper.
        self.wrapped = True
        self._init: Process | None = None
        self._init_lock = threading.Lock()

    def __enter__(self) -> DebugContainer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    @property
    def alive(self) -> bool:
        """Whether the container can still run processes (its init has not exited)."""
        return not self.container.released and not (self._init and self._init.exited.is_set())

    def run(self, config: ProcessConfig, sink: Sink) -> DebugProcess:
        """Start a user process; raise ContainerError if it cannot start.

        Also raises ContainerError when the container has ended, and naming the user when
        a named user or group does not exist.
        """
        with self._init_lock:
            if self._init is None and self.wrapped and not self.container.released:
                if not _can_lead(config):
                    self._start_keeper()
                elif lead := self._run_lead(config, sink):
                    return lead
        if not self.alive:
            raise ContainerError(
                f"container has ended: {self.container.id}: its first process exited; "
                "roll back or rebuild to get a new one"
            )
        if self.wrapped and config.user and not _numeric_user(config.user):
            self._check_user(config.user)
        process = DebugProcess(self, config, sink, secrets.token_hex(8) if self.wrapped else None)
        process.start()
        if self._init is None:
            self._init = process.inner
        return process

    def _run_lead(self, config: ProcessConfig, sink: Sink) -> DebugProcess | None:
        """Start the first process as init; None when it fell back to running without keeper."""
        process = DebugProcess(self, config, sink, secrets.token_hex(8), lead=True)
        process.start()
        self._init = process.inner
        if process.wait_reported(START_TIMEOUT):
            process.confirm()
            return process
        process.discard()
        if self.container.released:
            raise ContainerError(f"container was released: {self.container.id}: create a new one")
        reason = process.inner.exit_error or f"no report within {START_TIMEOUT:g} s"
        self._fall_back(ContainerError(f"the first process did not start: {reason}"))
        return None

    def _start_keeper(self) -> None:
        """Start the keeper as init, or fall back to running without one."""
        answered = threading.Event()
        output: list[bytes] = []

        def on_output(fd: int, data: bytes) -> None:
            output.append(data)
            answered.set()

        try:
            config = ProcessConfig(args=["/bin/sh", "-c", KEEPER], env=[], tty=True, fds=(0, 1))
            keeper = self.container.start(config, on_output)
            self._init = keeper
            if not answered.wait(START_TIMEOUT):
                raise ContainerError(f"keeper did not report ready within {START_TIMEOUT:g} s")
            if not output[0] or keeper.exited.is_set():
                # an init that runc could not start closes its output without writing
                raise ContainerError(f"keeper did not start: {keeper.exit_error or 'no output'}")
        except ContainerError as exc:
            if self.container.released:
                raise
            if str(exc).endswith("context canceled"):
                # BuildKit dropped the cancelled build's job, so a new container could not
                # start either, and each request for it waits about 3 s before it fails
                raise BuildCancelled(f"container not started: {self.container.id}: {exc}") from exc
            self._fall_back(exc)

    def _fall_back(self, reason: ContainerError) -> None:
        logger.warning(
            "cannot keep container %s alive with /bin/sh (%s); running processes without a "
            "keeper, so a process that fails ends the container, as in buildx",
            self.container.id,
            reason,
        )
        self.container.release()
        self.container = Container.create(self._build, dial=self._dial, **self._spec)
        self.wrapped = False
        self._init = None

    def _check_user(self, user: str) -> None:
        output = self._run_helper(USER_CHECK, [user], fds=(1,))
        answer = output.strip().decode("utf-8", "replace")
        if answer == "user":
            raise ContainerError(f"user not found in the container: {user}: check --user")
        if answer == "group":
            raise ContainerError(f"group not found in the container: {user}: check --user")
        if answer != "ok":
            raise ContainerError(f"could not check user {user}: unexpected output {answer!r}")

    def signal_pid(self, pid: int, number: int) -> None:
        """Send signal `number` to process `pid` in the container, from a helper exec."""
        self._run_helper(SIGNAL_HELPER, [str(number), str(pid)], fds=())

    def _run_helper(self, script: str, args: list[str], fds: tuple[int, ...]) -> bytes:
        """Run a root `sh -c script` that always exits 0; return its output."""
        chunks: list[bytes] = []

        def collect(fd: int, data: bytes) -> None:
            chunks.append(data)

        config = ProcessConfig(args=["/bin/sh", "-c", script, "bkdbg", *args], env=[], fds=fds)
        helper = self.container.start(config, collect)
        helper.wait(HELPER_TIMEOUT)
        return b"".join(chunks)

    def release(self) -> None:
        """Release the container and everything running in it; later calls do nothing."""
        self.container.release()


def _numeric_user(user: str) -> bool:
    return all(part.isdigit() for part in user.split(":"))


def _can_lead(config: ProcessConfig) -> bool:
    """Return whether a first process can be the init itself, wrapped in LEAD.

    It needs a tty: without one, the init would read EOF on its stdin once the command
    ended, and end the container. It must not name a user either, because BuildKit fails
    an init whose user is missing, and that failure would end the container.
    """
    return config.tty and (not config.user or _numeric_user(config.user))

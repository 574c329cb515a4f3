"""The debugging session of one server: its build, the current container and the processes.

A server has one build. Build and Reload run the build in a thread and stream its
progress. The interactive process (from `--invoke`) starts on the result, or in the
failed step's state. Rollback and Exec start processes in a container of the same build. The
current container is replaced only after its successor runs, so a rollback that fails to
start keeps the user's shell.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import shlex
import threading
import time
from collections.abc import Callable

from bkdbg.daemon.backend import (
    STATE_FAILED,
    STATE_FAILED_INIT,
    STATE_RESULT,
    Backend,
    BuildHandle,
    ContainerHandle,
    ProcessSpec,
    Terminal,
)
from bkdbg.daemon.buildrun import BuildRun
from bkdbg.daemon.clients import ClientRegistry
from bkdbg.daemon.messages import (
    BuildDone,
    Closed,
    ProcessInfo,
    ServerEvent,
)
from bkdbg.daemon.processes import RUNNING, Attachment, ManagedProcess
from bkdbg.errors import (
    BkdbgError,
    BuildCancelled,
    BuildFailed,
    NotAttached,
    ServerError,
    UsageError,
)
from bkdbg.options import BuildOptions, InvokeConfig

logger = logging.getLogger(__name__)

IDLE, BUILDING, BUILT, FAILED, CANCELLED = "idle", "building", "built", "failed", "cancelled"
# what rollback starts when the build had no --invoke
DEFAULT_INVOKE = InvokeConfig(entrypoint=["sh"], args=[])
KEPT_EXITED_PROCESSES = 32
# how long a released container's processes get to report their exit before the server
# records it for them
RELEASE_EXIT_WAIT = 5.0
BUILD_JOIN_TIMEOUT = 15.0


class Session:
    """Build, containers and processes of one server, safe to call from any RPC thread."""

    def __init__(self, backend: Backend, instance_id: str,
                 request_stop: Callable[[str], None],
                 note_context: Callable[[str], None] | None = None) -> None:
        self.backend = backend
        self.instance_id = instance_id
        self.request_stop = request_stop
        self.note_context = note_context
        self.clients = ClientRegistry()
        self.build_state = IDLE
        self.options_json = ""
        self.options: BuildOptions | None = None
        self.address = ""
        self.last_exit_code = 0
        # _lock guards the fields below for quick reads; _op_lock orders the operations
        # that change them (build, reload, rollback, exec, close), which may take seconds
        self._lock = threading.RLock()
        self._op_lock = threading.Lock()
        self._closing = False
        self._build: BuildHandle | None = None
        self._build_thread: threading.Thread | None = None
        self._container: ContainerHandle | None = None
        self._container_state = ""
        self._container_processes: list[ManagedProcess] = []
        self._processes: dict[str, ManagedProcess] = {}
        self._current = ""
        self._process_ids = itertools.count(1)
        self._first_run: BuildRun | None = None  # started by start_first_build, not yet taken
        self._cancel_requested = False  # a client cancelled the running build
        self.ended_by_client = False  # a Goodbye ended the session, not kill or a signal
        self.build_ended = threading.Event()  # a build ended, or the session closed

    # ------------------------------------------------------------ builds

    def start_build(self, options_json: str, terminal: Terminal) -> BuildRun:
        """Start the build that a client requests, or hand it the first build if they match."""
        options = parse_options(options_json)
        with self._op_lock:
            self._check_open()
            first, self._first_run = self._first_run, None
            if first is not None and options_json == self.options_json:
                logger.info("build of %s: the client takes over the build started for it",
                            options.context)
                return first
            if first is not None:
                self._drop_first_build(options_json)
            if self.build_state != IDLE:
                raise ServerError(
                    f"bkdbg server {self.instance_id} already has a build: "
                    "use reload, or run bkdbg build for another server"
                )
            self.options, self.options_json = options, options_json
            logger.info("build of %s requested", options.context)
            if self.note_context is not None:
                self.note_context(options.context)
            return self._start_run(options, terminal)

    def start_first_build(self, options_json: str, terminal: Terminal) -> BuildRun:
        """Start the build of the launching client's command line before the server serves.

        The client's Build request with the same options then streams this build,
        progress from its start included, instead of starting another one.
        """
        # no lock needed: the server does not serve yet, so no request can take it meanwhile
        self._first_run = self.start_build(options_json, terminal)
        return self._first_run

    def _drop_first_build(self, requested_json: str) -> None:
        # a bug, since client and server derive both from the same command line: give the
        # client what it requests rather than a build it did not ask for
        # contexts only: the options may carry build arguments with secrets in them
        logger.warning("the client requests other build options than its command line gave "
                       "(context %s, then %s): starting the requested build",
                       parse_options(self.options_json).context,
                       parse_options(requested_json).context)
        self._cancel_build(self._build)
        self._end_build("container released: the client requested another build")
        with self._lock:
            self.build_state = IDLE

    def reload(self, terminal: Terminal) -> BuildRun:
        with self._op_lock:
            self._check_open()
            if self.options is None or self.build_state == BUILDING:
                raise NotAttached(
                    f"nothing to reload in bkdbg server {self.instance_id}: "
                    + ("wait for the build to finish" if self.options else "run build first")
                )
            self._end_build("container released by reload")
            logger.info("reload of %s requested", self.options.context)
            return self._start_run(_reload_options(self.options_json), terminal)

    def cancel_build(self, client_id: str) -> bool:
        """Cancel the running build at a client's request; return False when none runs."""
        with self._lock:
            if self.build_state != BUILDING:
                return False
            self._cancel_requested = True
            handle = self._build
        logger.info("client %s cancels the build", client_id or "unknown")
        self._cancel_build(handle)
        return True

    def _start_run(self, options: BuildOptions, terminal: Terminal) -> BuildRun:
        run = BuildRun()
        with self._lock:
            self.build_state = BUILDING
            self._cancel_requested = False
        thread = threading.Thread(
            target=self._run_build, args=(run, options, terminal), name="build", daemon=True
        )
        self._build_thread = thread
        thread.start()
        return run

    def _run_build(self, run: BuildRun, options: BuildOptions, terminal: Terminal) -> None:
        started = time.monotonic()
        try:
            state, done = self._build_and_invoke(run, options, terminal)
        except BkdbgError as exc:
            state = CANCELLED if isinstance(exc, BuildCancelled) else FAILED
            done = BuildDone(ok=False, error=str(exc), error_kind=type(exc).__name__)
        except Exception as exc:
            logger.exception("build failed with an internal error")
            state = FAILED
            done = BuildDone(
                ok=False,
                error=f"internal error in the bkdbg server: {exc}: see its log",
                error_kind="ServerError",
            )
        with self._lock:
            self.build_state = state
            # a cancel that came as the build ended must not stop a later rollback
            self._cancel_requested = False
        logger.info("build %s after %.1f s: %s", state, time.monotonic() - started,
                    done.error or "ok")
        run.connected.set()
        run.finish(done)
        self.build_ended.set()
        self.clients.broadcast(ServerEvent("build-finished", done.error or "build finished",
                                           done.process_id))

    def _build_and_invoke(self, run: BuildRun, options: BuildOptions,
                          terminal: Terminal) -> tuple[str, BuildDone]:
        handle = self.backend.start_build(options, run.publish)
        with self._lock:
            self._build, self.address = handle, handle.address
            closing, cancelled = self._closing, self._cancel_requested
        # close() or cancel_build() may have run before this build had a handle to cancel
        if closing:
            self._end_build("the server is stopping")
            raise BuildCancelled(f"build cancelled: {options.context}: the server is stopping")
        if cancelled:
            self._end_build("build cancelled by a client")
            raise BuildCancelled(f"build cancelled: {options.context}: a client cancelled it")
        run.connected.set()
        try:
            handle.solve()
        except BuildFailed as exc:
            return FAILED, self._after_failure(handle, options, exc, terminal)
        notes = handle.export() if options.outputs or options.tags else []
        return BUILT, self._after_success(handle, options, notes, terminal)

    def _after_success(self, handle: BuildHandle, options: BuildOptions,
                       notes: list[str], terminal: Terminal) -> BuildDone:
        if options.invoke is None or options.invoke.on != "always":
            return BuildDone(ok=True, notes=notes)
        try:
            process_id = self._start_interactive(handle, STATE_RESULT, "", terminal)
        except BkdbgError as exc:
            logger.warning("interactive process did not start: %s", exc)
            return BuildDone(ok=True, error=str(exc), error_kind=type(exc).__name__, notes=notes)
        return BuildDone(ok=True, process_id=process_id, notes=notes)

    def _after_failure(self, handle: BuildHandle, options: BuildOptions,
                       exc: BuildFailed, terminal: Terminal) -> BuildDone:
        done = BuildDone(ok=False, error=str(exc), error_kind="BuildFailed", failed_step=exc.step)
        if options.invoke is None:
            return done
        if not handle.can_debug_failure():
            done.notes.append(
                "no debug shell: BuildKit gave no state for the failed step: fix the step "
                "and build again"
            )
            return done
        try:
            process_id = self._start_interactive(handle, STATE_FAILED, "", terminal)
            done = dataclasses.replace(done, process_id=process_id)
        except BkdbgError as start_error:
            logger.warning("debug process did not start: %s", start_error)
            done.notes.append(f"no debug shell: {start_error}")
        return done

    # ------------------------------------------------------------ containers

    def rollback(self, init: bool, terminal: Terminal) -> str:
        with self._op_lock:
            self._check_open()
            with self._lock:
                handle, state = self._build, self.build_state
            if handle is None or state not in (BUILT, FAILED):
                raise NotAttached(self._no_container_hint(handle, state))
            if init and state != FAILED:
                raise UsageError(
                    "rollback --init needs a failed build: the last build succeeded: "
                    "use rollback without --init"
                )
            if state == FAILED and not handle.can_debug_failure():
                raise NotAttached(self._no_container_hint(handle, state))
            if state == BUILT:
                target = STATE_RESULT
            else:
                target = STATE_FAILED_INIT if init else STATE_FAILED
            logger.info("rollback to the %s state requested", target)
            return self._start_interactive(handle, target, "container replaced by rollback",
                                           terminal)

    def exec(self, args: list[str], env: list[str], user: str, cwd: str, tty: bool,
             terminal: Terminal) -> str:
        if not args:
            raise UsageError("exec needs a command: none given: e.g. exec ls /")
        invoke = InvokeConfig(entrypoint=args[:1], args=args[1:], env=list(env),
                              user=user or None, cwd=cwd or None, tty=tty)
        with self._op_lock:
            self._check_open()
            with self._lock:
                handle, container, state = self._build, self._container, self._container_state
                build_state = self.build_state
            if handle is None or container is None:
                raise NotAttached(self._no_container_hint(handle, build_state))
            spec = handle.process_spec(invoke, state, terminal)
            process = self._start_process(container, spec)
            with self._lock:
                self._container_processes.append(process)
        return process.id

    def _raise_if_stopping(self) -> None:
        """Raise BuildCancelled once the session closes or a client cancelled the build."""
        with self._lock:
            stopping = self._closing or self._cancel_requested
        if stopping:
            raise BuildCancelled(f"bkdbg server {self.instance_id}: the build was cancelled")

    def _no_container_hint(self, handle: BuildHandle | None, build_state: str) -> str:
        """Return why no container can run now, naming the command that starts one."""
        server = f"bkdbg server {self.instance_id}"
        if handle is None or build_state not in (BUILT, FAILED):
            return f"no build result in {server}: run build or reload first"
        if build_state == FAILED and not handle.can_debug_failure():
            return (
                f"no container to start in {server}: the build failed before a RUN step "
                "ran: fix the context and run reload"
            )
        return f"no container runs in {server}: start one with rollback, or build with --invoke"

    def _start_interactive(self, handle: BuildHandle, state: str, reason: str,
                           terminal: Terminal) -> str:
        """Start a container and the interactive process in it; then retire the old one."""
        invoke = self.options.invoke if self.options and self.options.invoke else DEFAULT_INVOKE
        spec = handle.process_spec(invoke, state, terminal)
        # After a cancel, BuildKit has dropped the build's job, and each gateway request for
        # it waits about 3 s before it fails, so a cancel stops the start before the next one
        self._raise_if_stopping()
        container = handle.new_container(state)
        try:
            self._raise_if_stopping()
            process = self._start_process(container, spec)
        except BaseException:
            _release_quietly(container)
            raise
        with self._lock:
            closing = self._closing
            if not closing:
                old = (self._container, self._container_processes)
                self._container, self._container_state = container, state
                self._container_processes = [process]
                self._current = process.id
        if closing:
            # close() has already released what it knew of; this container is ours to end
            self._retire(container, [process], "the server is shutting down")
            raise ServerError(f"bkdbg server {self.instance_id} is shutting down: start a new one")
        self._retire(old[0], old[1], reason, process.id)
        return process.id

    def _start_process(self, container: ContainerHandle, spec: ProcessSpec) -> ManagedProcess:
        process = ManagedProcess(f"p{next(self._process_ids)}", spec.args, spec.tty,
                                 self._on_process_exit)
        handle = container.run(spec, process.sink)
        with self._lock:
            self._processes[process.id] = process
            self._prune_exited()
        logger.info("started process %s: %s", process.id, shlex.join(spec.args))
        # announced before bind() starts watching for the exit, so that clients always see
        # process-started before process-exited
        self.clients.broadcast(
            ServerEvent("process-started", shlex.join(process.args), process.id)
        )
        process.bind(handle)
        return process

    def _retire(self, container: ContainerHandle | None, processes: list[ManagedProcess],
                reason: str, replaced_by: str = "") -> None:
        """Release a container; its processes end with `reason`."""
        for process in processes:
            process.set_exit_reason(reason, replaced_by)
        if container is None:
            return
        _release_quietly(container)
        running = [p for p in processes if p.state == RUNNING]
        if running:
            threading.Thread(target=_reap, args=(running, reason), name="reap",
                             daemon=True).start()

    def _end_build(self, reason: str) -> None:
        """Release the container and close the build (reload, shutdown)."""
        with self._lock:
            container, processes = self._container, self._container_processes
            handle = self._build
            self._container, self._container_processes, self._container_state = None, [], ""
            self._build = None
        self._retire(container, processes, reason)
        if handle is not None:
            try:
                handle.close()
            except BkdbgError as exc:
                logger.warning("closing the build failed: %s", exc)

    def _prune_exited(self) -> None:
        exited = [
            p for p in self._processes.values() if p.state != RUNNING and p.id != self._current
        ]
        for process in exited[: max(0, len(exited) - KEPT_EXITED_PROCESSES)]:
            del self._processes[process.id]

    def _on_process_exit(self, process: ManagedProcess) -> None:
        with self._lock:
            if process.id == self._current:
                self.last_exit_code = process.exit_code
        self.clients.broadcast(ServerEvent(
            "process-exited", f"process {process.id} exited with status {process.exit_code}",
            process.id,
        ))

    # ------------------------------------------------------------ clients and processes

    def attach(self, process_id: str, client_id: str, read_only: bool, replay: bool,
               size: tuple[int, int]) -> tuple[ManagedProcess, Attachment]:
        with self._lock:
            process = self._processes.get(process_id or self._current)
        if process is None:
            if process_id:
                raise NotAttached(f"no such process: {process_id}: see ps for the process ids")
            raise NotAttached(
                f"no process runs in bkdbg server {self.instance_id}: "
                "start one with rollback or exec"
            )
        attachment = process.attach(client_id, read_only, replay)
        if not read_only and all(size):
            process.resize(attachment, *size)
        return process, attachment

    def list_processes(self) -> list[ProcessInfo]:
        with self._lock:
            processes, current = list(self._processes.values()), self._current
        return [process.info(process.id == current) for process in processes]

    def attached_processes(self) -> dict[str, str]:
        """Map each client holding a process's input to that process id."""
        with self._lock:
            processes = list(self._processes.values())
        return {p.owner_client(): p.id for p in processes if p.owner_client()}

    @property
    def current_process(self) -> str:
        with self._lock:
            return self._current

    def disconnect(self, client_id: str, requester: str) -> int:
        targets = [client_id] if client_id else [
            record.id for record in self.clients.present(exclude=requester)
        ]
        closed = Closed(f"disconnected by client {requester or 'unknown'}")
        with self._lock:
            processes = list(self._processes.values())
        for target in targets:
            for process in processes:
                process.close_client(target, closed)
            self.clients.broadcast(ServerEvent("disconnected", closed.reason), only=target)
            self.clients.end_events(target)
            logger.info("client %s disconnected by %s", target, requester or "unknown")
        return len(targets)

    def goodbye(self, client_id: str, end_session: bool) -> bool:
        """Forget the client; return True when this ends the server."""
        others = self.clients.present(exclude=client_id)
        self.clients.forget(client_id)
        if not end_session:
            return False
        if others:
            logger.info("client %s ended the session, but clients %s remain: not stopping",
                        client_id, ", ".join(r.id for r in others))
            return False
        self.ended_by_client = True
        self.request_stop(f"client {client_id} ended the session")
        return True

    def idle_seconds(self) -> float:
        """Return how long nothing happened: no client, build or running process."""
        with self._lock:
            busy = self.build_state == BUILDING or any(
                p.state == RUNNING for p in self._processes.values()
            )
        return 0.0 if busy else self.clients.idle_seconds()

    # ------------------------------------------------------------ shutdown

    def _check_open(self) -> None:
        if self._closing:
            raise ServerError(f"bkdbg server {self.instance_id} is shutting down: start a new one")

    def close(self) -> None:
        """End every stream, cancel the build, release the container; idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            processes, handle = list(self._processes.values()), self._build
        self.build_ended.set()
        closed = Closed(f"bkdbg server {self.instance_id} is shutting down")
        for process in processes:
            process.close_attachments(closed)
        self.clients.broadcast(ServerEvent("shutdown", closed.reason))
        self.clients.end_events()
        self._cancel_build(handle)
        self._end_build("container released: the server is shutting down")

    def _cancel_build(self, handle: BuildHandle | None) -> None:
        # TODO: a cancel while the interactive process starts (after the solve) waits for
        # the requests already under way to fail: BuildKit has dropped the job, and each
        # request for it (ExecProcess, ReleaseContainer) then takes about 3 s. The server
        # stops up to about 3 s late, and is listed meanwhile; nothing is left running.
        thread = self._build_thread
        if thread is None or not thread.is_alive():
            return
        logger.info("cancelling the running build")
        if handle is not None:
            handle.cancel()
        thread.join(BUILD_JOIN_TIMEOUT)
        if thread.is_alive():
            logger.warning("the build thread did not end within %.0f s", BUILD_JOIN_TIMEOUT)


def parse_options(options_json: str) -> BuildOptions:
    try:
        return BuildOptions.from_json(options_json)
    except (ValueError, TypeError, KeyError) as exc:
        raise UsageError(
            f"invalid build options from the client: {exc}: use the same bkdbg version "
            "for client and server"
        ) from exc


def _reload_options(options_json: str) -> BuildOptions:
    """Return the options of a reload, with `--on error` turned into `--on always`.

    A reload happens inside a debugging session, so it restarts the interactive process
    on the result after a fixed build as well as in the state of a new failure.
    """
    options = parse_options(options_json)
    if options.invoke is not None:
        options.invoke = dataclasses.replace(options.invoke, on="always")
    return options


def _release_quietly(container: ContainerHandle) -> None:
    try:
        container.release()
    except BkdbgError as exc:
        logger.warning("releasing a container failed: %s", exc)


def _reap(processes: list[ManagedProcess], reason: str) -> None:
    deadline = time.monotonic() + RELEASE_EXIT_WAIT
    for process in processes:
        if not process.wait_exited(max(0.0, deadline - time.monotonic())):
            logger.warning("process %s reported no exit after its container was released",
                           process.id)
            process.finish(137, reason)

"""A Dockerfile build driven through BuildKit's gateway API and kept open for debugging.

The order of calls (checked against BuildKit v0.13 in Docker Engine 26 and buildkitd v0.32):

1. open the session, which serves the context, the Dockerfile, secrets and SSH;
2. read `Control.Status(ref)` in a thread and turn it into progress events;
3. start `Control.Solve(ref, session)` with no frontend and no definition, so that BuildKit
   registers an LLB bridge for `ref` and waits for `LLBBridge.Return`;
4. call the bridge with the metadata `buildkit-controlapi-buildid: ref`: `Ping` (retried
   while BuildKit has not registered `ref` yet), then `Solve(dockerfile.v0, Evaluate)`,
   which runs the build and returns the result ref, or fails with typed error details;
5. `close()` sends `Return`; then `Control.Solve` ends, applies any exporters, and the
   Status stream ends.

Between 4 and 5 the result ref, or the failed step's mount states, can be mounted in
containers (`bkdbg.gateway.container`).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from bkdbg.buildkit_proto import (
    control_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    rpc_status_pb2,
)
from bkdbg.errors import BkdbgError, BuildCancelled, BuildFailed, FailedStep
from bkdbg.gateway.connection import Connection
from bkdbg.gateway.errdetails import (
    FailedExec,
    error_details,
    failed_exec,
    failed_step,
    failure_message,
)
from bkdbg.gateway.filesend import ExportDestination
from bkdbg.gateway.frontend import (
    DOCKERFILE_LOCAL,
    FRONTEND,
    FrontendSetup,
    frontend_setup,
)
from bkdbg.gateway.progress import StatusTracker
from bkdbg.gateway.result import BuildResult, build_result, final_vertex
from bkdbg.gateway.session import Session
from bkdbg.options import BuildOptions
from bkdbg.progress import ProgressEvent

logger = logging.getLogger(__name__)

__all__ = ["BuildResult", "FailedExec", "GatewayBuild"]

BUILD_ID_KEY = "buildkit-controlapi-buildid"
PING_WAIT = 10.0  # seconds; BuildKit itself returns NOT_FOUND after waiting 3 s for the ref
RPC_TIMEOUT = 10.0  # seconds for the short bridge calls (Ping, Return)
SOLVE_END_TIMEOUT = 30.0  # seconds for Control.Solve to end after Return, without exporters
STATUS_END_TIMEOUT = 5.0  # seconds for the Status stream to end after Control.Solve
LOG_WAIT = 1.0  # seconds to wait for the failed step's last output on the Status stream
PROGRESS_WAIT = 1.0  # seconds to wait for the Status stream to report the result's steps
UNKNOWN = 2  # google.rpc.Code UNKNOWN, what BuildKit uses for build errors
# labels of the worker of a Docker Engine's embedded BuildKit
MOBY_LABEL_PREFIX = "org.mobyproject.buildkit.worker.moby."
HOST_GATEWAY_LABEL = MOBY_LABEL_PREFIX + "host-gateway-ip"

ProgressCallback = Callable[[list[ProgressEvent]], None]


def new_ref() -> str:
    """Return a random build ref; BuildKit only needs it to be unique."""
    return secrets.token_hex(13)


class GatewayBuild:
    """One Dockerfile build through the gateway, open until `close()`.

    `exporters` are applied by BuildKit to the result when it is returned (see
    `bkdbg.gateway.export`); `session_exports` lets the session receive their files.
    """

    def __init__(
        self,
        conn: Connection,
        options: BuildOptions,
        on_progress: ProgressCallback,
        *,
        exporters: list[control_pb2.Exporter] | None = None,
        session_exports: Sequence[ExportDestination] | None = None,
    ) -> None:
        self.options = options
        self.ref = new_ref()
        self.call_metadata: tuple[tuple[str, str], ...] = ((BUILD_ID_KEY, self.ref),)
        self.bridge = gateway_pb2_grpc.LLBBridgeStub(conn.channel)
        self.failed_exec: FailedExec | None = None
        self.result: BuildResult | None = None
        self.exporter_response: dict[str, str] = {}
        self._conn = conn
        self._control = conn.control
        self._on_progress = on_progress
        self._exporters = list(exporters or [])
        self._session_exports = session_exports
        self._tracker = StatusTracker(on_progress)
        self._setup: FrontendSetup | None = None
        self._session: Session | None = None
        self._status_call: Any = None
        self._status_thread: threading.Thread | None = None
        self._control_solve: Any = None  # grpc future of Control.Solve
        self._bridge_solve: Any = None  # grpc future of LLBBridge.Solve
        self._failure: rpc_status_pb2.Status | None = None
        self._close_hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._started = False
        self._cancelled = False
        self._closed = False

    # ------------------------------------------------------------------ solve

    def solve(self) -> BuildResult:
        """Run the build; return its result, or raise with the build still open.

        Raises UsageError for a missing context or Dockerfile (before contacting
        BuildKit), BuildFailed (with `step`, and `failed_exec` set when an exec op
        failed), BuildCancelled after `cancel()`, and BuildkitUnreachable.
        """
        with self._lock:
            if self._started:
                raise RuntimeError("GatewayBuild.solve() may run only once")
            self._started = True
        try:
            workers = list_workers(self._conn)
            self._setup = frontend_setup(
                self.options, docker_engine=is_moby(workers), host_gateway_ip=_gateway_ip(workers)
            )
            self._start()
            self._ping()
            self._check_cancelled()
            self.result = self._run_frontend()
        except BuildFailed:
            raise  # the build stays open for debugging until close()
        except BaseException:
            # Ctrl-C, cancel() or a lost connection: stop the build in BuildKit at once
            self.cancel()
            raise
        return self.result

    def _check_cancelled(self) -> None:
        """Raise BuildCancelled if cancel() ran before the calls it cancels existed."""
        if self._cancelled:
            self._cancel_calls()
            raise BuildCancelled(f"build cancelled: {self.ref}")

    def _start(self) -> None:
        assert self._setup is not None
        options = self.options
        self._session = Session(
            self._control,
            shared_key=self._setup.shared_key,
            local_dirs=self._setup.local_dirs,
            secrets=options.secrets,
            ssh=options.ssh,
            exports=self._session_exports,
        )
        self._session.start()
        self._start_status()
        request = control_pb2.SolveRequest(
            Ref=self.ref,
            Session=self._session.id,
            Exporters=self._exporters,
            Entitlements=self._setup.entitlements,
        )
        self._control_solve = self._control.Solve.future(request)
        logger.info("build %s started (session %s)", self.ref, self._session.id)

    def _start_status(self) -> None:
        self._status_call = self._control.Status(control_pb2.StatusRequest(Ref=self.ref))
        self._status_thread = threading.Thread(
            target=self._read_status, name=f"status-{self.ref[:8]}", daemon=True
        )
        self._status_thread.start()

    def _read_status(self) -> None:
        try:
            for response in self._status_call:
                self._tracker.feed(response)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            # Status finds no job when Control.Solve failed at once, whose error is reported
            level = logging.DEBUG if exc.code() == grpc.StatusCode.NOT_FOUND else logging.WARNING
            logger.log(level, "build %s: status stream failed: %s", self.ref, exc.details())
        finally:
            self._tracker.end()

    def _ping(self) -> gateway_pb2.PongResponse:
        """Ping the bridge, retrying while BuildKit has not registered the build ref."""
        deadline = time.monotonic() + PING_WAIT
        while True:
            try:
                pong: gateway_pb2.PongResponse = self.bridge.Ping(
                    gateway_pb2.PingRequest(), metadata=self.call_metadata, timeout=RPC_TIMEOUT
                )
                return pong
            except grpc.RpcError as exc:
                self._raise_if_solve_failed()
                if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                    raise self._map_error(exc, "LLBBridge.Ping") from exc
                logger.debug("build %s: not registered yet, retrying Ping", self.ref)
                time.sleep(0.05)

    def _raise_if_solve_failed(self) -> None:
        """Raise the error of Control.Solve if it already ended, for example because
        BuildKit rejected an exporter, so that the ref will never be registered."""
        future = self._control_solve
        if future is None or not future.done() or future.cancelled():
            return
        error = future.exception()
        if error is not None:
            raise self._map_error(error, "Control.Solve") from error

    def _run_frontend(self) -> BuildResult:
        assert self._setup is not None
        request = gateway_pb2.SolveRequest(
            Frontend=FRONTEND,
            FrontendOpt=self._setup.attrs,
            allowResultReturn=True,
            allowResultArrayRef=True,
            Evaluate=True,
        )
        logger.info("build %s: solving with options %s", self.ref, sorted(self._setup.attrs))
        self._bridge_solve = self.bridge.Solve.future(request, metadata=self.call_metadata)
        try:
            response: gateway_pb2.SolveResponse = self._bridge_solve.result()
        except grpc.FutureCancelledError as exc:
            raise BuildCancelled(f"build cancelled: {self.ref}") from exc
        except grpc.RpcError as exc:
            raise self._solve_error(exc) from exc
        result = build_result(response.result, self.options.platforms)
        final = final_vertex(response.result, result.ref_id)
        if final is not None and not self._tracker.wait_settled(final, PROGRESS_WAIT):
            logger.debug("build %s: progress of %s still open after the solve", self.ref, final)
        return result

    # ------------------------------------------------------------------ failures

    def _solve_error(self, exc: grpc.RpcError) -> BkdbgError:
        code = exc.code()
        if self._cancelled or code == grpc.StatusCode.CANCELLED:
            return BuildCancelled(f"build cancelled: {self.ref}")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return self._map_error(exc, "LLBBridge.Solve")
        details = error_details(exc)
        self._failure = rpc_status_pb2.Status(code=UNKNOWN, message=details.message)
        digest = details.vertex or self._tracker.failed_vertex()
        if digest:
            self._tracker.wait_vertex_done(digest, LOG_WAIT)
        step = failed_step(
            details,
            vertex_name=self._tracker.vertex_name(digest) if digest else None,
            logs=self._tracker.vertex_logs(digest) if digest else [],
        )
        self._name_dockerfile(step)
        self.failed_exec = failed_exec(details, step)
        message = failure_message(details, step, self._dockerfile_text(), self.options.target)
        logger.info("build %s failed: %s", self.ref, message)
        return BuildFailed(message, step)

    def _dockerfile_path(self) -> str | None:
        if self._setup is None or self.options.dockerfile_content is not None:
            return None
        return os.path.join(self._setup.local_dirs[DOCKERFILE_LOCAL], self._setup.attrs["filename"])

    def _name_dockerfile(self, step: FailedStep) -> None:
        """Show the main Dockerfile by its local path rather than its name in BuildKit."""
        path = self._dockerfile_path()
        if path is not None and step.filename == os.path.basename(path):
            step.filename = path

    def _dockerfile_text(self) -> str | None:
        if self.options.dockerfile_content is not None:
            return self.options.dockerfile_content
        path = self._dockerfile_path()
        try:
            with open(path or "", encoding="utf-8", errors="replace") as file:
                return file.read()
        except OSError:
            return None

    def _map_error(self, exc: grpc.RpcError, method: str) -> BkdbgError:
        if self._cancelled:
            return BuildCancelled(f"build cancelled: {self.ref}")
        return self._conn.map_error(exc, method)

    # ------------------------------------------------------------------ end

    def add_close_hook(self, hook: Callable[[], None]) -> None:
        """Run `hook` first in `close()`, for example to release a container."""
        self._close_hooks.append(hook)

    def close(self, error: str | None = None) -> None:
        """Release containers, `Return` the result (or `error`), end the solve and session.

        Idempotent, and safe after `cancel()`. Errors while closing are logged, not raised.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._run_close_hooks()
        if self._bridge_solve is not None and not self._bridge_solve.done():
            self.cancel()  # closed while solve() still runs, from another thread
        if self._control_solve is not None and not self._cancelled:
            self._return(error)
            self._wait_control_solve(SOLVE_END_TIMEOUT)
        self._shutdown()
        logger.info("build %s closed", self.ref)

    def finish(self) -> dict[str, str]:
        """Return the result and wait for BuildKit to export it; return its exporter response.

        Raises BuildkitError when an exporter fails.
        """
        with self._lock:
            self._closed = True
        self._run_close_hooks()
        try:
            self._return(None)
            # no time limit: exporting a large image or tree takes as long as it takes,
            # and cancel() (Ctrl-C) still ends it
            return self._wait_control_solve(None, raise_errors=True)
        finally:
            self._shutdown()

    def cancel(self) -> None:
        """Stop the build in BuildKit; safe from any thread, and before or after `solve`."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
        logger.info("build %s: cancelling", self.ref)
        self._cancel_calls()

    def _cancel_calls(self) -> None:
        # Cancelling Control.Solve makes BuildKit discard the job and stop its running steps.
        # NOTE: the BuildKit in Docker Engine 26.1.5 misses a cancel that comes while a RUN
        # step's process starts, and that step then runs to its end. Seen here with Ctrl-C
        # about 0.1 s into a build; moby/buildkit#5106 (July 2024) fixed it upstream.
        for call in (self._bridge_solve, self._control_solve, self._status_call):
            if call is not None:
                call.cancel()

    def _run_close_hooks(self) -> None:
        hooks, self._close_hooks = self._close_hooks, []
        for hook in reversed(hooks):
            try:
                hook()
            except Exception:
                logger.exception("build %s: close hook failed", self.ref)

    def _return(self, error: str | None) -> None:
        if error is not None:
            request = gateway_pb2.ReturnRequest(
                error=rpc_status_pb2.Status(code=UNKNOWN, message=error)
            )
        elif self.result is not None:
            request = gateway_pb2.ReturnRequest(result=self.result.result)
        else:
            message = self._failure.message if self._failure else "build did not finish"
            request = gateway_pb2.ReturnRequest(
                error=rpc_status_pb2.Status(code=UNKNOWN, message=message)
            )
        try:
            self.bridge.Return(request, metadata=self.call_metadata, timeout=RPC_TIMEOUT)
        except grpc.RpcError as exc:
            logger.warning("build %s: Return failed: %s", self.ref, exc.details())
            self._cancel_calls()

    def _wait_control_solve(
        self, timeout: float | None, raise_errors: bool = False
    ) -> dict[str, str]:
        """Wait for Control.Solve to end; return its exporter response.

        With `raise_errors`, a failed export raises BuildkitError and a cancelled one
        BuildCancelled; otherwise both are logged and give an empty response.
        """
        try:
            response = self._control_solve.result(timeout=timeout)
        except grpc.FutureTimeoutError:
            logger.warning("build %s: Control.Solve did not end; cancelling it", self.ref)
            self._control_solve.cancel()
            return {}
        except grpc.FutureCancelledError as exc:
            if raise_errors:
                raise BuildCancelled(f"export cancelled: {self.ref}: nothing was exported") from exc
            return {}
        except grpc.RpcError as exc:
            # after a Return with an error, BuildKit ends Control.Solve with that error
            logger.debug("build %s: Control.Solve ended: %s", self.ref, exc.details())
            if raise_errors:
                raise self._map_error(exc, "export") from exc
            return {}
        self.exporter_response = dict(response.ExporterResponse)
        return self.exporter_response

    def _shutdown(self) -> None:
        if self._status_thread is not None:
            self._status_thread.join(STATUS_END_TIMEOUT)
            if self._status_thread.is_alive():
                self._status_call.cancel()
                self._status_thread.join(STATUS_END_TIMEOUT)
        if self._session is not None:
            self._session.close()
        if self._setup is not None:
            self._setup.cleanup()

    # ------------------------------------------------------------------ outputs

    def export(self, options: BuildOptions | None = None) -> list[str]:
        """Export the outputs of `options` (default: this build's) with a cached re-solve.

        Returns the notes to print. See `bkdbg.gateway.export.export_outputs`.
        """
        from bkdbg.gateway.export import export_outputs

        return export_outputs(self._conn, options or self.options, self._on_progress)


def list_workers(conn: Connection) -> list[Any]:
    """Return BuildKit's worker records; raises BuildkitUnreachable or BuildkitError."""
    try:
        response = conn.control.ListWorkers(control_pb2.ListWorkersRequest(), timeout=RPC_TIMEOUT)
    except grpc.RpcError as exc:
        raise conn.map_error(exc, "Control.ListWorkers") from exc
    return list(response.record)


def _gateway_ip(workers: list[Any]) -> str | None:
    """Return the host's address as seen from build containers (moby workers only)."""
    return next(
        (w.Labels[HOST_GATEWAY_LABEL] for w in workers if HOST_GATEWAY_LABEL in w.Labels), None
    )


def is_moby(workers: list[Any]) -> bool:
    """Tell whether the workers are a Docker Engine's embedded BuildKit (the moby worker)."""
    return any(key.startswith(MOBY_LABEL_PREFIX) for w in workers for key in w.Labels)

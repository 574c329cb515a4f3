"""The server of one instance: gRPC behind the uid-checking front socket, and its lifetime.

`Server.start()` serves `Debugger` on the instance's private `.rpc` socket, puts the
`FrontListener` on `sock` and the `AttachListener` on `io`, and writes the pid and meta
files. A lifecycle thread waits for a stop request: Shutdown, a Goodbye that ends the
session, a signal or the idle timeout.
It then stops the session (streams get their last message, containers are released, the
build is cancelled), then the attach socket and gRPC with a grace period, and last the
front socket and files.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from bkdbg import __version__
from bkdbg.daemon import api_pb2_grpc
from bkdbg.daemon.attachserver import AttachListener
from bkdbg.daemon.backend import Backend
from bkdbg.daemon.instances import (
    InstancePaths,
    check_socket_paths,
    remove_instance,
    remove_keeping_log,
    remove_runtime_files,
    write_meta,
    write_pid,
)
from bkdbg.daemon.peercred import FrontListener
from bkdbg.daemon.service import DebuggerService, ServerIdentity
from bkdbg.daemon.session import Session
from bkdbg.errors import ServerError

logger = logging.getLogger(__name__)

STOP_GRACE = 2.0  # seconds that open RPCs get to finish when the server stops
# every open stream (Build, Events, Attach) uses one worker thread for its whole life
RPC_WORKERS = 128
MESSAGE_LIMIT = 16 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    ("grpc.so_reuseport", 0),
]


class Server:
    """One bkdbg server instance, in this process."""

    def __init__(
        self,
        paths: InstancePaths,
        backend: Backend,
        idle_timeout: float | None = None,
        keep_log: bool = False,
        version: str = __version__,
        in_process: bool = False,
    ) -> None:
        self.paths = paths
        self.in_process = in_process
        self.idle_timeout = idle_timeout if idle_timeout and idle_timeout > 0 else None
        self.keep_log = keep_log
        self.identity = ServerIdentity(paths.instance_id, os.getpid(), time.time(), version)
        self.session = Session(backend, paths.instance_id, self.request_stop, self.note_context)
        self.stop_reason = ""
        self._stop_requested = threading.Event()
        self._stopped = threading.Event()
        self._grpc: grpc.Server | None = None
        self._front: FrontListener | None = None
        self._attach: AttachListener | None = None

    def start(self) -> None:
        """Serve on the instance's socket; raises ServerError when it cannot."""
        check_socket_paths(self.paths)
        self._grpc = self._start_grpc()
        self._front = FrontListener(self.paths.socket, self.paths.rpc_socket)
        self._front.start()
        self._attach = AttachListener(self.paths.attach_socket, self.session)
        self._attach.start()
        write_pid(self.paths, self.identity.pid)
        self.note_context("")
        threading.Thread(target=self._lifecycle, name="lifecycle", daemon=True).start()
        logger.info("server %s started (pid %d, version %s, idle timeout %s)",
                    self.paths.instance_id, self.identity.pid, self.identity.version,
                    f"{self.idle_timeout:g} s" if self.idle_timeout else "off")

    def _start_grpc(self) -> grpc.Server:
        server = grpc.server(
            ThreadPoolExecutor(max_workers=RPC_WORKERS, thread_name_prefix="rpc"),
            options=GRPC_OPTIONS,
        )
        service = DebuggerService(self.session, self.identity, self.request_stop)
        api_pb2_grpc.add_DebuggerServicer_to_server(service, server)
        rpc_path = self.paths.rpc_socket
        rpc_path.unlink(missing_ok=True)
        if server.add_insecure_port(f"unix:{rpc_path}") == 0:
            raise ServerError(
                f"cannot listen on the gRPC socket: {rpc_path}: see the server log "
                f"{self.paths.log_file}"
            )
        server.start()
        os.chmod(rpc_path, 0o600)
        return server

    def request_stop(self, reason: str) -> None:
        """Ask the server to stop; returns at once, and only the first reason is kept."""
        if not self._stop_requested.is_set():
            self.stop_reason = reason
            logger.info("stopping: %s", reason)
            self._stop_requested.set()

    def wait_stop_requested(self, timeout: float | None = None) -> bool:
        """Wait until a stop is requested; return False after `timeout` s without one."""
        return self._stop_requested.wait(timeout)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def _lifecycle(self) -> None:
        while not self._stop_requested.wait(self._next_idle_check()):
            idle = self.session.idle_seconds()
            if self.idle_timeout is not None and idle >= self.idle_timeout:
                self.request_stop(f"idle for {idle:.0f} s (--server-idle-timeout)")
        try:
            self._stop()
        except Exception:
            logger.exception("stopping the server failed")
        finally:
            self._stopped.set()

    def _next_idle_check(self) -> float | None:
        if self.idle_timeout is None:
            return None
        # wake when the current idle period would reach the timeout
        return max(0.1, self.idle_timeout - self.session.idle_seconds())

    def _stop(self) -> None:
        self.session.close()
        if self._attach is not None:
            self._attach.close(STOP_GRACE)
        if self._grpc is not None:
            self._grpc.stop(STOP_GRACE).wait()
        if self._front is not None:
            self._front.close()
        remove_runtime_files(self.paths)
        logger.info("server %s stopped", self.paths.instance_id)
        if self.keep_log:
            remove_keeping_log(self.paths)
        else:
            remove_instance(self.paths)

    def note_context(self, context: str) -> None:
        """Record the build context in meta.json, for `bkdbg list` without a probe."""
        write_meta(self.paths, context, self.identity.started, self.identity.version,
                   self.in_process)

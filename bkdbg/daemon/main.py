"""Entry points of the server: the hidden `bkdbg __server` command and the in-process mode.

`bkdbg build` starts `python -m bkdbg __server --root ROOT --id ID --ready-fd N` in a new
session with cwd `/`, stdin closed and output to the instance log (see `launcher.py`).
The server writes one line to fd N once it accepts connections, so the client does not
poll for the socket. A server forked from its client, or a claimed spare, gets the
client's build as well and starts it before it serves. `--detach=false` runs the same
`Server` in the client's process.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import select
import signal
import subprocess
import threading
from types import FrameType
from typing import TYPE_CHECKING, TextIO

from bkdbg.daemon.backend import Backend, BuildHandle, FirstBuild, ProgressSink
from bkdbg.daemon.instances import (
    InstancePaths,
    create_instance,
    ensure_root,
    is_instance_id,
    remove_instance,
    resolve_root,
)
from bkdbg.daemon.server import Server
from bkdbg.daemon.spare import spare_wait, start_spare
from bkdbg.errors import BkdbgError, ServerError
from bkdbg.heap import tune_malloc

if TYPE_CHECKING:
    from bkdbg.daemon.client import DaemonClient
    from bkdbg.options import BuildOptions

logger = logging.getLogger(__name__)

READY_LINE = b"ready\n"
FIRST_BUILD_HEAD_START = 0.1  # max seconds that serving waits for the first build to connect
SPARE_DELAY = 2.0  # seconds after the first build before a server starts a spare
SPARE_JOIN_TIMEOUT = 5.0  # seconds a stopping server waits for the spare it starts
LOG_FORMAT = "%(asctime)s {id} pid=%(process)d [%(threadName)s] %(levelname)s %(name)s: %(message)s"


def default_backend() -> Backend:
    """Return the backend that talks to BuildKit through `bkdbg.gateway`."""
    return _DeferredGatewayBackend()


class _DeferredGatewayBackend:
    """`GatewayBackend`, imported only when a build starts.

    A launching client waits for the ready line, and importing `bkdbg.gateway` with
    BuildKit's stubs takes about 25 ms on the 2-CPU machine of docs/benchmarks.md. So
    `serve_main` imports them in a thread after writing that line, while the client
    connects and sends Hello and Build.
    """

    def start_build(self, options: BuildOptions, on_progress: ProgressSink) -> BuildHandle:
        from bkdbg.daemon.gateway_backend import GatewayBackend

        return GatewayBackend().start_build(options, on_progress)


def _import_gateway() -> None:
    import bkdbg.daemon.gateway_backend  # noqa: F401


def serve_main(argv: list[str] | None = None, backend: Backend | None = None,
               first_build: FirstBuild | None = None, spares: bool = False) -> int:
    """Run a server until a stop request; returns the process exit status.

    `first_build` starts at once. With `spares`, the server starts a spare server after
    its first build (see `_start_spare_after`).
    """
    args = _parser().parse_args(argv)
    if not is_instance_id(args.id):
        _parser().error(f"invalid --id value: {args.id!r}: expected 8 lowercase hex digits")
    paths = _instance_paths(args.root, args.id)
    log_file = configure_logging(paths, args.debug)
    os.chdir("/")
    if first_build is not None and backend is None:
        # the build waits for these imports, the client's Hello does not
        from bkdbg.daemon.gateway_backend import GatewayBackend

        backend = GatewayBackend()
    server = Server(paths, backend or default_backend(), args.idle_timeout, keep_log=args.debug)
    _install_signal_handlers(server)
    first_run = None
    if first_build is not None:
        first_run = server.session.start_first_build(first_build.options_json,
                                                     first_build.terminal)
        # the client needs the server only after its own imports, so the build's
        # connection to BuildKit goes first rather than share the GIL with server.start
        first_run.connected.wait(FIRST_BUILD_HEAD_START)
    try:
        server.start()
    except (BkdbgError, OSError):
        logger.exception("server %s could not start", args.id)
        server.session.close()
        return 1
    _notify_ready(args.ready_fd)
    tune_malloc()
    wait = spare_wait() if spares else None
    spare_thread = None
    if wait is not None:
        spare_thread = threading.Thread(target=_start_spare_after, args=(server, wait),
                                        name="start-spare", daemon=True)
        spare_thread.start()
    if isinstance(server.session.backend, _DeferredGatewayBackend):
        threading.Thread(target=_import_gateway, name="import-gateway", daemon=True).start()
    _wait_stopped(server)
    if spare_thread is not None:
        spare_thread.join(SPARE_JOIN_TIMEOUT)
    logger.info("exiting: %s", server.stop_reason)
    log_file.flush()
    return 0


def _start_spare_after(server: Server, wait: float) -> None:
    """Start a spare server for the next `bkdbg build` after this server's first build.

    SPARE_DELAY after the build, so that its imports do not take CPU from the first
    output, or sooner when the server stops. Not when `bkdbg kill` or a signal stops a
    server that had a client: a server whose client never came was abandoned by it (bad
    input, say), and the next build still wants a spare.
    """
    session = server.session
    session.build_ended.wait()
    stopping = server.wait_stop_requested(SPARE_DELAY)
    abandoned = not session.clients.had_client
    if stopping and not session.ended_by_client and not abandoned:
        return
    try:
        start_spare(server.paths.root, wait)
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("cannot start a spare server: %s", exc)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bkdbg __server",
        description="Run a detached bkdbg server (started by bkdbg build; not for direct use).",
    )
    parser.add_argument("--root", required=True, help="bkdbg root directory")
    parser.add_argument("--id", required=True, help="instance id: 8 lowercase hex digits")
    parser.add_argument("--debug", action="store_true",
                        help="log at DEBUG level and keep the log after a clean exit")
    parser.add_argument("--idle-timeout", type=float, default=None, metavar="SECONDS",
                        help="stop after this many seconds with no client and no running "
                             "process (default: never)")
    parser.add_argument("--ready-fd", type=int, default=None, metavar="FD",
                        help="write one line to this file descriptor once serving")
    return parser


def _instance_paths(root: str, instance_id: str) -> InstancePaths:
    root_path = ensure_root(resolve_root(root))
    paths = InstancePaths(root_path, instance_id)
    if not paths.directory.is_dir():
        # started by hand rather than by a client, which creates the directory first
        create_instance(root_path, instance_id)
    return paths


def configure_logging(paths: InstancePaths, debug: bool) -> TextIO:
    """Send every log record, warnings, thread crashes and fatal signals to the log file."""
    handler = logging.FileHandler(paths.log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT.format(id=paths.instance_id)))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_crash
    stream = handler.stream
    assert stream is not None  # FileHandler opens its file at once unless delay=True
    faulthandler.enable(file=stream)
    return stream


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    name = args.thread.name if args.thread is not None else "unknown"
    exc_info = (args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)
    logger.error("thread %s crashed", name, exc_info=exc_info)


def _install_signal_handlers(server: Server) -> None:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        server.request_stop(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # the server has no controlling terminal; a stray SIGHUP must not end it
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _wait_stopped(server: Server) -> None:
    """Block the main thread until the server stopped, handling signals meanwhile.

    The kernel may deliver SIGTERM to any thread (gRPC has many); Python then runs the
    handler only once the main thread wakes. A plain Event.wait() might never wake, so the
    main thread waits in select() on the signal wakeup fd, which the C-level handler
    writes to from whatever thread took the signal, and on the stop notification.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def notify_stopped() -> None:
        server.wait_stopped()
        os.write(write_fd, b"\0")

    threading.Thread(target=notify_stopped, name="stop-notifier", daemon=True).start()
    try:
        while not server.stopped:
            select.select([read_fd], [], [])
            _drain(read_fd)
    finally:
        signal.set_wakeup_fd(previous)
        os.close(read_fd)
        os.close(write_fd)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _notify_ready(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.write(fd, READY_LINE)
        os.close(fd)
    except OSError as exc:
        # the client gave up waiting; the server still runs and `bkdbg list` shows it
        logger.warning("cannot tell the launching client that the server is ready: %s", exc)


def run_in_process(root: str | os.PathLike[str] | None = None,
                   backend: Backend | None = None,
                   idle_timeout: float | None = None) -> DaemonClient:
    """Start a server in this process and return a client connected to it (--detach=false).

    The server stops when the client says Goodbye with end_session, calls shutdown(), or
    is closed; it never outlives this process.
    """
    from bkdbg.daemon.client import DaemonClient

    root_path = ensure_root(resolve_root(root))
    paths = create_instance(root_path)
    server = Server(paths, backend or default_backend(), idle_timeout, in_process=True)
    try:
        server.start()
    except BkdbgError:
        remove_instance(paths)
        raise
    except OSError as exc:
        remove_instance(paths)
        raise ServerError(
            f"cannot start the bkdbg server: {paths.directory}: {exc.strerror or exc}"
        ) from exc
    client = DaemonClient.connect(root_path, paths.instance_id)
    client.own_server(server)
    return client

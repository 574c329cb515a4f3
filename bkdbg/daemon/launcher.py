"""Start a detached server process and wait until it reports that it serves.

The server runs `python -m bkdbg __server` in a new session (no controlling terminal),
with cwd `/`, stdin from /dev/null and stdout/stderr appended to its log. It writes one
line to a pipe once its socket accepts connections; EOF on that pipe without the line
means it died, and the error then names the log.

A client that starts its server first thing (`start_early`) claims the spare server
under its root if there is one (see spare.py), and otherwise forks: the child runs the
same `serve_main` without a new interpreter, and has the modules the client had imported
already. That makes the server ready about 40 ms sooner. Its command line is then the
client's, so it names itself `bkdbg-ID` in /proc/PID/comm, which `pid_alive` accepts as
well. Both derive the build from the client's arguments and start it at once, before the
client connects.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from bkdbg.daemon.early import EarlyClaim, scan_detached_build
from bkdbg.daemon.instances import (
    InstancePaths,
    create_instance,
    open_private,
    remove_instance,
    remove_keeping_log,
    resolve_root,
)
from bkdbg.errors import BkdbgError, ServerError

if TYPE_CHECKING:
    from bkdbg.daemon.backend import FirstBuild

logger = logging.getLogger(__name__)

LAUNCH_TIMEOUT = 10.0  # seconds until a new server must be serving
MAX_FD = 65536  # a forked server closes the client's descriptors below this one
THREAD_JOIN_TIMEOUT = 5.0  # seconds a forked server waits for its threads after serving
UNKNOWN_STATUS = 255  # the exit status of a forked server whose status was lost
LOG_TAIL_LINES = 3
SERVER_COMMAND = "__server"

# returns the FirstBuild that bkdbg's arguments request, given whether stdin and stdout
# are a terminal, or None
BuildDeriver = Callable[[list[str], bool], "FirstBuild | None"]


class Command(NamedTuple):
    """The launching client's arguments, and the function that derives its build from them."""

    argv: list[str]
    derive: BuildDeriver


def server_command(paths: InstancePaths, debug: bool, idle_timeout: float | None,
                   ready_fd: int) -> list[str]:
    """Return the command line of a server process for `paths`."""
    return [sys.executable, "-m", "bkdbg", SERVER_COMMAND,
            *server_args(paths, debug, idle_timeout, ready_fd)]


def server_args(paths: InstancePaths, debug: bool, idle_timeout: float | None,
                ready_fd: int) -> list[str]:
    """Return the arguments of `bkdbg __server` (and of `serve_main`) for `paths`."""
    args = ["--root", str(paths.root), "--id", paths.instance_id, "--ready-fd", str(ready_fd)]
    if debug:
        args.append("--debug")
    if idle_timeout:
        args += ["--idle-timeout", f"{idle_timeout:g}"]
    return args


def spawn_server(paths: InstancePaths, debug: bool = False, idle_timeout: float | None = None,
                 timeout: float = LAUNCH_TIMEOUT) -> ServerProcess:
    """Start the server of `paths` and wait until it serves.

    Raises ServerError if it does not; the instance directory is then gone, and the
    message names the log, kept as ROOT/ID.log.
    """
    return start_server(paths, debug, idle_timeout).wait_ready(timeout)


class StartingServer:
    """A server process that `start_server` started and that may not serve yet.

    A client can start the server first and import or validate what it needs meanwhile,
    then call `wait_ready` before its first request. A caller that does not need the
    server after all calls `abandon`, which stops it and removes the instance directory
    unless `adopted` is set.
    """

    def __init__(self, paths: InstancePaths, process: ServerProcess, ready_fd: int,
                 debug: bool = False, idle_timeout: float | None = None) -> None:
        self.paths = paths
        self.process = process
        self.debug = debug
        self.idle_timeout = idle_timeout
        self.adopted = False  # set by the caller once it is connected to the server
        self._ready_fd: int | None = ready_fd
        self._abandoned = False

    def wait_ready(self, timeout: float = LAUNCH_TIMEOUT) -> ServerProcess:
        """Wait until the server serves; raise ServerError as `spawn_server` does."""
        if self._ready_fd is None:
            raise ServerError(f"wait_ready already ran for bkdbg server {self.paths.instance_id}")
        try:
            _wait_ready(self._ready_fd, self.process, self.paths, timeout)
        except ServerError as exc:
            kept = remove_keeping_log(self.paths)
            raise ServerError(str(exc).replace(str(self.paths.log_file), str(kept))) from None
        finally:
            self._close_ready_fd()
        return self.process

    def abandon(self) -> None:
        """Stop the server and remove its instance directory, unless it was adopted."""
        if self.adopted or self._abandoned:
            return
        self._abandoned = True
        self._close_ready_fd()
        _stop_unready(self.process)
        remove_instance(self.paths)
        logger.info("stopped unused server %s (pid %d)", self.paths.instance_id,
                    self.process.pid)

    def _close_ready_fd(self) -> None:
        if self._ready_fd is not None:
            os.close(self._ready_fd)
            self._ready_fd = None


def start_early(argv: list[str], derive: BuildDeriver | None = None,
                claimed: EarlyClaim | None = None) -> StartingServer | None:
    """Start the server of a detached `bkdbg build` before the client parses `argv`.

    That server is the spare `claimed` already, when there is one. Otherwise it is a
    fork, to which `derive` gives the build that `argv` requests, so that the server
    starts it at once. Returns None when `argv` is not such a build or the start fails,
    so that the client's ordinary launch runs and reports any error.
    """
    if claimed is not None and (starting := _adopt_claim(claimed)) is not None:
        return starting
    flags = scan_detached_build(argv)
    if flags is None:
        return None
    try:
        paths = create_instance(resolve_root(flags.root))
    except (BkdbgError, OSError) as exc:
        logger.info("starting a server early failed: %s", exc)
        return None
    command = Command(argv, derive) if derive is not None else None
    try:
        return start_server(paths, flags.debug, flags.idle_timeout, fork=fork_is_safe(),
                            command=command)
    except ServerError as exc:
        logger.info("starting a server early failed: %s", exc)
        remove_instance(paths)
        return None


def _adopt_claim(claimed: EarlyClaim) -> StartingServer | None:
    paths = InstancePaths(claimed.root, claimed.claimed.instance_id)
    try:
        process = ClaimedSpare(claimed.claimed.pid)
    except OSError as exc:
        logger.info("the claimed spare server %d is gone: %s", claimed.claimed.pid, exc)
        claimed.claimed.sock.close()
        remove_instance(paths)
        return None
    logger.info("claimed the spare server %d for %s", process.pid, paths.instance_id)
    flags = claimed.flags
    return StartingServer(paths, process, claimed.claimed.sock.detach(), flags.debug,
                          flags.idle_timeout)


def start_server(paths: InstancePaths, debug: bool = False,
                 idle_timeout: float | None = None, *, fork: bool = False,
                 command: Command | None = None) -> StartingServer:
    """Start the server process of `paths` without waiting for it to serve.

    With `fork`, the server is a fork of this process, which must have no other thread
    and must not have imported grpc (see `fork_is_safe`). The fork runs the module of
    `server_command`'s `python -m MODULE ARGS` as `python -m` would; given the client's
    `command`, bkdbg's own server starts the build that it requests at once.
    """
    read_fd, write_fd = os.pipe()
    argv = server_command(paths, debug, idle_timeout, write_fd)
    process: ServerProcess
    try:
        with open_private(paths.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND) as log:
            if fork and argv[1:2] == ["-m"]:
                process = _fork_server(argv, log.fileno(), write_fd, paths.instance_id, command)
            else:
                process = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                    start_new_session=True, pass_fds=(write_fd,),
                )
                _reap_in_background(process)
    except OSError as exc:
        os.close(read_fd)
        raise ServerError(
            f"cannot start the bkdbg server: {argv[0]}: {exc.strerror or exc}"
        ) from exc
    finally:
        os.close(write_fd)
    logger.info("started server %s as pid %d", paths.instance_id, process.pid)
    return StartingServer(paths, process, read_fd, debug, idle_timeout)


def fork_is_safe() -> bool:
    """Return whether this process may fork a server: one thread, and grpc not imported.

    A fork copies only the calling thread: locks that other threads hold stay locked in
    the child, and grpc's own threads, once it has started them, are missing there.
    """
    return hasattr(os, "fork") and threading.active_count() == 1 and "grpc" not in sys.modules


class _SignalledServer:
    """The part of Popen's interface used here, for a server process that is no Popen."""

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        raise NotImplementedError


class ForkedServer(_SignalledServer):
    """A server forked by `start_server`.

    A thread waits for its exit, so that it never stays a zombie while this client runs.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited = threading.Event()
        threading.Thread(target=self._reap, name=f"reap-{pid}", daemon=True).start()

    def _reap(self) -> None:
        try:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            # reaped elsewhere (SIGCHLD ignored, say): the status is lost
            self.returncode = UNKNOWN_STATUS
        self._exited.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit and return the status; raise TimeoutExpired after `timeout` s."""
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(["bkdbg", "__server"], timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def _signal(self, signum: int) -> None:
        # the pid stays ours until the reaper has waited for it
        if not self._exited.is_set():
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass  # reaped just now


class ClaimedSpare(_SignalledServer):
    """A spare server that became this client's server: not a child, so watched by pidfd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._pidfd], [], [], 0)[0]:
            self.returncode = UNKNOWN_STATUS  # only a parent learns the status
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit; raise TimeoutExpired after `timeout` s."""
        if self.returncode is None and not select.select([self._pidfd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(["bkdbg", "__spare"], timeout or 0)
        self.returncode = UNKNOWN_STATUS
        return self.returncode

    def _signal(self, signum: int) -> None:
        try:
            signal.pidfd_send_signal(self._pidfd, signum)
        except ProcessLookupError:
            pass  # exited already


ServerProcess = subprocess.Popen[bytes] | ForkedServer | ClaimedSpare


def _fork_server(argv: list[str], log_fd: int, write_fd: int, instance_id: str,
                 command: Command | None) -> ForkedServer:
    """Fork a server that runs `argv` (`python -m MODULE ARGS`) in this interpreter."""
    pid = os.fork()
    if pid:
        return ForkedServer(pid)
    status = 1
    try:
        interactive = os.isatty(0) and os.isatty(1)  # as the client sees it, before dup2
        os.setsid()
        null_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null_fd, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.closerange(3, write_fd)
        os.closerange(write_fd + 1, MAX_FD)
        name_process(f"bkdbg-{instance_id}")
        if argv[2:4] == ["bkdbg", SERVER_COMMAND]:
            status = _serve(argv[4:], command, interactive)
        else:
            status = _run_module(argv[2], argv[3:])  # a test's server_command
        _join_other_threads()
    except BaseException:
        traceback.print_exc()
    finally:
        # never return into the client's code that called fork
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _serve(args: list[str], command: Command | None, interactive: bool) -> int:
    from bkdbg.daemon.main import serve_main

    build = command.derive(command.argv, interactive) if command is not None else None
    try:
        return serve_main(args, first_build=build, spares=command is not None)
    except SystemExit as exc:
        return _exit_status(exc)


def _run_module(module: str, args: list[str]) -> int:
    import runpy

    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return _exit_status(exc)
    return 0


def _exit_status(exc: SystemExit) -> int:
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


def name_process(name: str) -> None:
    """Set this process's name in /proc/PID/comm (at most 15 bytes are kept)."""
    try:
        with open("/proc/self/comm", "w", encoding="ascii") as comm:
            comm.write(name)
    except OSError as exc:
        logger.debug("cannot name the server process %s: %s", name, exc)


def _join_other_threads() -> None:
    """Wait a while for non-daemon threads, as the interpreter's exit would (os._exit does not)."""
    deadline = time.monotonic() + THREAD_JOIN_TIMEOUT
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))


def _reap_in_background(process: subprocess.Popen[bytes]) -> None:
    # the server outlives this client, but while the client runs it must not stay a
    # zombie after exiting, or `kill` and `list` would see its pid as alive
    threading.Thread(target=process.wait, name=f"reap-{process.pid}", daemon=True).start()


def _wait_ready(read_fd: int, process: ServerProcess, paths: InstancePaths,
                timeout: float) -> None:
    deadline = time.monotonic() + timeout
    received = b""
    while b"\n" not in received:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([read_fd], [], [], remaining)[0]:
            _stop_unready(process)
            raise ServerError(
                f"bkdbg server {paths.instance_id} did not start within {timeout:g} s: "
                f"see its log {paths.log_file}{_log_tail(paths)}"
            )
        chunk = os.read(read_fd, 64)
        if not chunk:
            raise _died_error(process, paths)
        received += chunk


def _died_error(process: ServerProcess, paths: InstancePaths) -> ServerError:
    try:
        status = process.wait(timeout=2)
        how = "exited" if status == UNKNOWN_STATUS else f"exited with status {status}"
    except subprocess.TimeoutExpired:
        how = "closed its ready pipe"
    return ServerError(
        f"bkdbg server {paths.instance_id} {how} before serving: "
        f"see its log {paths.log_file}{_log_tail(paths)}"
    )


def _stop_unready(process: ServerProcess) -> None:
    process.terminate()
    try:
        process.wait(timeout=2)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _log_tail(paths: InstancePaths) -> str:
    """Return the last lines of the log as a suffix for a one-line error, or ''."""
    try:
        lines = paths.log_file.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    tail = " | ".join(line.strip() for line in lines[-LOG_TAIL_LINES:] if line.strip())
    return f" (last lines: {tail})" if tail else ""

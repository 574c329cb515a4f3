"""Start a detached server process and wait until it reports that it serves.

The server runs `python -m bkdbg __server` in a new session (no controlling terminal),
with cwd `/`, stdin from /dev/null and stdout/stderr appended to its log. It writes one
line to a pipe once its socket accepts connections; EOF on that pipe without the line
means it died, and the error then names the log.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import threading
import time

from bkdbg.daemon.instances import InstancePaths, open_private, remove_keeping_log
from bkdbg.errors import ServerError

logger = logging.getLogger(__name__)

LAUNCH_TIMEOUT = 10.0  # seconds until a new server must be serving
LOG_TAIL_LINES = 3


def server_command(paths: InstancePaths, debug: bool, idle_timeout: float | None,
                   ready_fd: int) -> list[str]:
    """Return the command line of a server process for `paths`."""
    argv = [sys.executable, "-m", "bkdbg", "__server", "--root", str(paths.root),
            "--id", paths.instance_id, "--ready-fd", str(ready_fd)]
    if debug:
        argv.append("--debug")
    if idle_timeout:
        argv += ["--idle-timeout", f"{idle_timeout:g}"]
    return argv


def spawn_server(paths: InstancePaths, debug: bool = False, idle_timeout: float | None = None,
                 timeout: float = LAUNCH_TIMEOUT) -> subprocess.Popen[bytes]:
    """Start the server of `paths` and wait until it serves.

    Raises ServerError if it does not; the instance directory is then gone, and the
    message names the log, kept as ROOT/ID.log.
    """
    return start_server(paths, debug, idle_timeout).wait_ready(timeout)


class StartingServer:
    """A server process that `start_server` started and that may not serve yet.

    A client can start the server first and import or validate what it needs meanwhile,
    then call `wait_ready` before its first request. A caller that does not need the
    server after all must still stop `process` and remove the instance directory.
    """

    def __init__(self, paths: InstancePaths, process: subprocess.Popen[bytes],
                 ready_fd: int) -> None:
        self.paths = paths
        self.process = process
        self._ready_fd = ready_fd

    def wait_ready(self, timeout: float = LAUNCH_TIMEOUT) -> subprocess.Popen[bytes]:
        """Wait until the server serves; raise ServerError as `spawn_server` does."""
        try:
            _wait_ready(self._ready_fd, self.process, self.paths, timeout)
        except ServerError as exc:
            kept = remove_keeping_log(self.paths)
            raise ServerError(str(exc).replace(str(self.paths.log_file), str(kept))) from None
        finally:
            os.close(self._ready_fd)
        return self.process


def start_server(paths: InstancePaths, debug: bool = False,
                 idle_timeout: float | None = None) -> StartingServer:
    """Start the server process of `paths` without waiting for it to serve."""
    read_fd, write_fd = os.pipe()
    argv = server_command(paths, debug, idle_timeout, write_fd)
    try:
        with open_private(paths.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND) as log:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                start_new_session=True, pass_fds=(write_fd,),
            )
    except OSError as exc:
        os.close(read_fd)
        raise ServerError(
            f"cannot start the bkdbg server: {argv[0]}: {exc.strerror or exc}"
        ) from exc
    finally:
        os.close(write_fd)
    _reap_in_background(process)
    logger.info("started server %s as pid %d", paths.instance_id, process.pid)
    return StartingServer(paths, process, read_fd)


def _reap_in_background(process: subprocess.Popen[bytes]) -> None:
    # the server outlives this client, but while the client runs it must not stay a
    # zombie after exiting, or `kill` and `list` would see its pid as alive
    threading.Thread(target=process.wait, name=f"reap-{process.pid}", daemon=True).start()


def _wait_ready(read_fd: int, process: subprocess.Popen[bytes], paths: InstancePaths,
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


def _died_error(process: subprocess.Popen[bytes], paths: InstancePaths) -> ServerError:
    try:
        status = process.wait(timeout=2)
        how = f"exited with status {status}"
    except subprocess.TimeoutExpired:
        how = "closed its ready pipe"
    return ServerError(
        f"bkdbg server {paths.instance_id} {how} before serving: "
        f"see its log {paths.log_file}{_log_tail(paths)}"
    )


def _stop_unready(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=2)
    except subprocess.TimeoutExpired:
        process.kill()


def _log_tail(paths: InstancePaths) -> str:
    """Return the last lines of the log as a suffix for a one-line error, or ''."""
    try:
        lines = paths.log_file.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    tail = " | ".join(line.strip() for line in lines[-LOG_TAIL_LINES:] if line.strip())
    return f" (last lines: {tail})" if tail else ""

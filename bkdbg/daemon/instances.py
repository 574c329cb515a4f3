"""Where servers live: the root directory and one directory per server instance.

Layout, all owned by the user who runs bkdbg::

    ROOT/                 --root, else $BKDBG_ROOT, else platformdirs' runtime or data dir
      ID/                 0700, one per server; ID is 8 lowercase hex digits
        sock              0600, the socket clients connect to
        .rpc              0600, the gRPC server's own socket, reached only through `sock`
        io                0600, attach I/O as length-prefixed frames (lower latency than gRPC)
        pid               the server's process id
        log               0600, the server's log (its stdout and stderr too)
        meta.json         context, started (Unix seconds), version, in_process
      ID.log              the log of a server that failed to start or ran with --debug
      spare.sock          0600, the spare server's socket (see spare.py)
      spare.log           0600, the spare server's log until a client claims it
      .removing-ID-*      an instance directory being removed

Modes are set explicitly after creation, so a permissive umask never loosens them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# re-exported: callers resolve the root through this module
from bkdbg.daemon.rootdir import APP_NAME as APP_NAME
from bkdbg.daemon.rootdir import ROOT_ENV as ROOT_ENV
from bkdbg.daemon.rootdir import default_root as default_root
from bkdbg.daemon.rootdir import resolve_root as resolve_root
from bkdbg.errors import UsageError

# shutil and tempfile are imported where they are used: `bkdbg build` imports this module
# before it starts its server.

logger = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
# sun_path in struct sockaddr_un is 108 bytes on Linux, one of them the terminating NUL
MAX_SOCKET_PATH = 107
_ID_PATTERN = re.compile(r"^[0-9a-f]{8}$")


@dataclass(frozen=True)
class InstancePaths:
    """The files of one server instance."""

    root: Path
    instance_id: str

    @property
    def directory(self) -> Path:
        return self.root / self.instance_id

    @property
    def socket(self) -> Path:
        return self.directory / "sock"

    @property
    def rpc_socket(self) -> Path:
        return self.directory / ".rpc"

    @property
    def attach_socket(self) -> Path:
        """The attach socket; shorter than `socket`, so it always fits AF_UNIX's limit."""
        return self.directory / "io"

    @property
    def pid_file(self) -> Path:
        return self.directory / "pid"

    @property
    def log_file(self) -> Path:
        return self.directory / "log"

    @property
    def meta_file(self) -> Path:
        return self.directory / "meta.json"


@dataclass(frozen=True)
class InstanceRecord:
    """An instance directory's pid and meta files, read without asking its server."""

    paths: InstancePaths
    pid: int | None
    meta: dict[str, Any]
    created: float

    @property
    def instance_id(self) -> str:
        return self.paths.instance_id


def new_instance_id() -> str:
    """Return a fresh instance id: 8 lowercase hex digits."""
    return _random_hex(4)


def _random_hex(size: int) -> str:
    # the same as secrets.token_hex, which would import hmac and hashlib
    return os.urandom(size).hex()


def is_instance_id(text: str) -> bool:
    return bool(_ID_PATTERN.match(text))


def ensure_root(root: Path) -> Path:
    """Create `root` (0700) if missing and check that it is a writable directory."""
    try:
        root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise _root_error(root, exc.strerror or str(exc)) from exc
    if not root.is_dir():
        raise _root_error(root, "not a directory")
    if not os.access(root, os.W_OK | os.X_OK):
        raise _root_error(root, "permission denied")
    return root


def _root_error(root: Path, reason: str) -> UsageError:
    return UsageError(
        f"bkdbg root directory is not writable ({reason}): {root}: "
        "choose another with --root or BKDBG_ROOT"
    )


def check_socket_paths(paths: InstancePaths) -> None:
    """Raise UsageError when a socket path of the instance does not fit in AF_UNIX's limit."""
    for path in (paths.socket, paths.rpc_socket):
        size = len(os.fsencode(path))
        if size > MAX_SOCKET_PATH:
            raise UsageError(
                f"socket path too long for a unix socket ({size} > {MAX_SOCKET_PATH} bytes): "
                f"{path}: choose a shorter --root, e.g. --root /tmp/bkdbg-{os.getuid()}"
            )


def create_instance(root: Path, instance_id: str | None = None) -> InstancePaths:
    """Create the directory and empty log of a new instance and return its paths."""
    ensure_root(root)
    paths = InstancePaths(root, instance_id or new_instance_id())
    check_socket_paths(paths)
    os.mkdir(paths.directory, DIR_MODE)
    os.chmod(paths.directory, DIR_MODE)
    open_private(paths.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND).close()
    return paths


def open_private(path: Path, flags: int) -> Any:
    """Open `path` with mode 0600 whatever the umask, and return a binary file object."""
    fd = os.open(path, flags | os.O_CLOEXEC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    mode = "ab" if flags & os.O_APPEND else "wb"
    return os.fdopen(fd, mode, buffering=0)


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` atomically with `data`, mode 0600."""
    import tempfile

    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(temp, path)


def write_pid(paths: InstancePaths, pid: int) -> None:
    write_private(paths.pid_file, f"{pid}\n".encode())


def write_meta(paths: InstancePaths, context: str, started: float, version: str,
               in_process: bool = False) -> None:
    """Write meta.json; `in_process` marks a server inside a bkdbg client (--detach=false)."""
    meta = {"context": context, "started": started, "version": version, "in_process": in_process}
    write_private(paths.meta_file, json.dumps(meta).encode())


def read_record(paths: InstancePaths) -> InstanceRecord:
    """Read an instance directory's pid and meta files; missing or bad files read as empty."""
    return InstanceRecord(
        paths=paths,
        pid=_read_pid(paths.pid_file),
        meta=_read_meta(paths.meta_file),
        created=_mtime(paths.directory),
    )


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def list_instances(root: Path) -> list[InstanceRecord]:
    """Return the instance directories under `root`, oldest first, without probing them."""
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:
        return []
    _finish_removals(entries)
    records = [
        read_record(InstancePaths(root, entry.name))
        for entry in entries
        if is_instance_id(entry.name) and entry.is_dir() and not entry.is_symlink()
    ]
    return sorted(records, key=lambda record: (record.meta.get("started", record.created)))


def find_instance(root: Path, instance_id: str) -> InstancePaths | None:
    """Return the paths of instance `instance_id` under `root`, or None if it has no directory."""
    if not is_instance_id(instance_id):
        return None
    paths = InstancePaths(root, instance_id)
    return paths if paths.directory.is_dir() else None


def pid_alive(pid: int | None, instance_id: str | None = None) -> bool:
    """Return whether `pid` is a live process (a zombie counts as dead).

    With `instance_id`, a process that /proc shows as not naming that id counts as dead
    too, since the pid may have been reused. A server names it in its command line, or,
    when forked from its client, in its process name `bkdbg-ID`.
    """
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if _proc_state(pid) in ("Z", "X"):
        return False
    return instance_id is None or _names_instance(pid, instance_id)


def server_alive(record: InstanceRecord) -> bool:
    """Return whether the server process of an instance directory still runs."""
    # an in-process server runs inside a bkdbg client, whose command line lacks the id
    return pid_alive(record.pid, server_pid_marker(record))


def server_pid_marker(record: InstanceRecord) -> str | None:
    """Return what the server's command line must contain, for `pid_alive`."""
    return None if record.meta.get("in_process") else record.instance_id


def wait_pid_gone(pid: int | None, instance_id: str | None, timeout: float) -> bool:
    """Wait until `pid` is gone (see `pid_alive`); returns False after `timeout` s."""
    if not pid_alive(pid, instance_id):
        return True
    assert pid is not None
    deadline = time.monotonic() + timeout
    pidfd = _pidfd(pid)
    try:
        while pid_alive(pid, instance_id):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if pidfd is not None:
                # readable once the process exits (Linux 5.3+); zombies also count as gone
                select.select([pidfd], [], [], remaining)
            else:
                time.sleep(min(0.05, remaining))
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    except OSError:
        return None


def _names_instance(pid: int, instance_id: str) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        name = Path(f"/proc/{pid}/comm").read_bytes().strip()
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return True
    return instance_id.encode() in args or name == f"bkdbg-{instance_id}".encode()


def _proc_state(pid: int) -> str:
    # /proc/PID/stat is "pid (comm) state ..."; comm may contain spaces and parentheses
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return text.rpartition(")")[2].split()[0] if ")" in text else ""


REMOVING_PREFIX = ".removing-"


def remove_instance(paths: InstancePaths) -> None:
    """Remove an instance directory and everything in it; a missing directory is fine.

    The directory is first renamed out of the instance namespace. So a remover that dies
    halfway (a client exiting while its background refresh prunes) never leaves a
    half-empty instance for `list` to misread, and `list_instances` finishes the leftovers.
    """
    import shutil

    doomed = paths.root / f"{REMOVING_PREFIX}{paths.instance_id}-{_random_hex(4)}"
    try:
        os.rename(paths.directory, doomed)
    except FileNotFoundError:
        return
    except OSError as exc:
        logger.warning("cannot rename %s before removing it: %s", paths.directory, exc)
        doomed = paths.directory
    shutil.rmtree(doomed, ignore_errors=True)
    logger.info("removed instance directory %s", paths.directory)


def _finish_removals(entries: list[Path]) -> None:
    import shutil

    for entry in entries:
        if entry.name.startswith(REMOVING_PREFIX) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def remove_keeping_log(paths: InstancePaths) -> Path:
    """Move the instance's log to ROOT/ID.log, remove its directory, and return the log path.

    `list_instances` ignores such files, so the log of a server that failed to start, or
    ran with --debug, stays until the user deletes it.
    """
    kept = paths.root / f"{paths.instance_id}.log"
    try:
        os.replace(paths.log_file, kept)
    except OSError as exc:
        logger.warning("cannot keep the log %s: %s", paths.log_file, exc)
        kept = paths.log_file
    remove_instance(paths)
    return kept


def remove_runtime_files(paths: InstancePaths) -> None:
    """Remove the sockets, pid and meta files of a stopping server, keeping its log."""
    for path in (paths.socket, paths.rpc_socket, paths.pid_file, paths.meta_file):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cannot remove %s: %s", path, exc)

"""The steps of `bkdbg build` that run before it imports anything beyond the standard library.

`scan_detached_build` guesses from the arguments whether they run a detached build, and
`claim_early` then claims the spare server under the root (see spare.py). The spare's
work on the build starts about 30 ms sooner than after the client's own imports, and
typing, logging and dataclasses would cost about 10 ms more here (2-CPU VM of
docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bkdbg import __version__
from bkdbg.daemon.rootdir import resolve_root

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

SPARE_ENV = "BKDBG_SPARE_SERVER"  # off, or how long a spare waits for a claim (e.g. 10m)
SPARE_OFF = ("off", "false", "no", "0")
SOCKET_NAME = "spare.sock"
CLAIM_TIMEOUT = 2.0  # seconds for either side to send its line of a claim
MAX_LINE = 1 << 20

# bkdbg's global flags that take a value, and `build` flags that decide how its server starts
_EARLY_VALUE_FLAGS = (
    "--addr", "--tlscacert", "--tlscert", "--tlskey", "--tlsservername", "--root",
    "--server-idle-timeout",
)


class EarlyFlags:
    """The flags of a detached build that decide how its server starts."""

    def __init__(self, root: str | None, debug: bool, idle_timeout: float | None) -> None:
        self.root = root
        self.debug = debug
        self.idle_timeout = idle_timeout


class Claimed:
    """A spare that accepted a claim: the connection that will carry `ready`, and the
    spare's pid and the instance it created."""

    def __init__(self, sock: socket.socket, pid: int, instance_id: str) -> None:
        self.sock = sock
        self.pid = pid
        self.instance_id = instance_id


class EarlyClaim:
    """A spare claimed for a detached build, with the root and flags it was claimed for."""

    def __init__(self, root: Path, flags: EarlyFlags, claimed: Claimed) -> None:
        self.root = root
        self.flags = flags
        self.claimed = claimed


def spares_off(environ: Mapping[str, str] | None = None) -> bool:
    """Return whether SPARE_ENV turns spare servers off."""
    value = (os.environ if environ is None else environ).get(SPARE_ENV, "")
    return value.strip().lower() in SPARE_OFF


def scan_detached_build(argv: list[str]) -> EarlyFlags | None:
    """Return --root, --debug and the idle timeout if `argv` looks like a detached build.

    A cheap guess made before argparse runs: when it is wrong, the client abandons the
    server started from it.
    """
    command, root, debug, idle = None, None, False, ""
    index = 0
    while index < len(argv):
        word = argv[index]
        index += 1
        name, has_value, value = word.partition("=")
        if word in ("-h", "--help", "--version") or (name == "--detach" and value == "false"):
            return None
        if word == "--detach" and argv[index:index + 1] == ["false"]:
            return None
        if name in _EARLY_VALUE_FLAGS and not has_value:
            value, index = (argv[index] if index < len(argv) else ""), index + 1
        if name == "--root":
            root = value
        elif name == "--server-idle-timeout":
            idle = value
        debug = debug or word == "--debug"
        if command is None and not word.startswith("-"):
            command = word
    if command != "build":
        return None
    return _with_idle_timeout(root, debug, idle)


def _with_idle_timeout(root: str | None, debug: bool, idle: str) -> EarlyFlags | None:
    if not idle:
        return EarlyFlags(root, debug, None)
    from bkdbg.errors import UsageError
    from bkdbg.options import parse_duration

    try:
        return EarlyFlags(root, debug, parse_duration(idle, "--server-idle-timeout"))
    except UsageError:
        return None


def claim_early(argv: list[str]) -> EarlyClaim | None:
    """Claim the spare server for `bkdbg ARGV` if it is a detached build; None otherwise.

    The spare derives the build from `argv` in this process's environment, working
    directory and umask, as a server forked from this process would.
    """
    flags = scan_detached_build(argv)
    if flags is None or spares_off():
        return None
    try:
        root = resolve_root(flags.root)
        if not socket_path(root).exists():
            return None
        request = {
            "fingerprint": code_fingerprint(), "debug": flags.debug,
            "idle_timeout": flags.idle_timeout, "argv": argv, "cwd": os.getcwd(),
            "environ": dict(os.environ), "umask": _umask(),
            "interactive": os.isatty(0) and os.isatty(1),
        }
    except OSError:
        return None  # a deleted working directory, for example, which the ordinary start reports
    claimed = claim(root, request)
    return EarlyClaim(root, flags, claimed) if claimed is not None else None


def _umask() -> int:
    # the only way to read it sets it, which is safe here: no other thread runs yet
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def code_fingerprint() -> str:
    """Return what identifies this bkdbg's code: version, interpreter, venv, and source mtimes."""
    package = Path(__file__).resolve().parent.parent
    newest = 0
    pending = [str(package)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False) and entry.name != "__pycache__":
                    pending.append(entry.path)
                elif entry.name.endswith(".py"):
                    newest = max(newest, entry.stat().st_mtime_ns)
    # realpath, because `python` and `python3` of one venv are one interpreter, and
    # sys.prefix because it differs between venvs
    return f"{__version__} {os.path.realpath(sys.executable)} {sys.prefix} {package} {newest}"


def socket_path(root: Path) -> Path:
    return root / SOCKET_NAME


def claim(root: Path, request: dict[str, Any]) -> Claimed | None:
    """Claim the spare under `root`; None when there is none or it did not accept.

    The caller then starts a server itself.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CLAIM_TIMEOUT)
        sock.connect(str(socket_path(root)))
        sock.sendall(json.dumps({"claim": request}).encode() + b"\n")
        reply = read_line(sock).decode(errors="replace").split()
    except OSError:
        sock.close()
        return None  # no spare, or one that went away: the client starts a server itself
    if len(reply) != 3 or reply[0] != "pid" or not reply[1].isdigit():
        sock.close()
        return None  # "stale" or "failed": the spare logs why
    sock.settimeout(None)
    return Claimed(sock, int(reply[1]), reply[2])


def read_line(sock: socket.socket) -> bytes:
    received = b""
    while not received.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the end of the line")
        received += chunk
        if len(received) > MAX_LINE:
            raise ConnectionError("line too long")
    return received.rstrip(b"\n")

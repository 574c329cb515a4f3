"""The steps of `bkdbg build` that run before it imports anything beyond the standard library.

`scan_detached_build` guesses from the arguments whether they run a detached build, and
`claim_early` then claims the spare server under the root (see spare.py). The spare's
work on the build starts about 30 ms sooner than after the client's own imports (2-CPU
VM of docs/benchmarks.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from bkdbg.daemon.rootdir import resolve_root
from bkdbg.daemon.spare import Claimed, claim, code_fingerprint, socket_path, spare_wait

# bkdbg's global flags that take a value, and `build` flags that decide how its server starts
_EARLY_VALUE_FLAGS = (
    "--addr", "--tlscacert", "--tlscert", "--tlskey", "--tlsservername", "--root",
    "--server-idle-timeout",
)


class EarlyFlags(NamedTuple):
    """The flags of a detached build that decide how its server starts."""

    root: str | None
    debug: bool
    idle_timeout: float | None


class EarlyClaim(NamedTuple):
    """A spare claimed for a detached build, with the root and flags it was claimed for."""

    root: Path
    flags: EarlyFlags
    claimed: Claimed


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
    if flags is None or spare_wait() is None:
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

"""bkdbg's entry point: `bkdbg build`, `attach`, `list`, `kill`, `disconnect`, `info`,
`run-script`, and the hidden `__server` that runs a detached server.

The commands are in `bkdbg.commands`. A detached `bkdbg build` first claims the spare
server under its root (see bkdbg/daemon/early.py), before it imports them.

Errors: a `BkdbgError` prints one line `bkdbg: error: <message>` and exits 1 (a process
exit status passes through); with `--debug` its traceback is printed too. Any other
exception is a bug and shows its traceback. Usage errors from argparse exit 2.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from types import FrameType

SERVER_COMMAND = "__server"


class DeferredInterrupt:
    """Holds Ctrl-C back while bkdbg claims or starts its server and imports its commands.

    A KeyboardInterrupt raised there would skip the cleanup that stops that server, and
    print a traceback. `resume` restores the handler and raises the held interrupt where
    the cleanup runs.
    """

    def __init__(self) -> None:
        self.received = False
        self._previous = signal.signal(signal.SIGINT, self._hold)

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        self.received = True

    def resume(self) -> None:
        """Restore the previous SIGINT handler; raise KeyboardInterrupt if Ctrl-C came."""
        signal.signal(signal.SIGINT, self._previous)
        if self.received:
            raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run bkdbg with `argv` (default: sys.argv[1:]) and return its exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == [SERVER_COMMAND]:
        from bkdbg.daemon.main import serve_main

        return serve_main(args_list[1:])

    deferred = DeferredInterrupt()
    from bkdbg.daemon.early import claim_early

    claimed = claim_early(args_list)
    from bkdbg.commands import run

    return run(args_list, claimed, deferred)

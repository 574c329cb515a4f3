"""bkdbg's entry point: `bkdbg build`, `attach`, `list`, `kill`, `disconnect`, `info`,
`run-script`, and the hidden `__server` that runs a detached server.

The commands are in `bkdbg.commands`. A detached `bkdbg build` first claims the spare
server under its root (see bkdbg/daemon/early.py), before it imports them.

Errors: a `BkdbgError` prints one line `bkdbg: error: <message>` and exits 1 (a process
exit status passes through); with `--debug` its traceback is printed too. Any other
exception is a bug and shows its traceback. Usage errors from argparse exit 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

SERVER_COMMAND = "__server"


def main(argv: Sequence[str] | None = None) -> int:
    """Run bkdbg with `argv` (default: sys.argv[1:]) and return its exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == [SERVER_COMMAND]:
        from bkdbg.daemon.main import serve_main

        return serve_main(args_list[1:])

    from bkdbg.daemon.early import claim_early

    claimed = claim_early(args_list)
    from bkdbg.commands import run

    return run(args_list, claimed)

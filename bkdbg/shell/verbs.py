"""The CLI verbs that manage servers: `bkdbg list`, `kill` and `disconnect`.

`bkdbg.commands` builds the parser with these handlers, so this module imports the
daemon client only inside them.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from bkdbg.errors import BkdbgError, UsageError, report_error

if TYPE_CHECKING:
    from bkdbg.shell.workspace import Workspace


def run_list(_args: argparse.Namespace, ws: Workspace) -> int:
    """Print the servers under the root and a waiting spare server."""
    from bkdbg.daemon.spare import ping
    from bkdbg.shell import servers

    for line in servers.list_lines(ws):
        print(line)
    if (pid := ping(ws.root)) is not None:
        print(f"a spare server (pid {pid}) waits for the next bkdbg build here: "
              "bkdbg kill --all stops it")
    return 0


def only_instance(ws: Workspace, verb: str) -> str:
    """Return the id of the only server; raise UsageError naming the choice otherwise."""
    from bkdbg.shell import servers

    rows = servers.instance_rows(ws)
    if len(rows) == 1:
        return rows[0].instance_id
    if not rows:
        raise UsageError(f"no bkdbg server is running under {ws.root}: nothing to {verb}")
    ids = ", ".join(row.instance_id for row in rows)
    raise UsageError(f"{len(rows)} servers are running ({ids}): give an ID to {verb}")


def run_kill(args: argparse.Namespace, ws: Workspace) -> int:
    """Stop the servers named (or the only one, or all and the spare with --all)."""
    from bkdbg.daemon.spare import stop_spare
    from bkdbg.shell import servers

    if args.all:
        ids = [row.instance_id for row in servers.instance_rows(ws)]
        if (pid := stop_spare(ws.root)) is not None:
            print(f"killed the spare server (pid {pid})")
    else:
        ids = args.ids or [only_instance(ws, "kill")]
    status = 0
    for instance_id in ids:
        # one server that cannot be killed must not spare the others named after it
        try:
            print(servers.kill(ws, instance_id))
        except BkdbgError as exc:
            status = report_error(exc, ws.debug)
    return status


def run_disconnect(args: argparse.Namespace, ws: Workspace) -> int:
    """Disconnect every client of a server, which keeps running."""
    from bkdbg.shell import servers

    instance_id = args.id or only_instance(ws, "disconnect")
    print(servers.disconnect(ws, instance_id))
    return 0

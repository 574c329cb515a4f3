"""Server-level operations shared by the CLI verbs and the monitor: list, kill, disconnect."""

from __future__ import annotations

import os
import time

from bkdbg.daemon import client as daemon_client
from bkdbg.daemon.messages import InstanceInfo
from bkdbg.errors import ServerUnreachable, UnknownInstance
from bkdbg.shell.tables import InstanceRow, instance_table
from bkdbg.shell.workspace import Workspace

INSTANCE_ENV = "BKDBG_INSTANCE"
LIST_HINT = "bkdbg list shows the running servers"
STALE = "stale"  # InstanceInfo.state of a server whose process is gone


def _row(info: InstanceInfo, current: str) -> InstanceRow:
    status = info.status
    return InstanceRow(
        instance_id=info.instance_id,
        pid=info.pid or 0,
        started=info.started,
        build=status.build_state if status is not None else info.state,
        clients=len(status.clients) if status is not None else 0,
        current=info.instance_id == current,
    )


def _current_id(ws: Workspace) -> str:
    return ws.current.instance_id if ws.current else os.environ.get(INSTANCE_ENV, "")


def scan(ws: Workspace) -> tuple[list[InstanceRow], list[InstanceInfo]]:
    """Probe the servers under the root; return rows of the live ones, and the stale ones.

    The row of the current server is marked current, or without one the newest row, which
    `bkdbg attach` without an ID picks. A stale server (its process is gone) is returned
    once: listing removes its directory.
    """
    live, stale = [], []
    current = _current_id(ws)
    for info in daemon_client.list_instances(ws.root):
        if info.state == STALE:
            stale.append(info)
        else:
            live.append(_row(info, current))
    if live and not any(row.current for row in live):
        # no current server: mark the one that default_instance picks, the newest
        live[-1].current = True
    return live, stale


def instance_rows(ws: Workspace) -> list[InstanceRow]:
    """Return one row per server under the root that is not stale, oldest first."""
    return scan(ws)[0]


def server_ids(ws: Workspace) -> list[str]:
    return [row.instance_id for row in instance_rows(ws)]


def stale_line(info: InstanceInfo) -> str:
    pid = f"its process {info.pid} is gone" if info.pid else "it never started"
    return f"removed server {info.instance_id}: {pid}"


def list_lines(ws: Workspace) -> list[str]:
    """Return the `list` table (or a line saying no server runs), then the stale servers."""
    rows, stale = scan(ws)
    if rows:
        lines = instance_table(rows, time.time())
    else:
        lines = ["no bkdbg server is running: bkdbg build --invoke sh CONTEXT starts one"]
    return lines + [stale_line(info) for info in stale]


def default_instance(ws: Workspace) -> str:
    """Return the current server, else the only or newest one; raise UnknownInstance if none."""
    if ws.current is not None:
        return ws.current.instance_id
    rows = instance_rows(ws)
    if not rows:
        raise UnknownInstance(f"no bkdbg server is running under {ws.root}: {LIST_HINT}")
    return rows[-1].instance_id


def kill(ws: Workspace, instance_id: str) -> str:
    """Stop a server at once and remove its directory; return the line to print."""
    outcome = daemon_client.kill_instance(ws.root, instance_id)
    ws.forget(instance_id)
    if outcome == "stale":
        raise ServerUnreachable(
            f"bkdbg server {instance_id} was not running: its stale directory was removed: "
            "run bkdbg list to see the servers that are"
        )
    return f"killed server {instance_id}"


def disconnect(ws: Workspace, instance_id: str) -> str:
    """Disconnect every other client from a server, which keeps running."""
    if ws.current is not None and ws.current.instance_id == instance_id:
        count = ws.current.client.disconnect()
    else:
        other = daemon_client.DaemonClient.connect(ws.root, instance_id)
        try:
            count = other.disconnect()
            other.goodbye(end_session=False)
        finally:
            other.close()
    clients = "1 client" if count == 1 else f"{count} clients"
    return f"disconnected {clients} from server {instance_id}"

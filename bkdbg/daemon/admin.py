"""`bkdbg list` and `bkdbg kill`: every instance under a root, probed, pruned or stopped.

Use them through `bkdbg.daemon.client.list_instances` and `kill_instance`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from pathlib import Path

from bkdbg import errors
from bkdbg.daemon.client import PROBE_TIMEOUT, STOP_TIMEOUT, open_client
from bkdbg.daemon.instances import (
    InstancePaths,
    InstanceRecord,
    find_instance,
    pid_alive,
    read_record,
    remove_instance,
    resolve_root,
    server_alive,
    wait_pid_gone,
)
from bkdbg.daemon.instances import list_instances as instance_records
from bkdbg.daemon.launcher import LAUNCH_TIMEOUT
from bkdbg.daemon.messages import InstanceInfo, ServerStatus
from bkdbg.errors import BkdbgError, ServerError

logger = logging.getLogger(__name__)

RUNNING, UNRESPONSIVE, STARTING, STALE = "running", "unresponsive", "starting", "stale"


def list_instances(root: str | os.PathLike[str] | None = None) -> list[InstanceInfo]:
    """Probe every instance under `root`; stale ones are returned once and removed."""
    infos = [_probe(record) for record in instance_records(resolve_root(root))]
    for info in infos:
        if info.state == STALE:
            logger.info("removing stale instance %s (pid %s)", info.instance_id, info.pid)
            remove_instance(InstancePaths(Path(info.directory).parent, info.instance_id))
    return infos


def _probe(record: InstanceRecord) -> InstanceInfo:
    meta = record.meta
    info = InstanceInfo(
        instance_id=record.instance_id, state=STALE, pid=record.pid,
        started=float(meta.get("started", record.created)), context=str(meta.get("context", "")),
        version=str(meta.get("version", "")), directory=str(record.paths.directory),
    )
    status = _probe_status(record.paths)
    if status is not None:
        return dataclasses.replace(info, state=RUNNING, pid=status.pid, started=status.started,
                                   context=status.context, version=status.version,
                                   status=status)
    if record.pid is None and time.time() - record.created < LAUNCH_TIMEOUT:
        return dataclasses.replace(info, state=STARTING)
    if server_alive(record):
        return dataclasses.replace(info, state=UNRESPONSIVE)
    return info


def _probe_status(paths: InstancePaths) -> ServerStatus | None:
    client = open_client(paths)
    try:
        return client.info(timeout=PROBE_TIMEOUT)
    except BkdbgError as exc:
        logger.debug("instance %s does not respond: %s", paths.instance_id, exc)
        return None
    finally:
        client.close(say_goodbye=False)


def kill_instance(root: str | os.PathLike[str] | None, instance_id: str) -> str:
    """Stop a server and remove its directory; returns "stopped", or "stale" for a dead one.

    A server that does not respond to Shutdown gets SIGTERM, then SIGKILL.
    """
    root_path = resolve_root(root)
    paths = find_instance(root_path, instance_id)
    if paths is None:
        raise errors.UnknownInstance(
            f"no bkdbg server with id {instance_id}: {root_path}: run bkdbg list"
        )
    record = read_record(paths)
    was_alive = server_alive(record)
    answered = _request_shutdown(paths)
    if not _wait_stopped(record, STOP_TIMEOUT if answered else 0):
        _signal_server(record)
    remove_instance(paths)
    return "stopped" if answered or was_alive else "stale"


def _wait_stopped(record: InstanceRecord, timeout: float) -> bool:
    if not record.meta.get("in_process"):
        return wait_pid_gone(record.pid, record.instance_id, timeout)
    # an in-process server stops without its process exiting, but it removes its socket
    deadline = time.monotonic() + timeout
    while record.paths.socket.exists() and server_alive(record):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _request_shutdown(paths: InstancePaths) -> bool:
    client = open_client(paths)
    try:
        client.shutdown(wait=False, timeout=PROBE_TIMEOUT)
        return True
    except BkdbgError as exc:
        logger.info("instance %s did not take Shutdown: %s", paths.instance_id, exc)
        return False
    finally:
        client.close(say_goodbye=False)


def _signal_server(record: InstanceRecord) -> None:
    if record.meta.get("in_process"):
        raise ServerError(
            f"bkdbg server {record.instance_id} runs inside bkdbg process {record.pid} and "
            "does not stop: end that process"
        )
    for signum, wait in ((signal.SIGTERM, STOP_TIMEOUT / 2), (signal.SIGKILL, 2.0)):
        if not pid_alive(record.pid, record.instance_id):
            return
        logger.warning("sending %s to server %s (pid %s)", signum.name, record.instance_id,
                       record.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid or 0, signum)
            # a stopped process (SIGSTOP, a debugger) acts on SIGTERM only once continued
            os.kill(record.pid or 0, signal.SIGCONT)
        if wait_pid_gone(record.pid, record.instance_id, wait):
            return

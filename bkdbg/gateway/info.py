"""`bkdbg info`: BuildKit's version and workers, and the lines that show them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import grpc

from bkdbg.buildkit_proto import control_pb2, ops_pb2
from bkdbg.gateway.connection import Connection

logger = logging.getLogger(__name__)

INFO_TIMEOUT = 10.0  # seconds for each of Control.Info and Control.ListWorkers


@dataclass
class WorkerInfo:
    """A BuildKit worker: its id and its platforms as ``os/arch[/variant]``."""

    id: str
    platforms: list[str] = field(default_factory=list)


@dataclass
class BuildkitInfo:
    """BuildKit's version and revision (empty when it does not report them) and its workers."""

    version: str
    revision: str
    workers: list[WorkerInfo] = field(default_factory=list)


def buildkit_info(conn: Connection, timeout: float = INFO_TIMEOUT) -> BuildkitInfo:
    """Ask BuildKit for its version (Control.Info) and workers (Control.ListWorkers).

    A BuildKit older than v0.11 has no Info, so its version is reported as empty.
    Raises the `bkdbg.errors` class that `map_rpc_error` picks for a failed call.
    """
    version, revision = _version(conn, timeout)
    try:
        response = conn.control.ListWorkers(control_pb2.ListWorkersRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        raise conn.map_error(exc, "Control.ListWorkers") from exc
    workers = [
        WorkerInfo(record.ID, [format_platform(p) for p in record.platforms])
        for record in response.record
    ]
    return BuildkitInfo(version, revision, workers)


def format_platform(platform: ops_pb2.Platform) -> str:
    """Format a platform as ``os/arch`` or ``os/arch/variant``, as BuildKit and Docker do."""
    parts = [platform.OS, platform.Architecture]
    if platform.Variant:
        parts.append(platform.Variant)
    return "/".join(parts)


def format_info(client_version: str, address: str, info: BuildkitInfo) -> list[str]:
    """Return the lines `bkdbg info` prints."""
    lines = [
        f"Client:    bkdbg {client_version}",
        f"Address:   {address}",
        f"BuildKit:  {info.version or 'unknown'}"
        + (f" (revision {info.revision})" if info.revision else ""),
        f"Workers:   {len(info.workers)}",
    ]
    for worker in info.workers:
        platforms = ", ".join(worker.platforms) or "no platforms"
        lines.append(f"  {worker.id}: {platforms}")
    return lines


def _version(conn: Connection, timeout: float) -> tuple[str, str]:
    try:
        response = conn.control.Info(control_pb2.InfoRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            logger.info("BuildKit at %s has no Control.Info (older than v0.11)", conn.address)
            return "", ""
        raise conn.map_error(exc, "Control.Info") from exc
    version = response.buildkitVersion
    return version.version, version.revision

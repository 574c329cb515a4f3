"""BuildKit's typed error details: from a failed solve's gRPC trailer to a `FailedStep`.

BuildKit puts a serialized `google.rpc.Status` in the `grpc-status-details-bin` trailer.
Each detail is an `Any` whose type URL is `github.com/moby/buildkit/<name>+json` and whose
value is the protobuf JSON form (seen from BuildKit v0.13 in Docker Engine 26 and from
buildkitd v0.32). The ones used here:

* `errdefs.Solve`: the failed op, with `mountIDs` (the state of each exec mount after the
  failure) and `inputIDs` (the state before it), indexed like `op.exec.mounts`;
* `errdefs.Source`: the Dockerfile (name and bytes) and the line range of the instruction;
* `errdefs.Vertex`: the digest of the failed vertex, as in the Status stream;
* `gatewayapi.ExitMessage`: `{"Code": N}`, the exit status of the failed process.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from bkdbg.buildkit_proto import errdefs_pb2, ops_pb2, rpc_status_pb2
from bkdbg.errors import FailedStep

logger = logging.getLogger(__name__)

DETAILS_TRAILER = "grpc-status-details-bin"
TYPE_URL_PREFIX = "github.com/moby/buildkit/"
JSON_SUFFIX = "+json"
# the Dockerfile frontend's description key for the instruction text (newer daemons only)
COMMAND_DESCRIPTION = "com.docker.dockerfile.v1.command"
EXCERPT_PADDING = 2  # lines shown before and after the failing instruction


@dataclass
class ErrorDetails:
    """The typed details of one BuildKit error; every field may be missing."""

    message: str
    code: int = 0
    solve: errdefs_pb2.Solve | None = None
    sources: list[errdefs_pb2.Source] = field(default_factory=list)
    vertex: str | None = None
    exit_code: int | None = None


@dataclass
class FailedExec:
    """The failed exec op of a build, for starting a container in its state.

    `mount_ids[i]` and `input_ids[i]` are result ids for `exec_op.mounts[i]` after and
    before the failure; they stay valid only while the build that produced them is open.
    """

    step: FailedStep
    exec_op: ops_pb2.ExecOp
    platform: ops_pb2.Platform | None
    mount_ids: list[str | None]
    input_ids: list[str | None]


def status_from_error(error: grpc.RpcError) -> rpc_status_pb2.Status | None:
    """Return the `google.rpc.Status` in the error's trailer, or None when there is none."""
    trailer = getattr(error, "trailing_metadata", None)
    metadata = trailer() if callable(trailer) else None
    for key, value in metadata or ():
        if key == DETAILS_TRAILER and isinstance(value, bytes):
            return parse_status(value)
    return None


def parse_status(data: bytes) -> rpc_status_pb2.Status | None:
    status = rpc_status_pb2.Status()
    try:
        status.ParseFromString(data)
    except DecodeError:
        logger.warning("undecodable %s trailer (%d bytes) ignored", DETAILS_TRAILER, len(data))
        return None
    return status


def error_details(error: grpc.RpcError) -> ErrorDetails:
    """Collect the typed details of a gRPC error from BuildKit."""
    message = error.details() if hasattr(error, "details") else str(error)
    status = status_from_error(error)
    if status is None:
        return ErrorDetails(message=message or str(error))
    return details_from_status(status, fallback_message=message)


def details_from_status(
    status: rpc_status_pb2.Status, fallback_message: str | None = None
) -> ErrorDetails:
    details = ErrorDetails(message=status.message or fallback_message or "", code=status.code)
    for item in status.details:
        name, _, encoding = item.type_url.removeprefix(TYPE_URL_PREFIX).partition("+")
        try:
            _apply_detail(details, name, item.value, encoding == "json")
        except (json_format.ParseError, DecodeError, ValueError, KeyError, TypeError) as exc:
            logger.warning("error detail %s could not be parsed: %s", item.type_url, exc)
    return details


def _apply_detail(details: ErrorDetails, name: str, value: bytes, is_json: bool) -> None:
    if name == "errdefs.Solve":
        details.solve = _decode(errdefs_pb2.Solve(), value, is_json)
    elif name == "errdefs.Source":
        details.sources.append(_decode(errdefs_pb2.Source(), value, is_json))
    elif name == "errdefs.Vertex":
        details.vertex = _decode(errdefs_pb2.Vertex(), value, is_json).digest
    elif name == "gatewayapi.ExitMessage" and is_json:
        details.exit_code = int(json.loads(value)["Code"])


_Detail = TypeVar("_Detail", errdefs_pb2.Solve, errdefs_pb2.Source, errdefs_pb2.Vertex)


def _decode(message: _Detail, value: bytes, is_json: bool) -> _Detail:
    if is_json:
        json_format.Parse(value, message, ignore_unknown_fields=True)
    else:
        message.ParseFromString(value)
    return message


def source_excerpt(source: errdefs_pb2.Source) -> tuple[int, int, list[str]]:
    """Return (first line, last line, excerpt) of the source range, 1-based.

    Excerpt lines read ` 12 | >>> RUN make` for the range and ` 11 |     WORKDIR /src`
    around it, as BuildKit prints them. Returns (0, 0, []) without a usable range.
    """
    ranges = [(r.start.line, max(r.start.line, r.end.line)) for r in source.ranges]
    lines = source.info.data.decode("utf-8", "replace").split("\n")
    if not ranges:
        return 0, 0, []
    first = min(start for start, _ in ranges)
    last = min(max(end for _, end in ranges), len(lines))
    if first < 1 or first > len(lines):
        return 0, 0, []
    excerpt = []
    for number in range(
        max(1, first - EXCERPT_PADDING), min(len(lines), last + EXCERPT_PADDING) + 1
    ):
        marker = ">>>" if any(s <= number <= e for s, e in ranges) else "   "
        excerpt.append(f" {number:3d} | {marker} {lines[number - 1]}")
    return first, last, excerpt


def _instruction(details: ErrorDetails, source: errdefs_pb2.Source | None) -> str | None:
    if details.solve is not None and details.solve.description.get(COMMAND_DESCRIPTION):
        return details.solve.description[COMMAND_DESCRIPTION]
    if source is None or not source.ranges:
        return None
    first, last, _ = source_excerpt(source)
    if first == 0:
        return None
    lines = source.info.data.decode("utf-8", "replace").split("\n")[first - 1 : last]
    return " ".join(line.strip().rstrip("\\").strip() for line in lines)


def failed_step(
    details: ErrorDetails, vertex_name: str | None = None, logs: list[str] | None = None
) -> FailedStep:
    """Describe the failed step from the error details and what the Status stream showed."""
    source = _dockerfile_source(details.sources)
    step = FailedStep(
        message=details.message,
        exit_code=details.exit_code,
        vertex_name=vertex_name,
        logs=list(logs or []),
    )
    if source is not None:
        step.filename = source.info.filename or None
        step.line, _, step.source_lines = source_excerpt(source)
        step.line = step.line or None
    step.instruction = _instruction(details, source)
    op = details.solve.op if details.solve is not None else None
    if op is not None and op.HasField("exec"):
        meta = op.exec.meta
        step.is_exec = _command_ran(details)
        step.command = list(meta.args)
        step.env = list(meta.env)
        step.cwd = meta.cwd or "/"
        step.user = meta.user
    return step


def _command_ran(details: ErrorDetails) -> bool:
    """Tell whether the exec op's command ran, rather than failing while BuildKit computed
    the cache key of one of its inputs (a missing bind-mount source, for example)."""
    return details.solve is not None and details.solve.WhichOneof("subject") != "cache"


def _dockerfile_source(sources: list[errdefs_pb2.Source]) -> errdefs_pb2.Source | None:
    """Pick the innermost source location with data; BuildKit appends outer ones last."""
    for source in sources:
        if source.info.data:
            return source
    return sources[0] if sources else None


def failed_exec(details: ErrorDetails, step: FailedStep) -> FailedExec | None:
    """Return the failed exec op and its result ids, or None for any other kind of failure."""
    solve = details.solve
    if solve is None or not solve.op.HasField("exec") or not _command_ran(details):
        return None
    count = len(solve.op.exec.mounts)
    return FailedExec(
        step=step,
        exec_op=solve.op.exec,
        platform=solve.op.platform if solve.op.HasField("platform") else None,
        mount_ids=_ids(solve.mountIDs, count),
        input_ids=_ids(solve.inputIDs, count),
    )


def _ids(values: Iterable[str], count: int) -> list[str | None]:
    """Pad or cut ids to one per mount; BuildKit sends "" for a mount without a result."""
    ids: list[str | None] = [value or None for value in list(values)[:count]]
    return ids + [None] * (count - len(ids))


# ---------------------------------------------------------------------------------------
# One-line messages

_TARGET_NOT_FOUND = re.compile(r'target stage "?([^"]*)"? could not be found')
_PARSE_ERROR = re.compile(r"dockerfile parse error on line (\d+): (.*)", re.IGNORECASE)
_MISSING_PATH = re.compile(r'failed to calculate checksum of ref \S+: "([^"]*)": not found')
_GO_RPC_PREFIX = re.compile(r"^(rpc error: code = \w+ desc = )+")
_STAGE = re.compile(r"^\s*FROM\s+(?:--\S+\s+)*\S+\s+AS\s+(\S+)\s*$", re.IGNORECASE | re.MULTILINE)


def dockerfile_stages(text: str) -> list[str]:
    """Return the stage names (`FROM image AS name`) of a Dockerfile, in order."""
    return _STAGE.findall(text)


def failure_message(
    details: ErrorDetails,
    step: FailedStep,
    dockerfile_text: str | None = None,
    target: str | None = None,
) -> str:
    """Build the one-line message of a failed solve, in the form `what: value: what to do`."""
    message = _GO_RPC_PREFIX.sub("", details.message).strip()
    target_match = _TARGET_NOT_FOUND.search(message)
    if target_match:
        return _target_message(target_match.group(1) or target or "", dockerfile_text)
    where = f"{step.filename}:{step.line}" if step.filename and step.line else step.filename
    parse_match = _PARSE_ERROR.search(message)
    if parse_match:
        where = where or f"line {parse_match.group(1)}"
        return f"invalid Dockerfile: {where}: {parse_match.group(2)}: fix that line"
    missing = _MISSING_PATH.search(message)
    if missing:
        message = f'"{missing.group(1)}" not found: check the path and .dockerignore'
    if where is None:
        return f"build failed: {message}"
    instruction = f" {step.instruction}" if step.instruction else ""
    return f"build step failed: {where}{instruction}: {message}"


def _target_message(name: str, dockerfile_text: str | None) -> str:
    stages = dockerfile_stages(dockerfile_text or "")
    if not stages:
        return f"unknown build target: {name}: the Dockerfile names no stages; drop --target"
    return f"unknown build target: {name}: use one of {', '.join(stages)}"

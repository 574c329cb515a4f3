"""The result of a gateway solve: its ref, image config and metadata."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError

from bkdbg.buildkit_proto import gateway_pb2, ops_pb2

logger = logging.getLogger(__name__)


@dataclass
class BuildResult:
    """A successful solve: the result ref, its image config and all result metadata.

    `ref_id` is "" for an empty result (`FROM scratch` with no files).
    """

    ref_id: str
    image_config: dict[str, Any]
    metadata: dict[str, bytes]
    result: gateway_pb2.Result = field(repr=False)


def build_result(result: gateway_pb2.Result, platforms: Sequence[str] = ()) -> BuildResult:
    """Pick the ref of a result.

    For a multi-platform result, that is the first of `platforms` (the `--platform` order)
    that BuildKit built, else the first platform BuildKit lists.
    """
    metadata = dict(result.metadata)
    which = result.WhichOneof("result")
    if which == "ref":
        return BuildResult(result.ref.id, _config(metadata, ""), metadata, result)
    if which == "refs":
        chosen = [p for p in platforms if p in result.refs.refs]
        key = (
            chosen[0] if chosen else _first_platform(metadata) or min(result.refs.refs, default="")
        )
        ref = result.refs.refs[key].id if key in result.refs.refs else ""
        return BuildResult(ref, _config(metadata, key), metadata, result)
    if which == "refDeprecated":
        return BuildResult(result.refDeprecated, _config(metadata, ""), metadata, result)
    return BuildResult("", _config(metadata, ""), metadata, result)


def final_vertex(result: gateway_pb2.Result, ref_id: str) -> str | None:
    """Return the digest of the vertex that produces ref `ref_id`, if BuildKit sent its LLB.

    The last op of an LLB definition has no operation, only the result as its input.
    """
    which = result.WhichOneof("result")
    refs = [result.ref] if which == "ref" else list(result.refs.refs.values())
    matching = [ref for ref in refs if ref.id == ref_id and ref.HasField("def")]
    if not matching:
        return None
    # `def` is a Python keyword, so the generated field is reached with getattr
    ops = getattr(getattr(matching[0], "def"), "def")
    if not ops:
        return None
    terminal = ops_pb2.Op()
    try:
        terminal.ParseFromString(ops[-1])
    except DecodeError:
        return None
    return terminal.inputs[0].digest if terminal.inputs else None


def _first_platform(metadata: dict[str, bytes]) -> str | None:
    try:
        platforms = json.loads(metadata.get("refs.platforms", b"{}"))["platforms"]
        return str(platforms[0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _config(metadata: dict[str, bytes], platform: str) -> dict[str, Any]:
    key = f"containerimage.config/{platform}" if platform else "containerimage.config"
    raw = metadata.get(key) or metadata.get("containerimage.config")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        logger.warning("result metadata %s is not JSON; image config ignored", key)
        return {}
    return config if isinstance(config, dict) else {}

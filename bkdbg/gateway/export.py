"""Outputs of a build (`-o`, `-t`): a second, cached gateway solve with exporters.

The build being debugged stays open, so its result cannot be exported by `Return`ing it.
Instead a second gateway build runs the same frontend request, which BuildKit solves
from its cache, and `Return`s its result at once. BuildKit then applies the exporters
set on that `Control.Solve`. Files of `local` and `tar`-like exporters come back through
the session's FileSend service.

On a Docker Engine the embedded BuildKit has the `moby` exporter, which stores the image
in the engine's image store (what `docker buildx build --load` does). It does not push, so
`push=true` there pushes through the engine's `POST /images/{name}/push`, as buildx does.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import logging
import socket
import sys
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from bkdbg.buildkit_proto import control_pb2
from bkdbg.errors import BuildkitError, UsageError
from bkdbg.gateway.address import parse_address
from bkdbg.gateway.connection import Connection
from bkdbg.options import BuildOptions, OutputSpec
from bkdbg.progress import ProgressEvent

logger = logging.getLogger(__name__)

NO_OUTPUT_NOTE = (
    "no output specified: the build result will only remain in the build cache; "
    "use -o/--output to export it or -t/--tag to load it as an image"
)
# outputs that BuildKit streams back through FileSend as one archive
ARCHIVE_TYPES = ("tar", "oci", "docker")
PUSH_TIMEOUT = 600.0  # seconds for one engine push, which uploads every missing layer
# exporter response keys (moby/buildkit exporter/containerimage/exptypes)
IMAGE_DIGEST_KEY = "containerimage.digest"
CONFIG_DIGEST_KEY = "containerimage.config.digest"


@dataclass
class ExportTarget:
    """The destination of what exporter number `index` sends through FileSend.

    `directory` receives a file tree (`local`), and `stream` receives an archive.
    """

    index: int
    directory: str | None = None
    stream: BinaryIO | None = None


@dataclass
class ExportPlan:
    """Exporters for one `Control.Solve`, with what to do around them."""

    exporters: list[control_pb2.Exporter] = field(default_factory=list)
    targets: list[ExportTarget] = field(default_factory=list)
    notes: list[Callable[[dict[str, str]], str]] = field(default_factory=list)
    engine_pushes: list[str] = field(default_factory=list)
    files: list[BinaryIO] = field(default_factory=list)

    def close_files(self) -> None:
        for file in self.files:
            file.close()
        self.files.clear()


def export_outputs(
    conn: Connection,
    options: BuildOptions,
    on_progress: Callable[[list[ProgressEvent]], None],
    stdout: BinaryIO | None = None,
) -> list[str]:
    """Export the `-o` and `-t` outputs of `options`; return the notes to print.

    `stdout` receives `-o type=tar,dest=-` (default: this process's standard output).
    With no outputs, returns only NO_OUTPUT_NOTE, unless `--invoke` was given.
    Raises UsageError for an output this BuildKit cannot produce, BuildkitError when an
    exporter or a push fails, and BuildFailed if the build now fails.
    """
    if not options.outputs and not options.tags:
        return [] if options.invoke is not None else [NO_OUTPUT_NOTE]
    from bkdbg.gateway.build import GatewayBuild, is_moby, list_workers

    plan = plan_exports(options, moby=is_moby(list_workers(conn)), stdout=stdout)
    if not plan.exporters:
        return [NO_OUTPUT_NOTE]
    # the solve must hit the cache of the build just made, not run every step again
    cached = dataclasses.replace(options, no_cache=False)
    build = GatewayBuild(
        conn, cached, on_progress, exporters=plan.exporters, session_exports=plan.targets
    )
    try:
        build.solve()
        response = build.finish()
    finally:
        build.close()
        plan.close_files()
    for name in plan.engine_pushes:
        push_with_engine(conn.address, name)
    return [note(response) for note in plan.notes]


def plan_exports(options: BuildOptions, moby: bool, stdout: BinaryIO | None = None) -> ExportPlan:
    """Turn `-o` and `-t` into exporters, following `docker buildx build` on each driver.

    `moby` tells whether BuildKit is a Docker Engine's. Raises UsageError for an output
    that needs something this BuildKit lacks.
    """
    plan = ExportPlan()
    tags = ",".join(options.tags)
    has_image = False
    try:
        for spec in options.outputs:
            has_image |= _add_output(plan, spec, moby, tags, stdout)
    except BaseException:
        plan.close_files()
        raise
    if tags and not has_image and moby:
        # like buildx's docker driver: tags alone load the image into the engine
        _add_image(plan, OutputSpec("image", {"name": tags}), moby, tags)
    return plan


def _add_output(
    plan: ExportPlan, spec: OutputSpec, moby: bool, tags: str, stdout: BinaryIO | None
) -> bool:
    """Add one `-o` output to `plan`; return True when it makes an image."""
    if spec.type == "local":
        _add_local(plan, spec)
    elif spec.type in ARCHIVE_TYPES and spec.attrs.get("dest"):
        _add_archive(plan, spec, stdout)
    elif spec.type in ("image", "registry", "docker"):
        if spec.type == "docker" and not moby:
            raise UsageError(
                "invalid --output value: type=docker: without dest=FILE it needs a Docker "
                "Engine's BuildKit: add dest=FILE or use --addr docker://..."
            )
        _add_image(plan, spec, moby, tags)
        return True
    else:
        raise UsageError(f"invalid --output value: type={spec.type}: it needs dest=PATH")
    return False


def _exporter(kind: str, attrs: dict[str, str]) -> control_pb2.Exporter:
    return control_pb2.Exporter(Type=kind, Attrs={k: v for k, v in attrs.items() if k != "dest"})


def _add_local(plan: ExportPlan, spec: OutputSpec) -> None:
    dest = spec.attrs["dest"]
    plan.targets.append(ExportTarget(len(plan.exporters), directory=dest))
    plan.exporters.append(_exporter("local", spec.attrs))
    plan.notes.append(lambda _response: f"exported the result to {dest}")


def _add_archive(plan: ExportPlan, spec: OutputSpec, stdout: BinaryIO | None) -> None:
    dest = spec.attrs["dest"]
    if dest == "-":
        stream = stdout if stdout is not None else sys.stdout.buffer
        where = "standard output"
    else:
        try:
            stream = open(dest, "wb")  # noqa: SIM115 - closed by ExportPlan.close_files
        except OSError as exc:
            raise UsageError(
                f"cannot write output file: {dest}: {exc.strerror}: check the path"
            ) from exc
        plan.files.append(stream)
        where = dest
    plan.targets.append(ExportTarget(len(plan.exporters), stream=stream))
    plan.exporters.append(_exporter(spec.type, spec.attrs))
    plan.notes.append(lambda _response: f"wrote the result as a {spec.type} archive to {where}")


def _add_image(plan: ExportPlan, spec: OutputSpec, moby: bool, tags: str) -> None:
    attrs = dict(spec.attrs)
    if not attrs.get("name") and tags:
        attrs["name"] = tags
    push = spec.type == "registry" or attrs.get("push", "").lower() in ("true", "1")
    if push and not attrs.get("name"):
        raise UsageError(f"invalid --output value: type={spec.type}: pushing needs name=NAME or -t")
    if not moby:
        attrs["push"] = "true" if push else attrs.get("push", "false")
        plan.exporters.append(_exporter("image", attrs))
        plan.notes.append(lambda response: _image_note(attrs.get("name", ""), push, response))
        return
    attrs.pop("push", None)
    if push:
        plan.engine_pushes.extend(attrs["name"].split(","))
    plan.exporters.append(_exporter("moby", attrs))
    plan.notes.append(lambda response: _engine_note(attrs.get("name", ""), push, response))


def _digest(response: dict[str, str]) -> str:
    digest = response.get(IMAGE_DIGEST_KEY) or response.get(CONFIG_DIGEST_KEY) or ""
    return f" ({digest})" if digest else ""


def _image_note(names: str, pushed: bool, response: dict[str, str]) -> str:
    action = "pushed image" if pushed else "exported image"
    return f"{action} {names or '(no name)'}{_digest(response)}"


def _engine_note(names: str, pushed: bool, response: dict[str, str]) -> str:
    if not names:
        return f"loaded an untagged image into the Docker Engine{_digest(response)}"
    pushed_text = " and pushed it" if pushed else ""
    return f"loaded image {names} into the Docker Engine{pushed_text}{_digest(response)}"


# ---------------------------------------------------------------------------------------
# Push through the Docker Engine API


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def push_with_engine(address: str, name: str) -> None:
    """Push image `name` with the Docker Engine at `address` (`docker://unix://PATH`).

    Raises BuildkitError with the engine's message when the push fails.
    """
    parsed = parse_address(address)
    if parsed.scheme != "docker" or parsed.path is None:
        raise UsageError(f"cannot push through the engine: {address}: needs docker://unix://PATH")
    repository, tag = _split_tag(name)
    query = urllib.parse.urlencode({"tag": tag} if tag else {})
    # NOTE: anonymous only; registries that need a login reject the push with the
    # engine's "unauthorized" message, which is shown as it is
    auth = base64.urlsafe_b64encode(b"{}").decode("ascii")
    conn = _UnixHTTPConnection(parsed.path, PUSH_TIMEOUT)
    try:
        path = f"/images/{urllib.parse.quote(repository, safe='/:')}/push?{query}"
        conn.request("POST", path, headers={"X-Registry-Auth": auth})
        _check_push_response(conn.getresponse(), name)
    except OSError as exc:
        raise BuildkitError(f"push failed: {name}: {exc}: check the engine and retry") from exc
    finally:
        conn.close()
    logger.info("pushed %s through the engine at %s", name, address)


def _split_tag(name: str) -> tuple[str, str]:
    """Split `registry:5000/repo:tag` into repository and tag (empty when absent)."""
    head, _, last = name.rpartition("/")
    if ":" in last and "@" not in last:
        repo_last, _, tag = last.partition(":")
        return (f"{head}/{repo_last}" if head else repo_last), tag
    return name, ""


def _check_push_response(response: http.client.HTTPResponse, name: str) -> None:
    """Read the engine's JSON message stream; raise on an HTTP or in-stream error."""
    body = response.read().decode("utf-8", "replace")
    if response.status != 200:
        raise BuildkitError(
            f"push failed: {name}: engine returned HTTP {response.status}: {body[:200]}"
        )
    for line in body.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("error"):
            raise BuildkitError(
                f"push failed: {name}: {message['error']}: check the name and login"
            )

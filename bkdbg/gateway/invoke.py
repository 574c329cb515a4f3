"""The process that `--invoke` starts (args, env, cwd, user) and its container's mounts.

Both come from the build result and its image config, or from the failed exec op. The
rules follow buildx (build/result.go), with one difference that bkdbg documents for
`--invoke`: the image's (or the failed step's) WorkingDir and User apply unless the
invoke config sets them, for every invoke form.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from bkdbg.buildkit_proto import ops_pb2
from bkdbg.errors import ContainerError, FailedStep, UsageError
from bkdbg.gateway.container import BridgeOwner, ProcessConfig
from bkdbg.options import InvokeConfig


def process_config(
    invoke: InvokeConfig,
    image_config: Mapping[str, Any] | None,
    failed_step: FailedStep | None,
    tty: bool,
    rows: int = 0,
    cols: int = 0,
    term: str | None = None,
) -> ProcessConfig:
    """Build the ProcessConfig of an invoke, on the failed step when given, else the image.

    `image_config` is the OCI image config JSON as a dict (its `config` object contains Env,
    Entrypoint, Cmd, WorkingDir and User). `term` is the client's TERM, set under a tty
    unless the invoke's env sets TERM. Raises UsageError when there is no command to run.
    """
    if failed_step is not None:
        args = _failed_step_args(invoke, failed_step)
        base_env, base_cwd, base_user = failed_step.env, failed_step.cwd, failed_step.user
    else:
        settings = _image_settings(image_config)
        args = _image_args(invoke, settings)
        base_env = list(settings.get("Env") or [])
        base_cwd = settings.get("WorkingDir") or ""
        base_user = settings.get("User") or ""
    if not args:
        raise UsageError(
            "no command to run: the image has no Entrypoint or Cmd: "
            "give one with --invoke, for example --invoke sh"
        )

    terminal = [f"TERM={term}"] if tty and term else []
    return ProcessConfig(
        args=args,
        env=merge_env(base_env, terminal, invoke.env),
        cwd=invoke.cwd if invoke.cwd is not None else base_cwd,
        user=invoke.user if invoke.user is not None else base_user,
        tty=tty,
        rows=rows,
        cols=cols,
    )


def _image_settings(image_config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if not image_config:
        return {}
    settings = image_config.get("config")
    return settings if isinstance(settings, Mapping) else {}


def _image_args(invoke: InvokeConfig, settings: Mapping[str, Any]) -> list[str]:
    """Return Entrypoint+Cmd, each replaced by the invoke's own when it gives one."""
    if invoke.use_image_default:
        return [*(settings.get("Entrypoint") or []), *(settings.get("Cmd") or [])]
    if invoke.entrypoint is not None:
        # an explicit entrypoint replaces the image's Cmd as well (buildx's CSV form)
        return [*invoke.entrypoint, *(invoke.args or [])]
    entrypoint = list(settings.get("Entrypoint") or [])
    if invoke.args is not None:
        return [*entrypoint, *invoke.args]
    return [*entrypoint, *(settings.get("Cmd") or [])]


def _failed_step_args(invoke: InvokeConfig, step: FailedStep) -> list[str]:
    """Return the invoke's command, or the failed command itself as buildx does."""
    if invoke.use_image_default:
        return list(step.command)
    args = [*(invoke.entrypoint or []), *(invoke.args or [])]
    return args or list(step.command)


def merge_env(*layers: Iterable[str]) -> list[str]:
    """Merge KEY=VALUE lists; a later layer's value wins and keeps the key's first place.

    Duplicates matter because getenv(3) returns the first entry of a key.
    """
    merged: dict[str, str] = {}
    for layer in layers:
        for entry in layer:
            merged[entry.partition("=")[0]] = entry
    return list(merged.values())


class FailedExecLike(Protocol):
    """The failed exec op of a build and the result ids of its mounts (see GatewayBuild)."""

    @property
    def exec_op(self) -> Any: ...

    @property
    def platform(self) -> Any: ...

    @property
    def mount_ids(self) -> Sequence[str | None]: ...

    @property
    def input_ids(self) -> Sequence[str | None]: ...


class ResultLike(Protocol):
    """A successful solve's result (see GatewayBuild.result)."""

    @property
    def ref_id(self) -> str: ...


class DebugBuild(BridgeOwner, Protocol):
    """A gateway build that either has a result or failed in an exec op."""

    @property
    def result(self) -> ResultLike | None: ...

    @property
    def failed_exec(self) -> FailedExecLike | None: ...


def container_spec(
    build: DebugBuild,
    state: str,
    image_config: Mapping[str, Any] | None,
    ref_id: str | None,
) -> dict[str, Any]:
    """Return the keyword arguments of Container.create for a state of `build`."""
    if state == "result":
        if ref_id is None and build.result is not None:
            ref_id = build.result.ref_id
        if not ref_id:
            raise ContainerError("no build result to debug: the build has no result ref")
        root = ops_pb2.Mount(dest="/", mountType=ops_pb2.BIND, resultID=ref_id)
        return {"mounts": [root], "platform": _image_platform(image_config)}
    failed = build.failed_exec
    if failed is None:
        raise ContainerError(
            "no failed step to debug: the build did not fail in a RUN step: "
            "debug the last result instead"
        )
    op = failed.exec_op
    ids = failed.mount_ids if state == "failed" else failed.input_ids
    return {
        "mounts": _failed_mounts(op.mounts, ids),
        "network": op.network,
        "security": op.security,
        "platform": failed.platform,
        "hostname": op.meta.hostname,
        "extra_hosts": list(op.meta.extraHosts),
    }


def _failed_mounts(mounts: Sequence[Any], ids: Sequence[str | None]) -> list[Any]:
    """Copy the exec op's mounts with result ids, as buildx does.

    `output` stays unset, as in buildx and BuildKit's Go client, so BuildKit gives every
    bind mount a writable layer. Cache, secret, SSH and tmpfs mounts may have no id.
    """
    if len(ids) < len(mounts):
        raise ContainerError(
            f"no state for the failed step: BuildKit gave {len(ids)} of {len(mounts)} mount "
            "results: debug the last result instead"
        )
    copies = []
    for mount, result_id in zip(mounts, ids, strict=False):
        if mount.dest == "/" and not result_id:
            raise ContainerError("no state for the failed step: the root mount has no result")
        copy = ops_pb2.Mount(
            dest=mount.dest,
            selector=mount.selector,
            readonly=mount.readonly,
            mountType=mount.mountType,
            resultID=result_id or "",
        )
        for name in ("cacheOpt", "secretOpt", "SSHOpt", "TmpfsOpt"):
            if mount.HasField(name):
                getattr(copy, name).CopyFrom(getattr(mount, name))
        copies.append(copy)
    return copies


def _image_platform(image_config: Mapping[str, Any] | None) -> Any:
    if not image_config or not image_config.get("os") or not image_config.get("architecture"):
        return None
    return ops_pb2.Platform(
        OS=image_config["os"],
        Architecture=image_config["architecture"],
        Variant=image_config.get("variant", ""),
    )

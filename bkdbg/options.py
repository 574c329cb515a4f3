"""Build and invoke options, shared by the CLI, the monitor, the server and the gateway.

The client parses and validates flags into these dataclasses (so bad input fails before
any server starts), resolves relative paths and values taken from its own environment,
and sends them to the server as JSON. Flag names and meanings follow `docker buildx build`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from bkdbg.errors import UsageError

PROGRESS_MODES = ("auto", "tty", "plain", "rawjson", "quiet")
NETWORK_MODES = ("default", "none", "host")
ON_MODES = ("always", "error")
OUTPUT_TYPES = ("local", "tar", "image", "docker", "oci", "registry")


@dataclass
class SecretSpec:
    """`--secret id=ID,src=PATH` or `id=ID,env=VAR`; `value` is read by the client from env."""

    id: str
    src: str | None = None
    env: str | None = None
    value: str | None = field(default=None, repr=False)


@dataclass
class SSHSpec:
    """`--ssh default` (SSH_AUTH_SOCK) or `--ssh ID=PATH[,PATH]`."""

    id: str
    paths: list[str] = field(default_factory=list)


@dataclass
class OutputSpec:
    """`-o type=local,dest=DIR` and friends; `attrs` holds every key but `type`."""

    type: str
    attrs: dict[str, str] = field(default_factory=dict)


@dataclass
class InvokeConfig:
    """What `--invoke` starts: buildx's `sh`, `'sh -c "ls /"'`, CSV form, or `default`.

    `entrypoint` and `args` are None when not given; `use_image_default` means the image's
    own Entrypoint and Cmd. `on` is `always` (result, or failed step on failure) or `error`.
    """

    entrypoint: list[str] | None = None
    args: list[str] | None = None
    env: list[str] = field(default_factory=list)
    user: str | None = None
    cwd: str | None = None
    tty: bool = True
    use_image_default: bool = False
    on: str = "always"


@dataclass
class TLSConfig:
    """Client TLS files for a `tcp://` BuildKit address (buildctl's `--tls*` flags)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None


@dataclass
class BuildOptions:
    """One build, as `bkdbg build` or the monitor's `build` was asked for it.

    `addr` and `tls` say which BuildKit the server dials; `addr` None means the default
    search (`BUILDKIT_HOST`, the standard buildkitd socket, the Docker Engine).
    """

    context: str
    dockerfile: str | None = None
    dockerfile_content: str | None = field(default=None, repr=False)
    target: str | None = None
    build_args: dict[str, str] = field(default_factory=dict)
    platforms: list[str] = field(default_factory=list)
    no_cache: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    build_contexts: dict[str, str] = field(default_factory=dict)
    network: str = "default"
    add_hosts: list[str] = field(default_factory=list)
    secrets: list[SecretSpec] = field(default_factory=list)
    ssh: list[SSHSpec] = field(default_factory=list)
    outputs: list[OutputSpec] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    progress: str = "auto"
    invoke: InvokeConfig | None = None
    addr: str | None = None
    tls: TLSConfig | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BuildOptions:
        raw: dict[str, Any] = json.loads(text)
        raw["secrets"] = [SecretSpec(**s) for s in raw.get("secrets", [])]
        raw["ssh"] = [SSHSpec(**s) for s in raw.get("ssh", [])]
        raw["outputs"] = [OutputSpec(**o) for o in raw.get("outputs", [])]
        if raw.get("invoke") is not None:
            raw["invoke"] = InvokeConfig(**raw["invoke"])
        if raw.get("tls") is not None:
            raw["tls"] = TLSConfig(**raw["tls"])
        return cls(**raw)


def split_csv(value: str, flag: str) -> dict[str, str]:
    """Parse a buildx CSV value `k=v,k2="a,b"` into a dict; repeated keys are joined by ','."""
    try:
        fields = next(csv.reader([value]))
    except (csv.Error, StopIteration) as exc:
        raise UsageError(f"invalid {flag} value: {value!r}: {exc}") from exc
    result: dict[str, str] = {}
    for item in fields:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(
                f"invalid {flag} value: {value!r}: expected comma-separated key=value pairs"
            )
        key = key.strip().lower()
        result[key] = f"{result[key]},{val}" if key in result else val
    return result


def parse_key_value(
    value: str, flag: str, environ: dict[str, str] | None = None
) -> tuple[str, str]:
    """Parse `K=V`; a bare `K` takes its value from the environment, as buildx does."""
    key, sep, val = value.partition("=")
    if not key:
        raise UsageError(f"invalid {flag} value: {value!r}: expected KEY=VALUE")
    if sep:
        return key, val
    env = os.environ if environ is None else environ
    if key not in env:
        raise UsageError(
            f"invalid {flag} value: {value!r}: no '=' and {key} is not set in the environment: "
            f"give {key}=VALUE or export {key}"
        )
    return key, env[key]


def parse_secret(value: str, environ: dict[str, str] | None = None) -> SecretSpec:
    """Parse `--secret id=ID[,src=PATH|,env=VAR]` (also `source=` and `type=file|env`)."""
    attrs = split_csv(value, "--secret")
    unknown = set(attrs) - {"id", "src", "source", "env", "type"}
    if unknown:
        raise UsageError(
            f"invalid --secret value: {value!r}: unknown key {sorted(unknown)[0]!r}; "
            "use id=ID,src=PATH or id=ID,env=VAR"
        )
    src = attrs.get("src") or attrs.get("source")
    env_name = attrs.get("env")
    secret_id = attrs.get("id") or (os.path.basename(src) if src else env_name)
    if not secret_id:
        raise UsageError(f"invalid --secret value: {value!r}: id is required, e.g. id=mytoken")
    if attrs.get("type") == "env" and not env_name:
        env_name, src = src or secret_id, None
    if not src and not env_name:
        env_name = secret_id
    spec = SecretSpec(id=secret_id, src=src, env=env_name)
    return _resolve_secret(spec, value, environ)


def _resolve_secret(spec: SecretSpec, value: str, environ: dict[str, str] | None) -> SecretSpec:
    if spec.src:
        spec.src = os.path.abspath(spec.src)
        if not os.path.isfile(spec.src):
            raise UsageError(f"secret file not found: {spec.src}: check --secret {value!r}")
        spec.env = None
        return spec
    env = os.environ if environ is None else environ
    if spec.env not in env:
        raise UsageError(
            f"secret environment variable not set: {spec.env}: export it or use src=PATH"
        )
    spec.value = env[str(spec.env)]
    return spec


def parse_ssh(value: str, environ: dict[str, str] | None = None) -> SSHSpec:
    """Parse `--ssh default` or `--ssh ID=PATH[,PATH]`."""
    key, sep, paths = value.partition("=")
    if not key:
        raise UsageError(f"invalid --ssh value: {value!r}: use default or ID=PATH")
    if sep:
        return SSHSpec(id=key, paths=[os.path.abspath(p) for p in paths.split(",") if p])
    env = os.environ if environ is None else environ
    sock = env.get("SSH_AUTH_SOCK")
    if not sock:
        raise UsageError(f"invalid --ssh value: {value!r}: SSH_AUTH_SOCK is not set; use ID=PATH")
    return SSHSpec(id=key, paths=[sock])


def parse_output(value: str) -> OutputSpec:
    """Parse `-o type=local,dest=DIR`; a bare path means `type=local,dest=PATH`, `-` a tar."""
    if value == "-":
        return OutputSpec(type="tar", attrs={"dest": "-"})
    if "=" not in value:
        return OutputSpec(type="local", attrs={"dest": os.path.abspath(value)})
    attrs = split_csv(value, "--output")
    out_type = attrs.pop("type", "")
    if out_type not in OUTPUT_TYPES:
        raise UsageError(
            f"invalid --output value: {value!r}: type must be one of {', '.join(OUTPUT_TYPES)}"
        )
    if out_type in ("local", "tar") and not attrs.get("dest"):
        raise UsageError(f"invalid --output value: {value!r}: type={out_type} needs dest=PATH")
    if attrs.get("dest") and attrs["dest"] != "-":
        attrs["dest"] = os.path.abspath(attrs["dest"])
    return OutputSpec(type=out_type, attrs=attrs)


def parse_invoke(value: str, on: str = "always") -> InvokeConfig:
    """Parse `--invoke`: `default`, a shell-quoted command, or the CSV form."""
    if on not in ON_MODES:
        raise UsageError(f"invalid --on value: {on!r}: use always or error")
    if value == "default":
        return InvokeConfig(use_image_default=True, on=on)
    first = value.split(",", 1)[0]
    if "=" in first and first.split("=", 1)[0] in _INVOKE_KEYS:
        return _parse_invoke_csv(value, on)
    try:
        words = shlex.split(value)
    except ValueError as exc:
        # shlex raises "No closing quotation" or "No escaped character"
        raise UsageError(
            f"invalid --invoke value: {value!r}: {exc}: close the quote or escape the character"
        ) from exc
    if not words:
        raise UsageError("invalid --invoke value: '': give a command such as sh")
    return InvokeConfig(entrypoint=words[:1], args=words[1:], on=on)


_INVOKE_KEYS = ("entrypoint", "args", "cmd", "env", "user", "cwd", "tty")


def _parse_invoke_csv(value: str, on: str) -> InvokeConfig:
    try:
        fields = next(csv.reader([value]))
    except (csv.Error, StopIteration) as exc:
        raise UsageError(f"invalid --invoke value: {value!r}: {exc}") from exc
    config = InvokeConfig(on=on)
    for item in fields:
        key, sep, val = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in _INVOKE_KEYS:
            raise UsageError(
                f"invalid --invoke value: {value!r}: unknown field {item!r}; "
                f"use {', '.join(_INVOKE_KEYS)}"
            )
        _set_invoke_field(config, key, val, value)
    command = (config.entrypoint or []) + (config.args or [])
    if command and not command[0]:
        raise UsageError(f"invalid --invoke value: {value!r}: give a command")
    return config


def _set_invoke_field(config: InvokeConfig, key: str, val: str, value: str) -> None:
    if key == "entrypoint":
        config.entrypoint = (config.entrypoint or []) + [val]
    elif key in ("args", "cmd"):
        config.args = (config.args or []) + [val]
    elif key == "env":
        # the container runtime rejects an entry without '=' only when the process starts
        name, sep, _ = val.partition("=")
        if not name or not sep:
            raise UsageError(f"invalid --invoke value: {value!r}: env needs KEY=VALUE")
        config.env.append(val)
    elif key == "user":
        config.user = val
    elif key == "cwd":
        config.cwd = val
    elif val.lower() in ("true", "false"):
        config.tty = val.lower() == "true"
    else:
        raise UsageError(f"invalid --invoke value: {value!r}: tty must be true or false")


def parse_build_arg(value: str, environ: dict[str, str] | None = None) -> tuple[str, str]:
    """Parse `--build-arg K=V`; a bare `K` takes its value from the environment, as buildx does."""
    return parse_key_value(value, "--build-arg", environ)


def parse_label(value: str) -> tuple[str, str]:
    """Parse `--label K=V` (unlike build args, a label never reads the environment)."""
    key, sep, val = value.partition("=")
    if not key or not sep:
        raise UsageError(f"invalid --label value: {value!r}: expected KEY=VALUE")
    return key, val


# Values of --build-context that BuildKit resolves itself; anything else is a local directory.
_REMOTE_CONTEXT_PREFIXES = (
    "docker-image://",
    "oci-layout://",
    "target:",
    "git@",
    "http://",
    "https://",
)


def parse_build_context(value: str) -> tuple[str, str]:
    """Parse `--build-context NAME=VALUE`; a local directory becomes an absolute path."""
    name, sep, source = value.partition("=")
    if not name or not sep or not source:
        raise UsageError(
            f"invalid --build-context value: {value!r}: expected NAME=DIR or NAME=docker-image://REF"
        )
    if source.startswith(_REMOTE_CONTEXT_PREFIXES):
        return name, source
    path = os.path.abspath(source)
    if not os.path.isdir(path):
        raise UsageError(
            f"build context directory not found: {path}: check --build-context {value!r}"
        )
    return name, path


def parse_add_host(value: str) -> str:
    """Parse `--add-host HOST:IP` (or `HOST=IP`) and return it as `HOST:IP`."""
    sep = "=" if "=" in value else ":"
    host, _, address = value.partition(sep)
    if not host or not address:
        raise UsageError(f"invalid --add-host value: {value!r}: expected HOST:IP, e.g. db:10.0.0.5")
    return f"{host}:{address}"


def parse_platforms(value: str) -> list[str]:
    """Parse `--platform linux/amd64,linux/arm64` into a list of platforms."""
    platforms = [item.strip() for item in value.split(",") if item.strip()]
    for platform in platforms:
        parts = platform.split("/")
        if len(parts) < 2 or len(parts) > 3 or not all(parts):
            raise UsageError(
                f"invalid --platform value: {platform!r}: expected OS/ARCH[/VARIANT], "
                "e.g. linux/amd64"
            )
    return platforms


def parse_choice(value: str, flag: str, choices: tuple[str, ...]) -> str:
    """Return `value` when it is one of `choices`; else raise UsageError naming them."""
    if value not in choices:
        raise UsageError(f"invalid {flag} value: {value!r}: use one of {', '.join(choices)}")
    return value


def resolve_build_paths(context: str, dockerfile: str | None) -> tuple[str, str | None]:
    """Check the context directory and the Dockerfile; return both as absolute paths.

    `dockerfile` None means CONTEXT/Dockerfile, and `-` (read from stdin) is returned
    as is. A relative Dockerfile path is taken from the current directory, as buildx does.
    """
    context_dir = os.path.abspath(context)
    if not os.path.exists(context_dir):
        raise UsageError(f"build context not found: {context_dir}: give an existing directory")
    if not os.path.isdir(context_dir):
        raise UsageError(
            f"build context is not a directory: {context_dir}: give the directory that "
            "contains the Dockerfile"
        )
    if dockerfile == "-":
        return context_dir, dockerfile
    path = os.path.abspath(dockerfile) if dockerfile else os.path.join(context_dir, "Dockerfile")
    if not os.path.isfile(path):
        raise UsageError(f"Dockerfile not found: {path}: create it or pass -f PATH")
    return context_dir, path


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PATTERN = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(value: str, flag: str) -> float | None:
    """Parse a duration such as `90s`, `10m`, `1h30m` or a bare number of seconds.

    An empty value or `0` means no duration (None). Units follow Go's time.ParseDuration.
    """
    text = value.strip()
    if text in ("", "0"):
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = _sum_duration(text, value, flag)
    if seconds <= 0:
        raise UsageError(f"invalid {flag} value: {value!r}: give a positive duration, e.g. 10m")
    return seconds


def _sum_duration(text: str, value: str, flag: str) -> float:
    parts = _DURATION_PATTERN.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise UsageError(
            f"invalid {flag} value: {value!r}: use a number with a unit s, m or h, e.g. 30s or 10m"
        )
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)

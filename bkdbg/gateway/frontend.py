"""Frontend options and local directories for a Dockerfile build, from `BuildOptions`.

The keys are those of BuildKit's Dockerfile frontend (frontend/dockerui in moby/buildkit),
set the way `docker buildx build` sets them (build/opt.go in docker/buildx).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field

from bkdbg.errors import UsageError
from bkdbg.options import BuildOptions

logger = logging.getLogger(__name__)

FRONTEND = "dockerfile.v0"
CONTEXT_LOCAL = "context"
DOCKERFILE_LOCAL = "dockerfile"
HOST_GATEWAY = "host-gateway"
# image-resolve-mode value that lets FROM use images in a Docker Engine's own image store
# without a registry; buildx sets it for its docker driver
PREFER_LOCAL = "local"
# build contexts given as references rather than local directories; BuildKit resolves them
REMOTE_CONTEXT_PREFIXES = (
    "docker-image://",
    "target:",
    "oci-layout://",
    "https://",
    "http://",
    "git://",
    "git@",
    "ssh://",
)


@dataclass
class FrontendSetup:
    """The request of one Dockerfile build: frontend options, local dirs and entitlements.

    `temp_dir` contains a Dockerfile read from stdin, and `cleanup()` removes it.
    """

    attrs: dict[str, str]
    local_dirs: dict[str, str]
    shared_key: str
    entitlements: list[str] = field(default_factory=list)
    temp_dir: str | None = None

    def cleanup(self) -> None:
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


def shared_key(path: str) -> str:
    """Return a stable key for a local directory, so rebuilds upload only what changed.

    BuildKit keeps the last upload of a local source under this key (with the source name),
    and the key travels in clear text, so it is a digest of the absolute path.
    """
    return hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:32]


def frontend_setup(
    options: BuildOptions, *, docker_engine: bool = False, host_gateway_ip: str | None = None
) -> FrontendSetup:
    """Check the local paths of `options` and derive the frontend request.

    Raises UsageError naming a missing context dir or Dockerfile, or an invalid value.
    """
    context = _check_context(options.context)
    setup = FrontendSetup(
        attrs={}, local_dirs={CONTEXT_LOCAL: context}, shared_key=shared_key(context)
    )
    try:
        _set_dockerfile(setup, options, context)
        _set_build_contexts(setup, options.build_contexts)
    except BaseException:
        setup.cleanup()
        raise
    _set_plain_attrs(setup.attrs, options)
    _set_network(setup, options.network)
    hosts = extra_hosts(options.add_hosts, host_gateway_ip)
    if hosts:
        setup.attrs["add-hosts"] = hosts
    if docker_engine:
        setup.attrs["image-resolve-mode"] = PREFER_LOCAL
    return setup


def _check_context(path: str) -> str:
    context = os.path.abspath(path)
    if not os.path.isdir(context):
        problem = "not a directory" if os.path.exists(context) else "not found"
        raise UsageError(f"build context {problem}: {context}: give an existing directory")
    return context


def _set_dockerfile(setup: FrontendSetup, options: BuildOptions, context: str) -> None:
    """Serve the Dockerfile's directory (or a temp dir for `-f -`) as the dockerfile local."""
    if options.dockerfile_content is not None:
        setup.temp_dir = tempfile.mkdtemp(prefix="bkdbg-dockerfile-")
        with open(os.path.join(setup.temp_dir, "Dockerfile"), "w", encoding="utf-8") as file:
            file.write(options.dockerfile_content)
        setup.local_dirs[DOCKERFILE_LOCAL] = setup.temp_dir
        setup.attrs["filename"] = "Dockerfile"
        return
    path = options.dockerfile or os.path.join(context, "Dockerfile")
    path = os.path.abspath(path)
    if not os.path.isfile(path) and options.dockerfile is None:
        # like buildx, accept a lower-case `dockerfile` when no -f was given
        lower = os.path.join(context, "dockerfile")
        path = lower if os.path.isfile(lower) else path
    if not os.path.isfile(path):
        raise UsageError(f"Dockerfile not found: {path}: create it or pass its path with -f")
    setup.local_dirs[DOCKERFILE_LOCAL] = os.path.dirname(path)
    setup.attrs["filename"] = os.path.basename(path)


def _set_build_contexts(setup: FrontendSetup, contexts: dict[str, str]) -> None:
    """Pass `--build-context NAME=VALUE`: references as they are, directories as locals."""
    for name, value in contexts.items():
        if value.startswith(REMOTE_CONTEXT_PREFIXES):
            setup.attrs[f"context:{name}"] = value
            continue
        path = os.path.abspath(value)
        if not os.path.isdir(path):
            raise UsageError(
                f"build context {name!r} not found: {path}: give a directory or docker-image://REF"
            )
        # buildx renames these two so that they cannot replace the main locals
        local = f"_{name}" if name in (CONTEXT_LOCAL, DOCKERFILE_LOCAL) else name
        setup.local_dirs[local] = path
        setup.attrs[f"context:{name}"] = f"local:{local}"
        setup.attrs[f"sharedkey:localdir:{name}"] = shared_key(path)


def _set_plain_attrs(attrs: dict[str, str], options: BuildOptions) -> None:
    if options.target:
        attrs["target"] = options.target
    for key, value in options.build_args.items():
        attrs[f"build-arg:{key}"] = value
    for key, value in options.labels.items():
        attrs[f"label:{key}"] = value
    if options.platforms:
        attrs["platform"] = ",".join(options.platforms)
    if options.no_cache:
        attrs["no-cache"] = ""  # an empty value means every stage


def _set_network(setup: FrontendSetup, network: str) -> None:
    if network in ("", "default"):
        return
    if network not in ("none", "host"):
        raise UsageError(f"invalid --network value: {network!r}: use default, none or host")
    setup.attrs["force-network-mode"] = network
    if network == "host":
        setup.entitlements.append("network.host")


def extra_hosts(hosts: list[str], host_gateway_ip: str | None = None) -> str:
    """Convert `--add-host HOST:IP` (or `HOST=IP`) values to the frontend's `add-hosts` CSV.

    `host-gateway` becomes `host_gateway_ip`. Raises UsageError for an invalid entry.
    """
    entries: list[str] = []
    for item in hosts:
        host, sep, addresses = item.partition("=")
        if not sep:
            host, sep, addresses = item.partition(":")
        if not sep or not host or not addresses:
            raise UsageError(f"invalid --add-host value: {item!r}: use HOST:IP")
        for address in addresses.split(","):
            entries.append(f"{host}={_host_address(item, address, host_gateway_ip)}")
    return ",".join(entries)


def _host_address(item: str, address: str, host_gateway_ip: str | None) -> str:
    if address == HOST_GATEWAY:
        if not host_gateway_ip:
            raise UsageError(
                f"invalid --add-host value: {item!r}: this BuildKit has no host-gateway "
                "address; give an IP"
            )
        return host_gateway_ip
    if len(address) > 2 and address[0] == "[" and address[-1] == "]":
        address = address[1:-1]
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise UsageError(f"invalid --add-host value: {item!r}: {address!r} is not an IP") from None
    return address

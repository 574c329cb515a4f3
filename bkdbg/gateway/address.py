"""BuildKit addresses: `--addr` and `BUILDKIT_HOST` in buildctl's schemes, and TLS files.

Schemes:

* ``unix:///path`` - a standalone buildkitd on a unix socket.
* ``tcp://host:port`` - a buildkitd on TCP, with TLS when any TLS option is given.
* ``docker://`` - the BuildKit embedded in the Docker Engine at ``DOCKER_HOST`` (default
  ``unix:///var/run/docker.sock``); ``docker://unix:///path`` and ``docker://tcp://host:port``
  name the engine explicitly.
* ``docker-container://NAME[?context=CONTEXT]`` - a buildkitd in a container, reached by
  ``docker exec -i NAME buildctl dial-stdio``.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from bkdbg.errors import UsageError

logger = logging.getLogger(__name__)

SCHEMES = ("unix", "tcp", "docker", "docker-container")

# buildkitd's default address on Linux (moby/buildkit util/appdefaults).
DEFAULT_BUILDKITD_SOCKET = "/run/buildkit/buildkitd.sock"

# The Docker CLI's default engine address on Linux.
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"

_SCHEME_HINT = "use unix:///PATH, tcp://HOST:PORT, docker://[unix:///PATH], docker-container://NAME"


@dataclass(frozen=True)
class Address:
    """A parsed BuildKit address.

    `path` is the socket of buildkitd (``unix``) or of the engine (``docker`` on a unix
    socket); `host` and `port` are buildkitd's (``tcp``) or the engine's (``docker`` on
    TCP); `container` and `docker_context` belong to ``docker-container``. `raw` is the
    text as given.
    """

    scheme: str
    raw: str
    path: str | None = None
    host: str | None = None
    port: int | None = None
    container: str | None = None
    docker_context: str | None = None

    @property
    def text(self) -> str:
        """The address in canonical form, with ``docker://`` resolved to its engine."""
        if self.scheme == "docker":
            return f"docker://{self.engine_url}"
        if self.scheme == "docker-container":
            query = f"?context={self.docker_context}" if self.docker_context else ""
            return f"docker-container://{self.container}{query}"
        return self.engine_url

    @property
    def engine_url(self) -> str:
        """The ``unix://`` or ``tcp://`` part: buildkitd's socket, or the Docker Engine's."""
        if self.path is not None:
            return f"unix://{self.path}"
        return f"tcp://{_host_port(self.host or '', self.port or 0)}"

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class TLSOptions:
    """TLS options for ``tcp://`` addresses.

    The fields are `--tlscacert`, `--tlscert`, `--tlskey` and `--tlsservername`.
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    @property
    def enabled(self) -> bool:
        """True when any TLS option is set, which makes a ``tcp://`` connection use TLS."""
        return any((self.ca, self.cert, self.key, self.server_name))

    def validate(self) -> None:
        """Check that the client certificate and key come together and that every file exists.

        Raises UsageError that names every missing file in one line.
        """
        if bool(self.cert) != bool(self.key):
            raise UsageError(
                "invalid TLS options: --tlscert and --tlskey must be given together: "
                "pass both or neither"
            )
        flags = (("--tlscacert", self.ca), ("--tlscert", self.cert), ("--tlskey", self.key))
        missing = [f"{flag} {path}" for flag, path in flags if path and not os.path.isfile(path)]
        if missing:
            raise UsageError(
                f"TLS file not found: {', '.join(missing)}: check the paths of these options"
            )


def parse_address(text: str, environ: Mapping[str, str] | None = None) -> Address:
    """Parse a BuildKit address in one of buildctl's schemes.

    `environ` supplies ``DOCKER_HOST`` for a bare ``docker://`` (default: os.environ).
    Raises UsageError naming the value and the accepted schemes.
    """
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in SCHEMES:
        raise UsageError(f"unsupported BuildKit address: {text!r}: {_SCHEME_HINT}")
    if scheme == "unix":
        return Address("unix", text, path=_unix_path(text, rest))
    if scheme == "tcp":
        host, port = _tcp_host_port(text, rest)
        return Address("tcp", text, host=host, port=port)
    if scheme == "docker":
        return _parse_docker(text, rest, os.environ if environ is None else environ)
    return _parse_docker_container(text, rest)


def candidate_addresses(
    explicit: str | None,
    environ: Mapping[str, str],
    default_socket: str = DEFAULT_BUILDKITD_SOCKET,
) -> list[str]:
    """Return the addresses to try, in order.

    An explicit address (`--addr`) or ``BUILDKIT_HOST`` is tried alone. Otherwise the
    standalone buildkitd socket comes first when it exists, then the Docker Engine at
    ``DOCKER_HOST``.
    """
    if explicit:
        return [explicit]
    from_env = environ.get("BUILDKIT_HOST", "")
    if from_env:
        return [from_env]
    candidates = []
    if _is_socket(default_socket):
        candidates.append(f"unix://{default_socket}")
    candidates.append("docker://")
    return candidates


def _parse_docker(text: str, rest: str, environ: Mapping[str, str]) -> Address:
    engine = rest or environ.get("DOCKER_HOST", "") or DEFAULT_DOCKER_HOST
    source = "address" if rest else "DOCKER_HOST"
    scheme, sep, engine_rest = engine.partition("://")
    if scheme == "unix" and sep:
        return Address("docker", text, path=_unix_path(engine, engine_rest))
    if scheme == "tcp" and sep:
        _reject_engine_tls(environ)
        host, port = _tcp_host_port(engine, engine_rest)
        return Address("docker", text, host=host, port=port)
    raise UsageError(
        f"unsupported Docker Engine address in {source}: {engine!r}: "
        "use unix:///PATH or tcp://HOST:PORT"
    )


def _reject_engine_tls(environ: Mapping[str, str]) -> None:
    # TODO: TLS to the Docker Engine (DOCKER_TLS_VERIFY, DOCKER_CERT_PATH) is not implemented.
    if environ.get("DOCKER_TLS_VERIFY"):
        raise UsageError(
            "unsupported Docker Engine connection: DOCKER_TLS_VERIFY is set, but bkdbg reaches "
            "the engine only without TLS: use a unix socket, or pass --addr tcp://... to a "
            "buildkitd with --tlscacert, --tlscert and --tlskey"
        )


def _parse_docker_container(text: str, rest: str) -> Address:
    parts = urlsplit(text)
    name = parts.netloc
    if not name or parts.path not in ("", "/"):
        raise UsageError(f"invalid docker-container address: {text!r}: use docker-container://NAME")
    query = parse_qs(parts.query)
    context = query.get("context", [None])[0]
    return Address("docker-container", text, container=name, docker_context=context)


def _unix_path(text: str, rest: str) -> str:
    if not rest.startswith("/") or rest == "/":
        raise UsageError(
            f"invalid unix socket address: {text!r}: use an absolute path, for example "
            f"unix://{DEFAULT_BUILDKITD_SOCKET}"
        )
    return rest


def _tcp_host_port(text: str, rest: str) -> tuple[str, int]:
    try:
        parts = urlsplit(f"tcp://{rest}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None or parts.path not in ("", "/"):
        raise UsageError(f"invalid tcp address: {text!r}: use tcp://HOST:PORT")
    return host, port


def _host_port(host: str, port: int) -> str:
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False

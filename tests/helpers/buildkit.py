"""The local BuildKit that scripts/local-buildkit.sh runs: address, health and build containers.

The engine is Docker Engine 26 with its embedded BuildKit. Its HTTP API and BuildKit's
gRPC (`POST /grpc`, upgraded to h2c) share one unix socket.
"""

import http.client
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

DEFAULT_ADDR = "docker://unix:///run/bkdbg-buildkit/docker.sock"

# The moby BuildKit executor runs runc without --root, so runc keeps the state of build
# containers in its default root. Each container's bundle is a directory under the
# executor dir, <data-root>/buildkit/executor. Seen with Docker Engine 26.1.5 for RUN
# steps and for the gateway container of `docker buildx debug --invoke sh`.
RUNC_ROOT = Path("/run/runc")
EXECUTOR_DIR = Path("/var/lib/bkdbg-buildkit/buildkit/executor")

PING_TIMEOUT = 2.0  # seconds, for one HTTP request to the engine


def socket_path(addr: str) -> str:
    """Return the unix socket path in a `docker://unix://PATH` or `unix://PATH` address.

    Raises ValueError for any other form, since the tests reach only a local engine.
    """
    for prefix in ("docker://unix://", "unix://"):
        if addr.startswith(prefix) and addr[len(prefix) :].startswith("/"):
            return addr[len(prefix) :]
    raise ValueError(
        f"unsupported address {addr!r}: expected docker://unix:///PATH or unix:///PATH"
    )


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP/1.1 connection to a server on a unix socket."""

    def __init__(self, path: str, timeout: float = PING_TIMEOUT) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def engine_get(path: str, request_path: str, timeout: float = PING_TIMEOUT) -> tuple[int, bytes]:
    """Send GET `request_path` to the engine on socket `path` and return the status and body."""
    conn = UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", request_path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def ping_error(addr: str) -> str | None:
    """Return why the engine at `addr` fails GET /_ping, or None if it responds OK."""
    try:
        path = socket_path(addr)
        status, body = engine_get(path, "/_ping")
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    if status != 200 or body.strip() != b"OK":
        return f"GET /_ping returned {status} {body[:80]!r}"
    return None


def docker_argv(addr: str) -> list[str]:
    """Return the start of a docker CLI command line aimed at the engine at `addr`."""
    return ["docker", "-H", f"unix://{socket_path(addr)}"]


RUNC_LIST_TRIES = 5


def runc_list() -> list[dict[str, Any]]:
    """Return `runc list`'s entries for the engine's runc root; needs root.

    Raises RuntimeError if `runc list` fails for a reason other than a container that
    went away while it read the state dir.
    """
    for _ in range(RUNC_LIST_TRIES):
        result = subprocess.run(
            ["runc", "--root", str(RUNC_ROOT), "list", "--format", "json"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        # runc fails when a container goes away while it lists the state dir: list again
        if result.returncode == 0 or "no such file or directory" not in result.stderr:
            break
        time.sleep(0.05)
    if result.returncode != 0:
        raise RuntimeError(f"runc --root {RUNC_ROOT} list failed: {result.stderr.strip()}")
    entries: list[dict[str, Any]] = json.loads(result.stdout) or []  # `null` when none
    return entries


def running_build_containers() -> dict[str, str]:
    """Return {container id: status} for every runc container of the engine's BuildKit.

    This covers RUN steps and gateway containers (LLBBridge.NewContainer) alike.
    """
    return {
        entry["id"]: entry["status"]
        for entry in runc_list()
        if Path(entry["bundle"]).parent == EXECUTOR_DIR
    }


def leaked_containers(
    before: set[str], timeout: float = 5.0, interval: float = 0.1
) -> dict[str, str]:
    """Wait until no build container runs that is not in `before`, for at most `timeout` s.

    Returns {id: status} of the containers still there at the end (empty when none).
    """
    deadline = time.monotonic() + timeout
    while True:
        extra = {
            cid: status for cid, status in running_build_containers().items() if cid not in before
        }
        if not extra or time.monotonic() >= deadline:
            return extra
        time.sleep(interval)

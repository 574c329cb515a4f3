"""Tests for the local BuildKit from scripts/local-buildkit.sh and the helpers that reach it."""

import json
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.helpers import TEST_IMAGE, MakeContext
from tests.helpers.buildkit import (
    docker_argv,
    engine_get,
    running_build_containers,
    socket_path,
)
from tests.helpers.pty import spawn_pty, strip_ansi

BUILD_TIMEOUT = 60  # seconds for one `docker buildx build` of a tiny context


def test_engine_responds_to_ping(buildkit_addr: str) -> None:
    status, body = engine_get(socket_path(buildkit_addr), "/_ping")

    assert status == 200
    assert body == b"OK"


def test_test_image_present(buildkit_addr: str) -> None:
    filters = urllib.parse.quote(json.dumps({"reference": [TEST_IMAGE]}))
    status, body = engine_get(socket_path(buildkit_addr), f"/images/json?filters={filters}")

    assert status == 200
    tags = [tag for image in json.loads(body) for tag in image.get("RepoTags") or []]
    assert TEST_IMAGE in tags


def test_test_image_config(buildkit_addr: str) -> None:
    status, body = engine_get(socket_path(buildkit_addr), f"/images/{TEST_IMAGE}/json")

    assert status == 200
    config = json.loads(body)["Config"]
    assert config["Cmd"] == ["/bin/sh"]
    assert "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in config["Env"]


def _start_build(addr: str, context: Path) -> subprocess.Popen[str]:
    """Start `docker buildx build` of `context` on the engine at `addr`, without cache."""
    return subprocess.Popen(
        [*docker_argv(addr), "buildx", "build", "--progress", "plain", "--no-cache", str(context)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.usefixtures("no_leaked_containers")
def test_build_container_seen_while_running(buildkit_addr: str, make_context: MakeContext) -> None:
    context = make_context(f"FROM {TEST_IMAGE}\nRUN sleep 2 && echo built-ok\n")
    before = set(running_build_containers())

    build = _start_build(buildkit_addr, context)
    try:
        seen: set[str] = set()
        deadline = time.monotonic() + 10
        while not seen and build.poll() is None and time.monotonic() < deadline:
            seen = set(running_build_containers()) - before
            time.sleep(0.1)
        output, _ = build.communicate(timeout=BUILD_TIMEOUT)
    finally:
        if build.poll() is None:
            build.kill()
            build.communicate()

    assert build.returncode == 0, output
    assert "built-ok" in output
    assert seen, "no runc container of the build was seen while `RUN sleep 2` ran"


def test_socket_path_forms() -> None:
    assert socket_path("docker://unix:///run/x.sock") == "/run/x.sock"
    assert socket_path("unix:///run/x.sock") == "/run/x.sock"
    with pytest.raises(ValueError, match="unsupported address"):
        socket_path("tcp://127.0.0.1:2375")
    with pytest.raises(ValueError, match="unsupported address"):
        socket_path("docker://unix://relative.sock")


def test_strip_ansi_removes_escapes() -> None:
    text = "\x1b[1;31mred\x1b[0m \x1b]0;title\x07plain\r\n"

    assert strip_ansi(text) == "red plain\n"


@pytest.mark.pty
def test_pty_size_pinned_and_resized() -> None:
    script = "stty size; read line; stty size"

    with spawn_pty(["sh", "-c", script]) as term:
        term.expect_exact("24 80")
        term.resize(30, 100)
        term.sendline("")
        term.expect_exact("30 100")
        assert term.close() == 0

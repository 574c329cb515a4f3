"""Fixtures shared by all of bkdbg's tests.

- Every test runs with HOME, the XDG base dirs and BKDBG_ROOT in fresh temporary dirs, with
  the address variables in CLEARED_ENV unset and spare servers off (`isolated_env`, autouse).
- `buildkit_addr` is the address of the local BuildKit (scripts/local-buildkit.sh). Tests that
  use it are marked `integration` and are skipped when the engine does not respond, except
  under CI=true, where they fail.
- `no_leaked_containers` fails a test that leaves a build container running.
- `make_context` writes a Dockerfile and files into a fresh directory.
"""

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.buildkit import (
    DEFAULT_ADDR,
    leaked_containers,
    ping_error,
    running_build_containers,
)
from tests.helpers.context import MakeContext, write_context

CLEARED_ENV = (
    "BUILDKIT_HOST",
    "DOCKER_HOST",
    "DOCKER_CONTEXT",
    "BUILDX_BUILDER",
    "BKDBG_ADDR",
)
XDG_DIRS = {
    "XDG_STATE_HOME": ".local/state",
    "XDG_DATA_HOME": ".local/share",
    "XDG_CONFIG_HOME": ".config",
    "XDG_CACHE_HOME": ".cache",
}
LEAK_TIMEOUT = 5.0  # seconds that build containers get to go away after a test


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the real BuildKit, directly or through a fixture."""
    for item in items:
        if "buildkit_addr" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@dataclass(frozen=True)
class IsolatedDirs:
    """The temporary locations that `isolated_env` points the environment at."""

    home: Path
    runtime_dir: Path
    bkdbg_root: Path


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[IsolatedDirs]:
    """Point HOME, the XDG dirs and BKDBG_ROOT at fresh dirs and unset CLEARED_ENV."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name, relative in XDG_DIRS.items():
        monkeypatch.setenv(name, str(home / relative))
    for name in CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)
    # a spare server outlives the command that started it: tests/test_spare.py turns it on
    monkeypatch.setenv("BKDBG_SPARE_SERVER", "off")

    # sockets live under these two, and AF_UNIX paths are limited to 107 bytes, so they
    # sit in a short dir under /tmp rather than under tmp_path
    short_dir = Path(tempfile.mkdtemp(prefix="bk", dir="/tmp"))
    runtime_dir = short_dir / "run"
    bkdbg_root = short_dir / "root"
    runtime_dir.mkdir(mode=0o700)
    bkdbg_root.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime_dir))
    monkeypatch.setenv("BKDBG_ROOT", str(bkdbg_root))
    try:
        yield IsolatedDirs(home=home, runtime_dir=runtime_dir, bkdbg_root=bkdbg_root)
    finally:
        shutil.rmtree(short_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def buildkit_addr() -> str:
    """Return the address of the local BuildKit from BKDBG_TEST_ADDR, after checking it responds."""
    addr = os.environ.get("BKDBG_TEST_ADDR") or DEFAULT_ADDR
    error = ping_error(addr)
    if error is None:
        return addr
    reason = f"BuildKit at {addr} does not respond ({error})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: start it with scripts/local-buildkit.sh start", pytrace=False)
    pytest.skip(f"{reason}: run scripts/local-buildkit.sh start")


@pytest.fixture
def no_leaked_containers(buildkit_addr: str) -> Iterator[None]:
    """Fail the test if a build container it started still runs 5 s after it ends.

    NOTE: a container counts as the test's when it was not running before the test, so a
    build from another process on the same engine during the test counts as a leak.
    """
    before = set(running_build_containers())
    yield
    leaked = leaked_containers(before, timeout=LEAK_TIMEOUT)
    if leaked:
        listing = ", ".join(f"{cid} ({status})" for cid, status in sorted(leaked.items()))
        pytest.fail(f"build containers still running {LEAK_TIMEOUT}s after the test: {listing}")


@pytest.fixture
def make_context(tmp_path: Path) -> MakeContext:
    """Return make_context(dockerfile, files=None, *, dockerfile_name="Dockerfile") -> dir.

    Each call writes a new context dir under tmp_path (see tests.helpers.write_context).
    """
    count = 0

    def make(
        dockerfile: str,
        files: Mapping[str, str | bytes] | None = None,
        *,
        dockerfile_name: str = "Dockerfile",
    ) -> Path:
        nonlocal count
        count += 1
        return write_context(
            tmp_path / f"context{count}", dockerfile, files, dockerfile_name=dockerfile_name
        )

    return make

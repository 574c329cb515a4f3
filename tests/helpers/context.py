"""Build contexts for tests: a Dockerfile and files in a fresh directory."""

from collections.abc import Callable, Mapping
from pathlib import Path

# Created by scripts/local-buildkit.sh start with `docker import`: busybox-static and its
# applet links in /bin, root and nobody users, CMD ["/bin/sh"]. It exists only in the
# local engine's image store, so builds that use it need no registry.
TEST_IMAGE = "bkdbg-test/busybox:latest"

# the type of the `make_context` fixture: (dockerfile, files=None, *, dockerfile_name) -> dir
MakeContext = Callable[..., Path]


def write_context(
    directory: Path,
    dockerfile: str,
    files: Mapping[str, str | bytes] | None = None,
    *,
    dockerfile_name: str = "Dockerfile",
) -> Path:
    """Write a build context into a new directory and return that directory.

    `files` maps context-relative paths (parents are created) to text or bytes.
    Raises FileExistsError if `directory` already exists, so contexts never mix.
    """
    directory.mkdir(parents=True)
    (directory / dockerfile_name).write_text(dockerfile)
    for name, content in (files or {}).items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return directory

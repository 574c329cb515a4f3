"""The root directory of bkdbg's servers: --root, else $BKDBG_ROOT, else platformdirs' default.

Apart from instances.py, and with nothing beyond the standard library imported at the
top, because `bkdbg build` resolves its root first thing to claim a spare server (see
early.py). platformdirs is imported only without --root and BKDBG_ROOT.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Mapping
from pathlib import Path

APP_NAME = "bkdbg"
ROOT_ENV = "BKDBG_ROOT"


def resolve_root(explicit: str | os.PathLike[str] | None = None,
                 environ: Mapping[str, str] | None = None) -> Path:
    """Return the root directory: `explicit` (--root), else $BKDBG_ROOT, else the default."""
    env = os.environ if environ is None else environ
    if explicit:
        return Path(explicit).expanduser().absolute()
    if env.get(ROOT_ENV):
        return Path(env[ROOT_ENV]).expanduser().absolute()
    return default_root()


def default_root() -> Path:
    """Return platformdirs' user runtime dir when it is usable, else the user data dir."""
    import platformdirs

    runtime = _usable_runtime_dir()
    if runtime is not None:
        return runtime
    return Path(platformdirs.user_data_dir(APP_NAME))


def _usable_runtime_dir() -> Path | None:
    import platformdirs

    # platformdirs warns and falls back to a temp dir when XDG_RUNTIME_DIR is missing or
    # unsafe. So a base dir counts only when it already exists, is ours and is writable.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            path = Path(platformdirs.user_runtime_dir(APP_NAME))
        except OSError:
            return None
    base = path.parent
    try:
        info = base.stat()
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        return None
    return path if os.access(base, os.W_OK | os.X_OK) else None

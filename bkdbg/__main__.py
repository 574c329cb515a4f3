"""Entry point for ``python -m bkdbg``."""

import sys

# The detached server is started as `python -m bkdbg __server ...` and a client waits for
# it, so it skips importing the CLI and the terminal side (about 150 ms of imports).
if sys.argv[1:2] == ["__server"]:
    from bkdbg.daemon.main import serve_main

    sys.exit(serve_main(sys.argv[2:]))

from bkdbg.cli import main  # noqa: E402

sys.exit(main())

"""Entry point for ``python -m bkdbg``."""

import sys

# A launching client waits for the detached server (`python -m bkdbg __server ...`), so the
# server skips importing the CLI and the terminal side: about 40 ms less on the 2-CPU
# machine of docs/benchmarks.md.
if sys.argv[1:2] == ["__server"]:
    from bkdbg.daemon.main import serve_main

    sys.exit(serve_main(sys.argv[2:]))
if sys.argv[1:2] == ["__spare"]:
    from bkdbg.daemon.spareserver import spare_main

    sys.exit(spare_main(sys.argv[2:]))

from bkdbg.cli import main  # noqa: E402

sys.exit(main())

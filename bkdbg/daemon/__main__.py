"""`python -m bkdbg.daemon` runs a server like the hidden `bkdbg __server` command."""

import sys

from bkdbg.daemon.main import serve_main

sys.exit(serve_main())

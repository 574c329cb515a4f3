"""Entry point for ``python -m bkdbg``."""

import sys

from bkdbg.cli import main

sys.exit(main())

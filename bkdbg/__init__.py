"""bkdbg: an interactive debugger for BuildKit builds."""

__version__ = "0.1.0"

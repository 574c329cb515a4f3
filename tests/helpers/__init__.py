"""Helpers shared by bkdbg's tests: build contexts, the local engine, and pty sessions."""

from tests.helpers.context import TEST_IMAGE, MakeContext, write_context

__all__ = ["TEST_IMAGE", "MakeContext", "write_context"]

"""Tune glibc's malloc for bkdbg's large, short-lived buffers.

Container output reaches the server in 32 KiB messages, and the attach socket carries it
in frames of up to 1 MiB (a joined payload, its protobuf message and the serialized
frame). By default glibc gives large allocations (from 128 KiB, a threshold it adjusts)
their own mmap, or trims the heap top once they are freed. So each such buffer cost page
faults and zeroing again. Measured with `cat` of 256 MiB to a pipe, the server's two
busiest threads used 0.60 CPU s per 200 MiB before, and 0.33 s with these settings. The
client used 0.3 s before, and 0.2 s after.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 4 * 1024 * 1024  # bytes: larger allocations still get their own mmap
TRIM_THRESHOLD = 8 * 1024 * 1024  # bytes of free heap top kept instead of returned at once


def tune_malloc() -> None:
    """Make glibc serve allocations up to MMAP_THRESHOLD from its heap (no-op elsewhere)."""
    try:
        import ctypes

        # the symbols already loaded into this process, libc's among them
        mallopt = ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError) as exc:
        # not glibc (musl, macOS), or Python without ctypes: the defaults only cost speed
        logger.debug("malloc not tuned: %s", exc)
        return
    for option, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        if not mallopt(option, value):
            logger.debug("malloc not tuned: mallopt(%d, %d) failed", option, value)

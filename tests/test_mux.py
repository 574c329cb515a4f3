"""The Ctrl-a escape parser between the terminal and the container process."""

import pytest

from bkdbg.shell.mux import Escape, KeyMux

A = b"\x01"  # Ctrl-a

# (chunks fed in order, bytes expected for the process, escape expected, bytes left after it)
CASES = [
    ("plain bytes", [b"ls -l\r"], b"ls -l\r", None, b""),
    ("ctrl-a c", [A + b"c"], b"", Escape.MONITOR, b""),
    ("ctrl-a d", [A + b"d"], b"", Escape.DETACH, b""),
    ("ctrl-a ctrl-a", [A + A], A, None, b""),
    ("ctrl-a then other key", [A + b"x"], A + b"x", None, b""),
    ("ctrl-a then capital C", [A + b"C"], A + b"C", None, b""),
    ("bytes before escape", [b"echo hi" + A + b"c"], b"echo hi", Escape.MONITOR, b""),
    ("bytes after escape kept", [A + b"dls\r"], b"", Escape.DETACH, b"ls\r"),
    ("escape split across reads", [b"ab" + A, b"c"], b"ab", Escape.MONITOR, b""),
    ("literal ctrl-a split", [A, A, b"c"], A + b"c", None, b""),
    ("ctrl-c is a byte", [b"\x03"], b"\x03", None, b""),
    ("ctrl-z and ctrl-backslash", [b"\x1a\x1c"], b"\x1a\x1c", None, b""),
    ("binary bytes", [bytes(range(2, 256))], bytes(range(2, 256)), None, b""),
    ("c without prefix", [b"cd /"], b"cd /", None, b""),
]


@pytest.mark.parametrize(
    ("chunks", "expected_data", "expected_escape", "expected_rest"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_keymux_table(chunks, expected_data, expected_escape, expected_rest):
    mux = KeyMux()
    data = b""
    escape = None
    rest = b""
    for chunk in chunks:
        result = mux.feed(chunk)
        data += result.data
        if result.escape is not None:
            escape, rest = result.escape, result.rest
            break
    assert data == expected_data
    assert escape is expected_escape
    assert rest == expected_rest


def test_keymux_pending_prefix_flushed():
    mux = KeyMux()
    assert mux.feed(b"a" + A).data == b"a"
    assert mux.pending
    assert mux.flush() == A
    assert not mux.pending
    assert mux.flush() == b""


def test_keymux_state_resets_after_escape():
    mux = KeyMux()
    assert mux.feed(A + b"c").escape is Escape.MONITOR
    result = mux.feed(b"c")
    assert result.data == b"c"
    assert result.escape is None

"""The shell scripts that a `DebugContainer` runs, and the markers they print.

Each user process runs wrapped in `/bin/sh -c WRAPPER` (or LEAD, for a first process that
is the container's init). The wrapper reports the command's pid and status as APC escape
sequences (ESC _ ... ESC \\) carrying a per-process nonce, which `MarkerStripper` removes
from the output stream. The helpers run as plain execs that always exit 0.
"""

from __future__ import annotations

from collections.abc import Callable

MARKER_START = b"\x1b_bkdbg-"
MARKER_END = b"\x1b\\"
MAX_MARKER = 80  # bytes from MARKER_START to the end of MARKER_END; longer is not a marker
MARKER_KINDS = ("pid", "exit", "notfound")

# The keeper writes one line so that a keeper that could not start (no /bin/sh) can be
# distinguished from one that runs, then blocks in `read` until release ends it.
# It runs under a tty because BuildKit v0.13 reports the Exit of a process without a tty
# only after stdin EOF, so a keeper that runc could not start would go unnoticed.
KEEPER = "echo ready; read -r _"

# $1 nonce, $2 marker fd, $3 working directory, then the user's command. The wrapper runs
# the command in the foreground through `sh -c 'report pid; exec "$@"'`, because a
# background child would start with SIGINT and SIGQUIT ignored (POSIX for async lists, and
# busybox ash does so). Since sh runs traps only after a foreground child ends, signals go
# to the reported pid from a separate exec. The traps only keep the wrapper alive when the
# terminal signals its whole process group.
_RUN_COMMAND = r"""n=$1 fd=$2 cwd=${3:-/}
shift 3
fmt='\033_bkdbg-%s;%s;%s\033\\'
inner='printf "$1" pid "$2" "$$" >&"$3"; shift 3; exec "$@"'
trap : HUP INT QUIT TERM TSTP TTIN TTOU WINCH USR1 USR2 PIPE ALRM
found() {
  case $1 in */*) [ -f "$1" ] && [ -x "$1" ]; return ;; esac
  (
    IFS=:
    set -f
    for dir in $PATH; do
      [ -f "${dir:-.}/$1" ] && [ -x "${dir:-.}/$1" ] && exit 0
    done
    exit 1
  )
}
if ! cd -- "$cwd" 2>/dev/null; then
  printf 'bkdbg: cannot change to working directory %s\n' "$cwd" >&2
  printf "$fmt" exit "$n" 1 >&"$fd"
elif found "$1"; then
  /bin/sh -c "$inner" sh "$fmt" "$n" "$fd" "$@"
  printf "$fmt" exit "$n" "$?" >&"$fd"
else
  printf "$fmt" notfound "$n" 127 >&"$fd"
fi
"""
WRAPPER = _RUN_COMMAND + "exit 0\n"

# The first process as init: once the command has ended, hold the container open. Not
# with `read` on the tty: after the command, the shell may no longer be in the terminal's
# foreground process group (a killed interactive shell cannot hand it back), and such a
# read fails at once, forever. So `sleep` where the image has one, else `read`. The loop
# ends once the tty is hung up: when the engine dies, no release comes, and runc's
# container would otherwise outlive it (seen when Docker Engine 26.1.5 was stopped).
LEAD = _RUN_COMMAND + r"""if command -v sleep >/dev/null 2>&1; then
  while [ -t 0 ] && sleep 2; do :; done
fi
while read -r _; do :; done
"""

# $1 signal number, $2 pid; `kill` fails when the process just ended, which is fine
SIGNAL_HELPER = 'kill -"$1" "$2" 2>/dev/null; exit 0'

# $1 USER[:GROUP]; prints ok, user or group. BuildKit fails an exec whose named user or
# group is missing from /etc/passwd or /etc/group, and that failure would end the
# container. So this helper, which always exits 0, checks named ones first.
USER_CHECK = r"""has() {
  case $2 in ''|*[!0-9]*) ;; *) return 0 ;; esac
  while IFS=: read -r name _; do [ "$name" = "$2" ] && return 0; done < "$1"
  return 1
}
user=${1%%:*}
group=
case $1 in *:*) group=${1#*:} ;; esac
if ! has /etc/passwd "$user" 2>/dev/null; then echo user
elif [ -n "$group" ] && ! has /etc/group "$group" 2>/dev/null; then echo group
else echo ok
fi
"""


# ---------------------------------------------------------------- markers


class MarkerStripper:
    """Remove this process's markers from an output stream and report them.

    Holds back at most MAX_MARKER bytes at the end of a chunk, and only while they may
    be the start of a marker. A marker with another nonce is ordinary output.
    """

    def __init__(self, nonce: str, on_marker: Callable[[str, int], None]) -> None:
        self._nonce = nonce.encode()
        self._on_marker = on_marker
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        """Return the part of `data` (after any held-back bytes) that is plain output."""
        if self._pending:
            data, self._pending = self._pending + data, b""
        pieces: list[bytes] = []
        pos = 0
        while True:
            start = data.find(MARKER_START, pos)
            if start < 0:
                keep = _partial_start(data, pos)
                pieces.append(data[pos:keep])
                self._pending = data[keep:]
                break
            end = data.find(MARKER_END, start + len(MARKER_START), start + MAX_MARKER)
            if end < 0 and len(data) - start < MAX_MARKER:
                pieces.append(data[pos:start])  # the marker may complete in the next chunk
                self._pending = data[start:]
                break
            if end >= 0 and self._accept(data[start + len(MARKER_START) : end]):
                pieces.append(data[pos:start])
                pos = end + len(MARKER_END)
            else:
                pieces.append(data[pos : start + 1])
                pos = start + 1
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def flush(self) -> bytes:
        """Return the held-back bytes, at the end of the stream."""
        rest, self._pending = self._pending, b""
        return rest

    def _accept(self, body: bytes) -> bool:
        parts = body.split(b";")
        if len(parts) != 3 or parts[1] != self._nonce or not parts[2].isdigit():
            return False
        kind = parts[0].decode("ascii", "replace")
        if kind not in MARKER_KINDS:
            return False
        self._on_marker(kind, int(parts[2]))
        return True


def _partial_start(data: bytes, pos: int) -> int:
    """Return where a proper prefix of MARKER_START ends `data`, or len(data)."""
    for size in range(min(len(MARKER_START) - 1, len(data) - pos), 0, -1):
        if data.endswith(MARKER_START[:size]):
            return len(data) - size
    return len(data)

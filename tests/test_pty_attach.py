"""Attaching a terminal to a process, in process, on a real pty pair and a fake stream.

`attach` runs in the main thread (it installs signal handlers); a helper thread plays
the user on the pty's master side and the server on the fake stream.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from bkdbg.daemon.messages import Closed, Exited, Output, ProcessInfo, TakenOver
from bkdbg.errors import ServerUnreachable
from bkdbg.shell import session
from bkdbg.shell.attach import AttachEnd, LocalIO, attach
from bkdbg.shell.workspace import Current, Workspace
from tests.helpers.fake_client import FakeClient, FakeStream

pytestmark = pytest.mark.pty

WAIT = 5.0


@dataclass
class Pty:
    master: int
    slave: int

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def read_until(self, text: bytes, timeout: float = WAIT) -> bytes:
        data = b""
        deadline = time.monotonic() + timeout
        while text not in data:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out waiting for {text!r}; got {data!r}"
            if select.select([self.master], [], [], remaining)[0]:
                data += os.read(self.master, 4096)
        return data

    def set_size(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


@pytest.fixture
def pty_pair() -> Iterator[Pty]:
    master, slave = os.openpty()
    pair = Pty(master, slave)
    pair.set_size(24, 80)
    yield pair
    os.close(master)
    os.close(slave)


@pytest.fixture
def terminal(pty_pair: Pty) -> LocalIO:
    return LocalIO(stdin=pty_pair.slave, stdout=pty_pair.slave, stderr=pty_pair.slave)


def in_background(action: Callable[[], object]) -> threading.Thread:
    """Run the user's and the server's side in a thread while the test attaches.

    If the action fails, every stream is closed, so that the attach returns and the test
    fails on its asserts instead of hanging.
    """

    def run() -> None:
        try:
            action()
        except BaseException:
            for stream in _open_streams:
                stream.close()
            raise

    thread = threading.Thread(target=run, name="test-user", daemon=True)
    thread.start()
    return thread


_open_streams: list[FakeStream] = []


def wait_for(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def stream_of(client: FakeClient) -> FakeStream:
    wait_for(lambda: bool(client.streams))
    _open_streams.append(client.streams[-1])
    return client.streams[-1]


def raw_mode_on(pty_pair: Pty) -> bool:
    return not termios.tcgetattr(pty_pair.slave)[3] & termios.ICANON


def attached_raw(client: FakeClient, pty_pair: Pty) -> FakeStream:
    """Wait until the terminal is attached in raw mode; return the stream."""
    stream = stream_of(client)
    wait_for(lambda: raw_mode_on(pty_pair))
    return stream


def handler_installed(signum: int) -> bool:
    return signal.getsignal(signum) not in (
        signal.default_int_handler,
        signal.SIG_DFL,
        signal.SIG_IGN,
    )


@pytest.fixture
def client() -> FakeClient:
    fake = FakeClient()
    fake.outputs["p1"] = []  # nothing until the test pushes it
    return fake


# ---------------------------------------------------------------- tty processes


def test_keys_reach_process_and_monitor_escape(client, terminal, pty_pair):
    before = termios.tcgetattr(pty_pair.slave)

    def user() -> None:
        stream = stream_of(client)
        stream.push(Output(1, b"$ "))
        pty_pair.read_until(b"$ ")
        pty_pair.write(b"sleep 9\r\x03\x1a\x1c")
        wait_for(lambda: stream.stdin.endswith(b"\x1c"))
        pty_pair.write(b"\x01c")

    helper = in_background(user)
    outcome = attach(client, "p1", terminal)
    helper.join(WAIT)

    assert outcome.end is AttachEnd.MONITOR
    assert client.streams[-1].stdin == b"sleep 9\r\x03\x1a\x1c"
    assert termios.tcgetattr(pty_pair.slave) == before
    assert client.streams[-1].closed.is_set()


def test_raw_mode_while_attached(client, terminal, pty_pair):
    seen: list[list] = []

    def user() -> None:
        stream = attached_raw(client, pty_pair)
        seen.append(termios.tcgetattr(pty_pair.slave))
        stream.push(Exited(3))

    helper = in_background(user)
    outcome = attach(client, "p1", terminal)
    helper.join(WAIT)

    lflag = seen[0][3]
    assert not lflag & termios.ECHO
    assert not lflag & termios.ICANON
    assert not lflag & termios.ISIG
    assert outcome.end is AttachEnd.EXITED
    assert outcome.code == 3
    assert outcome.args == ["sh"]


def test_output_written_byte_for_byte(client, terminal, pty_pair):
    payload = bytes(range(32, 127)) * 4
    received: list[bytes] = []

    def server() -> None:
        stream = stream_of(client)
        stream.push(Output(1, payload))
        stream.push(Output(2, b"<err>"))
        received.append(pty_pair.read_until(b"<err>"))
        stream.push(Exited(0))

    helper = in_background(server)
    attach(client, "p1", terminal)
    helper.join(WAIT)
    assert received[0] == payload + b"<err>"


def test_window_size_sent_at_start_and_on_sigwinch(client, terminal, pty_pair):
    def user() -> None:
        stream = attached_raw(client, pty_pair)
        wait_for(lambda: handler_installed(signal.SIGWINCH))
        pty_pair.set_size(40, 120)
        os.kill(os.getpid(), signal.SIGWINCH)
        wait_for(lambda: stream.resizes == [(40, 120)])
        stream.push(Exited(0))

    helper = in_background(user)
    attach(client, "p1", terminal)
    helper.join(WAIT)
    assert ("attach", "p1", 24, 80, True) in client.calls
    assert client.streams[-1].resizes == [(40, 120)]


def test_detach_escape(client, terminal, pty_pair):
    helper = in_background(lambda: (attached_raw(client, pty_pair), pty_pair.write(b"ls\x01d")))
    outcome = attach(client, "p1", terminal)
    helper.join(WAIT)
    assert outcome.end is AttachEnd.DETACH
    assert client.streams[-1].stdin == b"ls"


def test_taken_over(client, terminal):
    helper = in_background(lambda: stream_of(client).push(TakenOver("c2")))
    outcome = attach(client, "p1", terminal)
    helper.join(WAIT)
    assert outcome.end is AttachEnd.TAKEN_OVER


def test_server_lost_restores_terminal(client, terminal, pty_pair):
    before = termios.tcgetattr(pty_pair.slave)
    lost = ServerUnreachable("bkdbg server 0a1b2c3d is not running or not answering")
    helper = in_background(lambda: stream_of(client).push(lost))
    started = time.monotonic()
    outcome = attach(client, "p1", terminal)
    helper.join(WAIT)
    assert outcome.end is AttachEnd.LOST
    assert outcome.message == "bkdbg server 0a1b2c3d is not running or not answering"
    assert time.monotonic() - started < 2.0
    assert termios.tcgetattr(pty_pair.slave) == before


def test_sigterm_restores_terminal(client, terminal, pty_pair):
    before = termios.tcgetattr(pty_pair.slave)

    def killer() -> None:
        attached_raw(client, pty_pair)
        wait_for(lambda: handler_installed(signal.SIGTERM))
        os.kill(os.getpid(), signal.SIGTERM)

    helper = in_background(killer)
    with pytest.raises(SystemExit) as info:
        attach(client, "p1", terminal)
    helper.join(WAIT)
    assert info.value.code == 128 + signal.SIGTERM
    assert termios.tcgetattr(pty_pair.slave) == before


# ---------------------------------------------------------------- no tty


def test_process_without_tty_keeps_cooked_mode(client, terminal, pty_pair):
    client.processes = [ProcessInfo("p1", ["cat"], "running", tty=False, current=True)]
    before = termios.tcgetattr(pty_pair.slave)
    seen: list[list] = []

    def user() -> None:
        stream = stream_of(client)
        wait_for(lambda: handler_installed(signal.SIGINT))
        seen.append(termios.tcgetattr(pty_pair.slave))
        os.kill(os.getpid(), signal.SIGINT)
        wait_for(lambda: stream.signals == ["INT"])
        pty_pair.write(b"line\n")
        wait_for(lambda: stream.stdin == b"line\n")
        pty_pair.write(b"\x04")  # Ctrl-D at the start of a line: EOF
        wait_for(lambda: stream.stdin_closed)
        stream.push(Exited(130))

    helper = in_background(user)
    outcome = attach(client, "p1", terminal)
    helper.join(WAIT)
    assert seen[0] == before
    assert outcome.code == 130


def test_pipes_forward_stdin_until_eof(client):
    client.processes = [ProcessInfo("p1", ["cat"], "running", tty=False, current=True)]
    stdin_read, stdin_write = os.pipe()
    out_read, out_write = os.pipe()
    os.write(stdin_write, b"\x01c is data here\n")
    os.close(stdin_write)

    def server() -> None:
        stream = stream_of(client)
        wait_for(lambda: stream.stdin_closed)
        stream.push(Output(1, stream.stdin))
        stream.push(Exited(4))

    helper = in_background(server)
    outcome = attach(client, "p1", LocalIO(stdin=stdin_read, stdout=out_write, stderr=out_write))
    helper.join(WAIT)
    os.close(out_write)
    assert os.read(out_read, 1024) == b"\x01c is data here\n"
    assert outcome.code == 4
    os.close(stdin_read)
    os.close(out_read)


# ---------------------------------------------------------------- what the user is told


@pytest.fixture
def ws(client, terminal, tmp_path) -> Workspace:
    workspace = Workspace(root=tmp_path, local=terminal)
    workspace.current = Current(client, process_id="p1")  # type: ignore[arg-type]
    return workspace


@pytest.mark.parametrize(
    ("message", "status", "line"),
    [
        (
            Exited(3),
            None,
            "Process p1 (sh) exited with status 3; type reload, rollback, exec or exit",
        ),
        (
            TakenOver("c2"),
            None,
            "another client took over this session; you are at the monitor prompt: "
            "attach takes it back",
        ),
        (
            Closed("the server is shutting down"),
            1,
            "server 0a1b2c3d closed this client's connection: the server is shutting down",
        ),
        (
            Closed("disconnected by client c2"),
            0,
            "disconnected by another bkdbg client (bkdbg disconnect); bkdbg attach 0a1b2c3d "
            "reattaches",
        ),
        (
            ServerUnreachable("bkdbg server 0a1b2c3d is not running"),
            1,
            "bkdbg: error: bkdbg server 0a1b2c3d is not running",
        ),
    ],
    ids=["exited", "taken-over", "closed", "disconnected", "lost"],
)
def test_enter_reports(ws, client, capsys, message, status, line):
    helper = in_background(lambda: stream_of(client).push(message))
    assert session.enter(ws, "p1") == status
    helper.join(WAIT)
    lines = capsys.readouterr().err.splitlines()
    # on a terminal every end but an exit first moves to a fresh line
    assert lines == ([line] if isinstance(message, Exited) else ["", line])


def test_enter_reports_exit_reason(ws, client, capsys):
    reason = "command not found in the image: nosuchcmd"
    helper = in_background(lambda: stream_of(client).push(Exited(127, reason)))
    assert session.enter(ws, "p1") is None
    helper.join(WAIT)
    assert capsys.readouterr().err.splitlines() == [
        f"process p1: {reason}",
        "Process p1 (sh) exited with status 127; type reload, rollback, exec or exit",
    ]


def test_enter_follows_replaced_process(ws, client, capsys):
    client.processes.append(ProcessInfo("p2", ["sh"], "running", tty=True))
    client.outputs["p2"] = []

    def server() -> None:
        stream_of(client).push(Exited(0, "reloaded", replaced_by="p2"))
        wait_for(lambda: len(client.streams) == 2)
        client.streams[-1].push(Exited(5))

    helper = in_background(server)
    assert session.enter(ws, "p1") is None
    helper.join(WAIT)
    assert ws.current.process_id == "p2"
    assert (
        capsys.readouterr().err.splitlines()[-1].startswith("Process p2 (sh) exited with status 5")
    )


def test_detach_tells_how_to_return(ws, client, pty_pair, capsys):
    helper = in_background(lambda: (attached_raw(client, pty_pair), pty_pair.write(b"\x01d")))
    assert session.enter(ws, "p1") == 0
    helper.join(WAIT)
    assert capsys.readouterr().err.splitlines() == [
        "",
        "detached from server 0a1b2c3d; it keeps running: bkdbg attach 0a1b2c3d",
    ]
    assert ("goodbye", False) in client.calls

"""Containers and processes: signal names, frame rendering, and the real BuildKit."""

import threading
import time
from collections.abc import Iterator

import pytest

from bkdbg.buildkit_proto import gateway_pb2, ops_pb2
from bkdbg.errors import ContainerError
from bkdbg.gateway.build import GatewayBuild
from bkdbg.gateway.connection import connect
from bkdbg.gateway.container import (
    SIGNALS,
    Container,
    ProcessConfig,
    describe_frame,
    exit_status,
    signal_name,
)
from bkdbg.options import BuildOptions
from tests.helpers.context import TEST_IMAGE

WAIT = 20.0  # seconds for any one process in these tests

# ---------------------------------------------------------------- unit


@pytest.mark.parametrize(
    ("given", "wire"),
    [("INT", "INT"), ("SIGINT", "INT"), ("sigterm", "TERM"), (" KILL ", "KILL"),
     ("SIGRTMIN+3", "RTMIN+3"), ("RTMAX", "RTMAX"), ("cld", "CLD")],
)  # fmt: skip
def test_signal_name_accepts(given, wire):
    assert signal_name(given) == wire


@pytest.mark.parametrize("given", ["", "SIG", "FOO", "SIGFOO", "9", "RTMIN+16", "RTMAX-15"])
def test_signal_name_rejects_unknown(given):
    with pytest.raises(ValueError, match="unknown signal"):
        signal_name(given)


def test_signal_numbers_are_linux():
    assert (SIGNALS["INT"], SIGNALS["KILL"], SIGNALS["TERM"], SIGNALS["WINCH"]) == (2, 9, 15, 28)
    assert (SIGNALS["RTMIN"], SIGNALS["RTMIN+15"], SIGNALS["RTMAX-14"]) == (34, 49, 50)
    assert SIGNALS["RTMAX"] == 64


@pytest.mark.parametrize(("code", "status"), [(0, 0), (3, 3), (137, 137), (255, 255),
                                              (256, 255), (4294967295, 255)])  # fmt: skip
def test_exit_status(code, status):
    assert exit_status(code) == status


def frame(**fields):
    return gateway_pb2.ExecMessage(ProcessID="c:p", **fields)


@pytest.mark.parametrize(
    ("msg", "line"),
    [
        (frame(Init=gateway_pb2.InitMessage(Meta=ops_pb2.Meta(args=["sh", "-c", "x"]),
                                            Fds=[0, 1], Tty=True)),
         "Init pid=c:p argc=3 fds=[0, 1] tty=True"),
        (frame(File=gateway_pb2.FdMessage(Fd=1, Data=b"secret")), "File pid=c:p fd=1 6 bytes"),
        (frame(File=gateway_pb2.FdMessage(Fd=0, EOF=True)), "File pid=c:p fd=0 EOF"),
        (frame(Resize=gateway_pb2.ResizeMessage(Rows=40, Cols=100)),
         "Resize pid=c:p rows=40 cols=100"),
        (frame(Signal=gateway_pb2.SignalMessage(Name="INT")), "Signal pid=c:p signal=INT"),
        (frame(Exit=gateway_pb2.ExitMessage(Code=3)), "Exit pid=c:p code=3 error=''"),
        (frame(Started=gateway_pb2.StartedMessage()), "Started pid=c:p"),
        (frame(Done=gateway_pb2.DoneMessage()), "Done pid=c:p"),
    ],
)  # fmt: skip
def test_describe_frame(msg, line):
    assert describe_frame(msg) == line


def test_describe_frame_hides_payload():
    msg = frame(File=gateway_pb2.FdMessage(Fd=0, Data=b"hunter2"))
    assert "hunter2" not in describe_frame(msg)


# ---------------------------------------------------------------- integration


class Output:
    """A sink that collects output per fd and notes each fd's EOF."""

    def __init__(self) -> None:
        self.data: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        self.eof: set[int] = set()
        self.changed = threading.Condition()

    def __call__(self, fd: int, data: bytes) -> None:
        with self.changed:
            if data:
                self.data.setdefault(fd, bytearray()).extend(data)
            else:
                self.eof.add(fd)
            self.changed.notify_all()

    def text(self, fd: int = 1) -> str:
        return self.data[fd].decode(errors="replace")

    def wait_for(self, text: str, fd: int = 1, timeout: float = WAIT) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: text in self.text(fd), timeout):
                pytest.fail(f"no {text!r} on fd {fd} within {timeout} s; got {self.text(fd)!r}")


@pytest.fixture
def image_build(buildkit_addr, make_context, no_leaked_containers) -> Iterator[GatewayBuild]:
    """A solved build of the busybox test image plus a file, open until the test ends."""
    context = make_context(f"FROM {TEST_IMAGE}\nCOPY hello /hello\n", {"hello": "hello world\n"})
    conn = connect(buildkit_addr)
    build = GatewayBuild(conn, BuildOptions(context=str(context)), lambda events: None)
    try:
        build.solve()
        yield build
    finally:
        build.close()
        conn.close()


@pytest.fixture
def container(image_build) -> Iterator[Container]:
    assert image_build.result is not None
    root = ops_pb2.Mount(dest="/", mountType=ops_pb2.BIND, resultID=image_build.result.ref_id)
    created = Container.create(image_build, [root])
    try:
        yield created
    finally:
        created.release()


def test_shell_reads_stdin_until_eof(container):
    out = Output()
    process = container.start(ProcessConfig(args=["/bin/sh"], env=[]), out)
    process.write(b"cat /etc/passwd /hello\n")
    process.close_stdin()
    assert process.wait(WAIT) == 0
    assert "root:x:0:0" in out.text()
    assert "hello world" in out.text()
    assert out.eof == {1, 2}


def test_exit_status_and_stderr(container):
    out = Output()
    config = ProcessConfig(args=["/bin/sh", "-c", "echo oops >&2; exit 3"], env=[])
    process = container.start(config, out)
    process.close_stdin()
    assert process.wait(WAIT) == 3
    assert out.text(2) == "oops\n"
    assert out.text(1) == ""


def test_send_after_exit_names_pid(container):
    process = container.start(ProcessConfig(args=["/bin/true"], env=[], fds=(1, 2)), Output())
    assert process.wait(WAIT) == 0
    with pytest.raises(ContainerError, match=process.id):
        process.signal("TERM")
    with pytest.raises(ContainerError, match=process.id):
        process.write(b"x")


def test_tty_resize_shows_in_stty(container):
    out = Output()
    config = ProcessConfig(args=["/bin/sh"], env=["PS1=$ "], tty=True, rows=40, cols=100)
    process = container.start(config, out)
    process.write(b"stty size\n")
    out.wait_for("40 100")
    process.resize(50, 132)
    process.write(b"stty size\n")
    out.wait_for("50 132")
    process.write(b"exit 0\n")
    assert process.wait(WAIT) == 0
    assert out.text(2) == ""  # a tty merges stderr into fd 1


def test_signal_reaches_trap(container):
    out = Output()
    script = "trap 'echo trapped; exit 42' INT; echo ready; while :; do sleep 1; done"
    process = container.start(ProcessConfig(args=["/bin/sh", "-c", script], env=[]), out)
    out.wait_for("ready")
    process.signal("SIGINT")
    process.close_stdin()
    assert process.wait(WAIT) == 42
    assert "trapped" in out.text()


def test_unknown_signal_keeps_process(container):
    out = Output()
    process = container.start(ProcessConfig(args=["/bin/cat"], env=[]), out)
    with pytest.raises(ValueError, match="FOO"):
        process.signal("FOO")
    process.write(b"still here\n")
    out.wait_for("still here")
    process.close_stdin()
    assert process.wait(WAIT) == 0


@pytest.mark.parametrize("tty", [False, True])
def test_kill_init_gives_137(container, tty):
    process = container.start(ProcessConfig(args=["/bin/sleep", "30"], env=[], tty=tty), Output())
    process.signal("KILL")
    process.close_stdin()
    assert process.wait(WAIT) == 137


@pytest.mark.parametrize("tty", [False, True])
def test_kill_exec_gives_137(container, tty):
    container.start(ProcessConfig(args=["/bin/sleep", "60"], env=[], fds=()), Output())
    process = container.start(ProcessConfig(args=["/bin/sleep", "30"], env=[], tty=tty), Output())
    process.signal("KILL")
    process.close_stdin()
    assert process.wait(WAIT) == 137


def test_release_ends_running_process(container):
    process = container.start(ProcessConfig(args=["/bin/sleep", "30"], env=[]), Output())
    start = time.monotonic()
    container.release()
    container.release()  # a second release does nothing
    assert process.done.wait(WAIT)
    assert time.monotonic() - start < 10
    with pytest.raises(ContainerError, match="released"):
        container.start(ProcessConfig(args=["/bin/true"], env=[]), Output())


def test_start_on_released_container_fails(image_build):
    assert image_build.result is not None
    root = ops_pb2.Mount(dest="/", mountType=ops_pb2.BIND, resultID=image_build.result.ref_id)
    created = Container.create(image_build, [root])
    created.release()
    with pytest.raises(ContainerError, match=created.id):
        created.start(ProcessConfig(args=["/bin/true"], env=[]), Output())


def test_create_with_bad_ref_fails(image_build):
    root = ops_pb2.Mount(dest="/", mountType=ops_pb2.BIND, resultID="no-such-ref")
    with pytest.raises(ContainerError, match="could not create container"):
        Container.create(image_build, [root])

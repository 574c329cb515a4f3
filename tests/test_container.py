"""Containers and processes: signal names, frame rendering, and the real BuildKit."""

import threading
import time
from collections.abc import Iterator

import grpc
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


class FakeCall:
    """An ExecProcess call that plays `frames` after reading the Init, recording requests."""

    def __init__(self, requests, frames, hold=False):
        self.sent = []
        self.cancelled = threading.Event()
        self._requests = requests
        self._frames = frames
        self._hold = hold

    def __iter__(self):
        self.sent.append(next(self._requests))  # the Init
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        for msg in self._frames:
            if callable(msg):
                msg = msg(self)
            yield msg
        if self._hold:
            self.cancelled.wait(WAIT)

    def _read(self):
        for msg in self._requests:
            self.sent.append(msg)

    def cancel(self):
        self.cancelled.set()


class FakeBridge:
    """A BridgeOwner whose ExecProcess streams play prepared frames."""

    call_metadata = (("buildkit-controlapi-buildid", "fake"),)

    def __init__(self, frames, hold=False):
        self.bridge = self
        self.frames = frames
        self.hold = hold
        self.calls = []

    def ExecProcess(self, requests, metadata):  # noqa: N802 - the gRPC method name
        call = FakeCall(requests, self.frames, self.hold)
        self.calls.append(call)
        return call

    def NewContainer(self, request, metadata):  # noqa: N802 - the gRPC method name
        return None

    def ReleaseContainer(self, request, metadata, timeout):  # noqa: N802 - the gRPC method name
        return None


class ForgottenBuildBridge(FakeBridge):
    """A bridge whose BuildKit has dropped the build (after a restart, say)."""

    def NewContainer(self, request, metadata):  # noqa: N802 - the gRPC method name
        raise grpc.RpcError("forwarding NewContainer: no such job abc123")


def test_create_for_forgotten_build_says_reload():
    with pytest.raises(ContainerError) as info:
        Container.create(ForgottenBuildBridge([]), [])

    assert str(info.value) == (
        "could not create container: BuildKit no longer has this build (forwarding "
        "NewContainer: no such job abc123): type reload to build again"
    )


def pid_of(call):
    return call.sent[0].ProcessID


def started(call):
    return gateway_pb2.ExecMessage(ProcessID=pid_of(call), Started=gateway_pb2.StartedMessage())


def output(fd, data=b"", eof=False):
    def make(call):
        file = gateway_pb2.FdMessage(Fd=fd, Data=data, EOF=eof)
        return gateway_pb2.ExecMessage(ProcessID=pid_of(call), File=file)

    return make


def exited(code, error=""):
    def make(call):
        exit_msg = gateway_pb2.ExitMessage(Code=code)
        if error:
            exit_msg.Error.message = error
        return gateway_pb2.ExecMessage(ProcessID=pid_of(call), Exit=exit_msg)

    return make


def done(call):
    return gateway_pb2.ExecMessage(ProcessID=pid_of(call), Done=gateway_pb2.DoneMessage())


def fake_start(frames, hold=False, timeout=WAIT, **config):
    bridge = FakeBridge(frames, hold)
    sink = Output()
    process = Container(bridge, "c1").start(
        ProcessConfig(args=["sh"], **config), sink, timeout=timeout
    )
    return process, sink, bridge.calls[0]


def test_fake_process_runs_to_done():
    frames = [started, output(1, b"hi"), exited(3, "exit code: 3"), output(1, eof=True),
              output(2, eof=True), done]  # fmt: skip
    process, sink, call = fake_start(frames)
    assert process.wait(WAIT) == 3
    assert process.exit_error == "exit code: 3"
    assert sink.text() == "hi"
    assert sink.eof == {1, 2}
    call.reader.join(WAIT)  # the stream's requests end after Done
    eofs = [m for m in call.sent if m.WhichOneof("Input") == "File" and m.File.EOF]
    assert len(eofs) == 1  # stdin EOF sent once, after Exit
    assert eofs[0].File.Fd == 0


def test_fake_init_frame():
    process, sink, call = fake_start([started, exited(0), done], tty=True, rows=24, cols=80,
                                     user="app", cwd="/w", env=["A=1"])  # fmt: skip
    assert process.wait(WAIT) == 0
    call.reader.join(WAIT)
    init = call.sent[0].Init
    assert init.ContainerID == "c1"
    assert list(init.Meta.args) == ["sh"]
    assert (init.Meta.user, init.Meta.cwd, list(init.Meta.env)) == ("app", "/w", ["A=1"])
    assert (list(init.Fds), init.Tty) == ([0, 1, 2], True)
    resize = [m.Resize for m in call.sent if m.WhichOneof("Input") == "Resize"]
    assert [(r.Rows, r.Cols) for r in resize] == [(24, 80)]


def test_fake_no_stdin_no_eof():
    process, sink, call = fake_start([started, exited(0), done], fds=(1, 2))
    assert process.wait(WAIT) == 0
    call.reader.join(WAIT)
    assert not [m for m in call.sent if m.WhichOneof("Input") == "File"]
    with pytest.raises(ContainerError, match="has ended"):
        process.write(b"x")


def test_fake_exit_before_started():
    with pytest.raises(ContainerError, match="could not start.*exited with code 1"):
        fake_start([exited(1, "exit code: 1"), done])


def test_fake_protocol_error_names_frame():
    with pytest.raises(ContainerError, match="protocol error: File frame before Started"):
        fake_start([output(1, b"early")])


def test_fake_started_timeout():
    with pytest.raises(ContainerError, match="no Started within 0.2 s"):
        fake_start([], hold=True, timeout=0.2)


def test_fake_stream_end_without_exit():
    process, sink, call = fake_start([started, output(1, b"partial")])
    with pytest.raises(ContainerError, match="process lost.*without Exit"):
        process.wait(WAIT)
    assert sink.text() == "partial"


def test_fake_foreign_frames_dropped():
    foreign = gateway_pb2.ExecMessage(
        ProcessID="other", File=gateway_pb2.FdMessage(Fd=1, Data=b"x")
    )
    process, sink, call = fake_start([started, foreign, output(1, b"mine"), exited(0), done])
    assert process.wait(WAIT) == 0
    assert sink.text() == "mine"


def test_fake_killed_init_reports_signal():
    frames = [started, lambda call: time.sleep(0.2) or exited(255, "runc did not terminate "
              "successfully: exit status -1")(call), done]  # fmt: skip
    process, sink, call = fake_start(frames)
    process.signal("SIGKILL")
    assert process.wait(WAIT) == 137


def test_fake_wait_timeout():
    process, sink, call = fake_start([started], hold=True)
    with pytest.raises(TimeoutError, match=process.id):
        process.wait(0.1)
    process.abandon()
    assert call.cancelled.is_set()


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

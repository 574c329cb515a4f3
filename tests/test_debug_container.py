"""Debug containers: the marker stripper, and keeper-backed containers on the real BuildKit."""

import time
from collections.abc import Iterator

import pytest

from bkdbg.errors import BuildFailed, ContainerError
from bkdbg.gateway.build import GatewayBuild
from bkdbg.gateway.connection import connect
from bkdbg.gateway.container import ProcessConfig
from bkdbg.gateway.debug_container import DebugContainer
from bkdbg.gateway.invoke import process_config
from bkdbg.gateway.wrapper import MARKER_END, MARKER_START, MAX_MARKER, MarkerStripper
from bkdbg.options import BuildOptions, parse_invoke
from tests.helpers.context import TEST_IMAGE
from tests.test_container import WAIT, Output

NONCE = "0123456789abcdef"

# ---------------------------------------------------------------- unit


def marker(kind: str, value: int, nonce: str = NONCE) -> bytes:
    return MARKER_START + f"{kind};{nonce};{value}".encode() + MARKER_END


def strip(chunks: list[bytes]) -> tuple[bytes, list[tuple[str, int]]]:
    found: list[tuple[str, int]] = []
    stripper = MarkerStripper(NONCE, lambda kind, value: found.append((kind, value)))
    out = b"".join(stripper.feed(chunk) for chunk in chunks) + stripper.flush()
    return out, found


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


STREAM = b"before\n" + marker("pid", 42) + b"middle\x1b[0m\n" + marker("exit", 3) + b"after"


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 9, 16, len(STREAM)])
def test_stripper_any_chunk_size(size):
    out, found = strip(split_every(STREAM, size))
    assert out == b"before\nmiddle\x1b[0m\nafter"
    assert found == [("pid", 42), ("exit", 3)]


@pytest.mark.parametrize("cut", range(1, len(marker("exit", 127))))
def test_stripper_marker_split_at_every_byte(cut):
    data = b"x" + marker("notfound", 127) + b"y"
    out, found = strip([data[: cut + 1], data[cut + 1 :]])
    assert out == b"xy"
    assert found == [("notfound", 127)]


@pytest.mark.parametrize(
    "data",
    [
        marker("exit", 3, nonce="fedcba9876543210"),  # another process's marker
        MARKER_START + b"exit;" + NONCE.encode() + b";x" + MARKER_END,  # no digits
        MARKER_START + b"boom;" + NONCE.encode() + b";1" + MARKER_END,  # unknown kind
        MARKER_START + b"exit;" + NONCE.encode() + MARKER_END,  # missing field
        MARKER_START + b"exit;" + NONCE.encode() + b";1",  # never terminated
        b"\x1b_bkdbg",  # a prefix at the very end
        b"\x1b\x1b_\x1b_b",
        MARKER_START + b"x" * MAX_MARKER + MARKER_END,  # too long to be a marker
    ],
)
def test_stripper_passes_non_markers(data):
    for size in (1, 3, len(data)):
        out, found = strip(split_every(data, size))
        assert out == data
        assert found == []


def test_stripper_holds_back_only_possible_marker():
    stripper = MarkerStripper(NONCE, lambda kind, value: None)
    assert stripper.feed(b"abc\x1b") == b"abc"
    assert stripper.feed(b"[0m") == b"\x1b[0m"
    assert stripper.feed(b"plain") == b"plain"
    assert stripper.flush() == b""


def test_stripper_marker_after_foreign_prefix():
    data = b"\x1b_bkdbg-" + marker("exit", 0)
    out, found = strip([data])
    assert out == b"\x1b_bkdbg-"
    assert found == [("exit", 0)]


def test_stripper_large_chunk_is_not_copied():
    stripper = MarkerStripper(NONCE, lambda kind, value: None)
    chunk = b"z" * 65536
    assert stripper.feed(chunk) is chunk


# ---------------------------------------------------------------- integration


def open_build(addr: str, context) -> tuple[GatewayBuild, object]:
    conn = connect(addr)
    return GatewayBuild(conn, BuildOptions(context=str(context)), lambda events: None), conn


@pytest.fixture
def result_build(buildkit_addr, make_context, no_leaked_containers) -> Iterator[GatewayBuild]:
    context = make_context(f"FROM {TEST_IMAGE}\nCOPY hello /hello\n", {"hello": "hello world\n"})
    build, conn = open_build(buildkit_addr, context)
    try:
        build.solve()
        yield build
    finally:
        build.close()
        conn.close()


FAILING = f"""FROM {TEST_IMAGE}
WORKDIR /work
ENV FOO=bar
RUN echo early > /early
RUN --mount=type=cache,target=/cache,id=bkdbg-test-{{tag}} \\
    echo cached > /cache/marker && echo partial > /partial && exit 7
"""


@pytest.fixture
def failed_build(buildkit_addr, make_context, no_leaked_containers, request):
    context = make_context(FAILING.replace("{tag}", request.node.name[-12:].strip("[]")))
    build, conn = open_build(buildkit_addr, context)
    try:
        with pytest.raises(BuildFailed) as failure:
            build.solve()
        assert build.failed_exec is not None
        yield build, failure.value.step
    finally:
        build.close()
        conn.close()


def run(debug: DebugContainer, args: list[str], **kwargs) -> tuple[int, Output]:
    out = Output()
    process = debug.run(ProcessConfig(args=args, env=kwargs.pop("env", []), **kwargs), out)
    process.close_stdin()
    return process.wait(WAIT), out


def test_failing_exec_keeps_shell(result_build):
    with DebugContainer(result_build, "result") as debug:
        assert debug.wrapped
        shell_out = Output()
        shell = debug.run(ProcessConfig(args=["/bin/sh"], env=["PS1=$ "], tty=True), shell_out)
        shell.write(b"echo kept > /kept; echo written\n")
        shell_out.wait_for("written")

        status, out = run(debug, ["sh", "-c", "echo out; echo err >&2; exit 5"])
        assert status == 5
        assert (out.text(1), out.text(2)) == ("out\n", "err\n")

        shell.write(b"cat /kept /hello\n")
        shell_out.wait_for("hello world")
        assert "kept" in shell_out.text()
        shell.write(b"exit 4\n")
        assert shell.wait(WAIT) == 4
        assert "bkdbg-" not in shell_out.text()  # markers are stripped
        assert debug.alive


def test_exec_sees_shell_files_after_failure(result_build):
    with DebugContainer(result_build, "result") as debug:
        assert run(debug, ["sh", "-c", "echo one > /one; exit 9"])[0] == 9
        status, out = run(debug, ["cat", "/one"])
        assert status == 0
        assert out.text() == "one\n"


def test_missing_command(result_build):
    with DebugContainer(result_build, "result") as debug:
        out = Output()
        process = debug.run(ProcessConfig(args=["no-such-cmd", "x"], env=[]), out)
        process.close_stdin()
        assert process.wait(WAIT) == 127
        assert process.command_not_found
        assert run(debug, ["true"])[0] == 0  # the container is still there


def test_command_exit_127_is_not_missing(result_build):
    with DebugContainer(result_build, "result") as debug:
        out = Output()
        process = debug.run(ProcessConfig(args=["sh", "-c", "exit 127"], env=[]), out)
        process.close_stdin()
        assert process.wait(WAIT) == 127
        assert not process.command_not_found


def test_signal_int_to_sleep_under_trap(result_build):
    with DebugContainer(result_build, "result") as debug:
        out = Output()
        script = "trap 'echo trapped; kill $!; exit 42' INT; echo ready; sleep 30 & wait $!"
        process = debug.run(ProcessConfig(args=["sh", "-c", script], env=[]), out)
        out.wait_for("ready")
        process.signal("INT")
        assert process.wait(WAIT) == 42
        assert "trapped" in out.text()


def test_signal_kill_child_keeps_container(result_build):
    with DebugContainer(result_build, "result") as debug:
        out = Output()
        process = debug.run(ProcessConfig(args=["sleep", "30"], env=[]), out)
        process.signal("SIGKILL")
        assert process.wait(WAIT) == 137
        assert run(debug, ["true"])[0] == 0


def test_tty_ctrl_c_interrupts_sleep_only(result_build):
    with DebugContainer(result_build, "result") as debug:
        out = Output()
        shell = debug.run(ProcessConfig(args=["/bin/sh"], env=["PS1=$ "], tty=True), out)
        # a Ctrl-C typed before the shell set up its terminal would end the shell itself
        out.wait_for("$ ")
        shell.write(b"echo started; sleep 30; echo after-sleep\n")
        out.wait_for("started\r\n")  # the output, not the echo of the line
        time.sleep(0.3)  # until the shell has given the terminal to sleep
        shell.write(b"\x03")  # the terminal's Ctrl-C
        shell.write(b"echo alive\n")
        out.wait_for("alive\r\n")
        shell.write(b"exit 0\n")
        assert shell.wait(WAIT) == 0


def test_tty_resize(result_build):
    with DebugContainer(result_build, "result") as debug:
        out = Output()
        config = ProcessConfig(args=["/bin/sh"], env=["PS1=$ "], tty=True, rows=30, cols=90)
        shell = debug.run(config, out)
        shell.write(b"stty size\n")
        out.wait_for("30 90")
        shell.resize(45, 140)
        shell.write(b"stty size\n")
        out.wait_for("45 140")
        shell.write(b"exit\n")
        assert shell.wait(WAIT) == 0


def test_cwd_user_env(result_build):
    with DebugContainer(result_build, "result") as debug:
        status, out = run(debug, ["sh", "-c", 'pwd; id -un; echo "$A"'], cwd="/tmp",
                          user="nobody", env=["A=b c"])  # fmt: skip
        assert status == 0
        assert out.text() == "/tmp\nnobody\nb c\n"


def test_bad_user_and_cwd_keep_container(result_build):
    with DebugContainer(result_build, "result") as debug:
        with pytest.raises(ContainerError, match="user not found.*nosuchuser"):
            debug.run(ProcessConfig(args=["id"], env=[], user="nosuchuser"), Output())
        with pytest.raises(ContainerError, match="group not found"):
            debug.run(ProcessConfig(args=["id"], env=[], user="nobody:nosuchgroup"), Output())
        status, out = run(debug, ["pwd"], cwd="/no/such/dir")
        assert status == 1
        assert "/no/such/dir" in out.text(2)
        assert run(debug, ["id", "-u"], user="65534:65534")[0] == 0


def test_write_after_exit_raises(result_build):
    with DebugContainer(result_build, "result") as debug:
        out = Output()
        process = debug.run(ProcessConfig(args=["true"], env=[]), out)
        process.close_stdin()
        assert process.wait(WAIT) == 0
        with pytest.raises(ContainerError, match="has ended"):
            process.write(b"x")


def test_no_shell_falls_back_to_init(buildkit_addr, make_context, no_leaked_containers):
    dockerfile = f'FROM {TEST_IMAGE}\nRUN ["/bin/busybox", "rm", "/bin/sh"]\n'
    build, conn = open_build(buildkit_addr, make_context(dockerfile))
    try:
        build.solve()
        with DebugContainer(build, "result") as debug:
            out = Output()
            config = ProcessConfig(args=["/bin/busybox", "ls", "/bin/sh"], env=[], tty=True)
            process = debug.run(config, out)
            assert not debug.wrapped
            assert process.wait(WAIT) == 1
            assert "No such file" in out.text()
            assert not debug.alive  # the first process was the init
            with pytest.raises(ContainerError, match="container has ended"):
                debug.run(config, Output())
    finally:
        build.close()
        conn.close()


def test_failed_state_sees_partial_cwd_env(failed_build):
    build, step = failed_build
    assert step.exit_code == 7
    config = process_config(parse_invoke("sh -c 'pwd; echo $FOO; cat /partial /early'"),
                            None, step, tty=False)  # fmt: skip
    with DebugContainer(build, "failed") as debug:
        out = Output()
        process = debug.run(config, out)
        process.close_stdin()
        assert process.wait(WAIT) == 0
        assert out.text() == "/work\nbar\npartial\nearly\n"


def test_failed_init_state_has_no_partial(failed_build):
    build, step = failed_build
    with DebugContainer(build, "failed-init") as debug:
        status, out = run(debug, ["sh", "-c", "cat /early; test -e /partial"])
        assert out.text() == "early\n"
        assert status == 1
        # a cache mount is shared, not a snapshot, so it keeps what the command wrote
        status, out = run(debug, ["cat", "/cache/marker"])
        assert status == 0
        assert out.text() == "cached\n"


def test_failed_state_sees_cache_mount(failed_build):
    build, step = failed_build
    with DebugContainer(build, "failed") as debug:
        status, out = run(debug, ["cat", "/cache/marker"])
        assert status == 0
        assert out.text() == "cached\n"


def test_failed_state_without_failure(result_build):
    with pytest.raises(ContainerError, match="no failed step"):
        DebugContainer(result_build, "failed")


def test_unknown_state(result_build):
    with pytest.raises(ValueError, match="unknown container state"):
        DebugContainer(result_build, "later")

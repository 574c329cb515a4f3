"""Benchmark the interactive container: `bkdbg build --invoke` against `docker buildx debug`.

Three figures per tool, on cached builds of two busybox images, a small one (2 MB) and a
large one that also contains a 256 MiB file:

1. prompt time: from starting the command on a pty to busybox's `/ # ` prompt, per image;
2. keystroke echo: one character written to the pty until the shell's echo of it is read
   back, many times per session;
3. throughput: `cat` of the 256 MiB file with stdout to a pipe. bkdbg runs it with
   `--invoke 'cat FILE'`, no terminal at all. `docker buildx debug` 0.13 panics unless one
   of its standard streams is a terminal, so its stdin is a pty and its stdout the pipe,
   with `tty=false` for the container process.

The reference is `BUILDX_EXPERIMENTAL=1 docker buildx debug --on always --invoke sh build
--output type=cacheonly CTX`: cacheonly keeps buildx's docker driver from exporting the
image to the engine's image store, which bkdbg does not do either without `-o` or `-t`.
Each session is ended through the shell and the monitor (`exit`, then `exit` at the
`(bkdbg) ` or `(buildx) ` prompt), and the benchmark checks that no bkdbg server remains.
bkdbg runs as installed, so after the warm-up each of its sessions claims the spare server
that the previous one started. `--spare off` measures cold starts instead.

    .venv/bin/python bench/invoke.py [--rounds N] [--keystrokes N] [--tool bkdbg|buildx]
        [--spare on|off]
"""

from __future__ import annotations

import math
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pexpect
from common import (
    BASE_IMAGE,
    MB,
    BkdbgRoot,
    Engine,
    cache_records,
    compile_bkdbg,
    describe,
    load_text,
    machine_summary,
    make_parser,
    median,
    prune_records,
    ratio_text,
    require_engine,
    run_checked,
    selected_tools,
    settle,
    warn_if_busy,
)

DESCRIPTION = "Time bkdbg build --invoke against docker buildx debug: prompt, echo, throughput."
DEFAULT_ROUNDS = 5
DEFAULT_KEYSTROKES = 100
BIG_FILE = "/bkdbg-bench-big"  # a path no other build uses, so cleanup finds our records
BIG_SIZE = 256 * 1024 * 1024
SMALL_FILE = "/bkdbg-bench-small"
# zeros, so that the data can be counted apart from buildx's launch messages on the same
# stdout, which are text without NUL bytes
DOCKERFILES = {
    "small": f"FROM {BASE_IMAGE}\nRUN echo bkdbg-bench > {SMALL_FILE}\n",
    "large": f"FROM {BASE_IMAGE}\nRUN head -c {BIG_SIZE} /dev/zero > {BIG_FILE}\n",
}
SHELL_PROMPT = b"/ # "
# without the trailing space: bkdbg's prompt_toolkit prompt moves the cursor after "(bkdbg)"
MONITOR_PROMPTS = {"bkdbg": b"(bkdbg)", "buildx": b"(buildx)"}
# busybox's line editor and prompt_toolkit send a cursor position request, and a terminal
# replies with a report. Without the reply, prompt_toolkit waits and then prints a warning.
CURSOR_POSITION_REQUEST = b"\x1b[6n"
CURSOR_POSITION_REPORT = b"\x1b[1;1R"
EXPECT_TIMEOUT = 60.0  # seconds for a prompt to appear; the first build may take a while
ECHO_TIMEOUT = 5.0  # seconds for one keystroke's echo
CAT_TIMEOUT = 120.0  # seconds for a `cat` command to deliver the whole file
SETTLE = 0.002  # seconds of quiet output before the next keystroke is sent
KEYS_PER_LINE = 40  # keystrokes before the line is cleared with Ctrl-U, so it never wraps
READ_SIZE = 1 << 20
TERMINAL_SIZE = (24, 80)
CTRL_U = b"\x15"
CTRL_A_C = b"\x01c"  # buildx's and bkdbg's key for the monitor


@dataclass
class ToolResults:
    """Everything measured for one tool."""

    prompt_seconds: dict[str, list[float]] = field(
        default_factory=lambda: {image: [] for image in DOCKERFILES}
    )
    echo_seconds: list[float] = field(default_factory=list)
    stream_rates: list[float] = field(default_factory=list)  # bytes per second
    command_seconds: list[float] = field(default_factory=list)  # from start to the last byte
    failures: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- command lines


def interactive_argv(tool: str, root: BkdbgRoot, context: Path) -> list[str]:
    """Return the command that builds `context` and opens `sh` in the result."""
    if tool == "bkdbg":
        return root.argv("build", "--invoke", "sh", str(context))
    return [
        "docker",
        "buildx",
        "debug",
        "--on",
        "always",
        "--invoke",
        "sh",
        "build",
        "--output",
        "type=cacheonly",
        str(context),
    ]


def bkdbg_cat_argv(root: BkdbgRoot, context: Path) -> list[str]:
    return root.argv("build", "--progress", "quiet", "--invoke", f"cat {BIG_FILE}", str(context))


def buildx_cat_argv(context: Path) -> list[str]:
    return [
        "docker",
        "buildx",
        "debug",
        "--on",
        "always",
        "--invoke",
        f"entrypoint=cat,args={BIG_FILE},tty=false",
        "build",
        "--progress",
        "quiet",
        "--output",
        "type=cacheonly",
        str(context),
    ]


def tool_env(tool: str, root: BkdbgRoot, engine: Engine) -> dict[str, str]:
    env = root.env() if tool == "bkdbg" else engine.docker_env(experimental=True)
    env.update(TERM="xterm", LINES=str(TERMINAL_SIZE[0]), COLUMNS=str(TERMINAL_SIZE[1]))
    return env


# ---------------------------------------------------------------- interactive session


def spawn(argv: list[str], env: dict[str, str]) -> pexpect.spawn[bytes]:
    child: pexpect.spawn[bytes] = pexpect.spawn(
        argv[0],
        argv[1:],
        env=env,
        dimensions=TERMINAL_SIZE,
        timeout=EXPECT_TIMEOUT,
        encoding=None,
    )
    child.delaybeforesend = None  # pexpect sleeps 50 ms before each send by default
    return child


def expect(child: pexpect.spawn[bytes], text: bytes | type[pexpect.EOF], what: str) -> None:
    """Wait for `text`, replying to cursor position requests meanwhile as a terminal does.

    Raises RuntimeError with the output tail when `text` does not come.
    """
    try:
        while child.expect_exact([text, CURSOR_POSITION_REQUEST]) == 1:
            child.send(CURSOR_POSITION_REPORT)
    except (pexpect.TIMEOUT, pexpect.EOF) as exc:
        tail = (child.before or b"")[-600:].decode(errors="replace")
        raise RuntimeError(
            f"{what}: {text!r} not seen ({type(exc).__name__}); output ended with: {tail!r}"
        ) from None


def drain(fd: int, quiet: float = SETTLE) -> None:
    """Read and drop output until none arrives for `quiet` seconds."""
    while select.select([fd], [], [], quiet)[0]:
        try:
            if not os.read(fd, READ_SIZE):
                return
        except OSError:
            return


def echo_round_trip(fd: int) -> float:
    """Send one `x` to the pty and return the seconds until its echo is read back."""
    started = time.perf_counter()
    os.write(fd, b"x")
    deadline = started + ECHO_TIMEOUT
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise RuntimeError(f"no echo within {ECHO_TIMEOUT} s")
        if b"x" in os.read(fd, READ_SIZE):
            return time.perf_counter() - started


def echo_round_trips(child: pexpect.spawn[bytes], count: int) -> list[float]:
    """Measure `count` keystroke echoes at the shell prompt, clearing the line as it fills."""
    fd = child.child_fd
    samples = []
    drain(fd)
    for index in range(count):
        samples.append(echo_round_trip(fd))
        drain(fd)
        if index % KEYS_PER_LINE == KEYS_PER_LINE - 1:
            os.write(fd, CTRL_U)
            drain(fd, quiet=0.05)
    os.write(fd, CTRL_U)
    drain(fd, quiet=0.05)
    return samples


def end_session(tool: str, child: pexpect.spawn[bytes]) -> int:
    """Leave the shell and the monitor with `exit`, and return the command's exit status."""
    child.send(b"exit\r")
    expect(child, MONITOR_PROMPTS[tool], f"{tool}: monitor after the shell exited")
    child.send(b"exit\r")
    expect(child, pexpect.EOF, f"{tool}: end of the command after `exit` at the monitor")
    child.close()
    return child.exitstatus if child.exitstatus is not None else 128 + (child.signalstatus or 0)


def interactive_round(
    tool: str, root: BkdbgRoot, engine: Engine, context: Path, keystrokes: int
) -> tuple[float, list[float]]:
    """Run one session: returns the seconds to the prompt and the echo round trips."""
    started = time.perf_counter()
    child = spawn(interactive_argv(tool, root, context), tool_env(tool, root, engine))
    try:
        expect(child, SHELL_PROMPT, f"{tool}: shell prompt")
        prompt_seconds = time.perf_counter() - started
        echoes = echo_round_trips(child, keystrokes)
        status = end_session(tool, child)
    finally:
        if child.isalive():
            child.terminate(force=True)
    if status != 0:
        raise RuntimeError(f"{tool}: the session ended with status {status}, expected 0")
    return prompt_seconds, echoes


# ---------------------------------------------------------------- throughput


@dataclass
class StreamClock:
    """A counter of the file's bytes on stdout, with the times the first and last arrived."""

    expected: int
    data_bytes: int = 0
    first: float | None = None
    last: float | None = None

    def feed(self, chunk: bytes) -> None:
        # the file is all zeros, and launch messages on the same stream contain no NUL byte
        zeros = chunk.count(0)
        if not zeros:
            return
        now = time.perf_counter()
        self.first = self.first if self.first is not None else now
        self.last = now
        self.data_bytes += zeros

    @property
    def complete(self) -> bool:
        return self.data_bytes >= self.expected

    def seconds_since(self, started: float) -> float:
        """Return the seconds from `started` (a perf_counter value) to the last data chunk."""
        return self.last - started if self.last is not None else math.nan

    def rate(self) -> float:
        """Bytes per second from the first to the last data chunk."""
        if self.first is None or self.last is None or self.last <= self.first:
            return float("nan")
        return self.data_bytes / (self.last - self.first)


def read_until_eof(
    fd: int, clock: StreamClock, deadline: float, on_chunk: Callable[[bytes], None] | None = None
) -> bool:
    """Feed what arrives on `fd` to `clock` until EOF; returns False if `deadline` came first.

    `deadline` is a time.perf_counter() value. `on_chunk`, if given, gets every chunk too.
    """
    while select.select([fd], [], [], max(0.0, deadline - time.perf_counter()))[0]:
        chunk = os.read(fd, READ_SIZE)
        if not chunk:
            return True
        clock.feed(chunk)
        if on_chunk is not None:
            on_chunk(chunk)
    return False


def bkdbg_cat(root: BkdbgRoot, context: Path) -> tuple[float, float]:
    """Run bkdbg's `cat` with no terminal; returns (bytes per second, seconds to the last byte)."""
    clock = StreamClock(BIG_SIZE)
    # a file, not a pipe, so that stderr never blocks bkdbg while stdout is being read
    with tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(
            bkdbg_cat_argv(root, context),
            env=root.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        assert process.stdout is not None
        with process.stdout:
            if not read_until_eof(process.stdout.fileno(), clock, started + CAT_TIMEOUT):
                process.kill()
        status = process.wait(timeout=EXPECT_TIMEOUT)
        stderr.seek(0)
        errors = stderr.read().decode(errors="replace")[-600:].strip()
    if status != 0 or not clock.complete:
        raise RuntimeError(
            f"bkdbg cat: exit status {status}, {clock.data_bytes / MB:.1f} of "
            f"{BIG_SIZE / MB:.1f} MB arrived, at {clock.rate() / MB:.0f} MB/s; "
            f"stderr: {errors or '(empty)'}"
        )
    return clock.rate(), clock.seconds_since(started)


def buildx_cat(engine: Engine, context: Path) -> tuple[float, float]:
    """Run buildx's `cat` with stdin on a pty and stdout to a pipe; see the module docstring."""
    master, slave = os.openpty()
    clock = StreamClock(BIG_SIZE)
    started = time.perf_counter()
    process = subprocess.Popen(
        buildx_cat_argv(context),
        env=engine.docker_env(experimental=True),
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    os.close(slave)
    assert process.stdout is not None
    try:
        with process.stdout:
            monitor_exit = BuildxMonitorExit(master, clock)
            read_until_eof(process.stdout.fileno(), clock, started + CAT_TIMEOUT, monitor_exit)
        if clock.complete:
            process.wait(timeout=EXPECT_TIMEOUT)
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode != 0 or not clock.complete:
        raise RuntimeError(
            f"buildx cat: exit status {process.returncode}, {clock.data_bytes / MB:.1f} of "
            f"{BIG_SIZE / MB:.1f} MB arrived"
        )
    return clock.rate(), clock.seconds_since(started)


class BuildxMonitorExit:
    """A chunk callback that types Ctrl-a c once the whole file has arrived, then `exit`.

    buildx 0.13 does not open its monitor by itself when a non-tty process ends, so the
    callback opens it and then leaves it at its `(buildx)` prompt.
    """

    def __init__(self, master: int, clock: StreamClock) -> None:
        self.master = master
        self.clock = clock
        self.switched = False
        self.tail = b""

    def __call__(self, chunk: bytes) -> None:
        if not self.clock.complete:
            return
        if not self.switched:
            os.write(self.master, CTRL_A_C)
            self.switched = True
            return
        self.tail = (self.tail + chunk)[-64:]
        if MONITOR_PROMPTS["buildx"] in self.tail:
            os.write(self.master, b"exit\r")
            self.tail = b""


# ---------------------------------------------------------------- rounds and report


Step = Callable[[], str]  # one measurement; returns the line to print about it


def run_rounds(
    results: dict[str, ToolResults],
    rounds: int,
    keystrokes: int,
    root: BkdbgRoot,
    engine: Engine,
    contexts: dict[str, Path],
) -> None:
    """Run a warm-up session per tool and image, then the rounds with the tools interleaved."""
    tools = list(results)
    for tool in tools:
        for image, context in contexts.items():
            step = partial(warm_up_round, tool, root, engine, context)
            attempt(tool, f"warm-up session, {image} image", results[tool], root, step)
    for index in range(rounds):
        # alternate which tool goes first, so neither always meets a busier engine
        for tool in tools if index % 2 == 0 else tools[::-1]:
            for image in contexts:
                step = partial(
                    session_round, tool, image, keystrokes, root, engine, contexts, results[tool]
                )
                attempt(tool, f"round {index + 1}, {image} image", results[tool], root, step)
    for index in range(rounds):
        for tool in tools if index % 2 == 0 else tools[::-1]:
            step = partial(cat_round, tool, root, engine, contexts["large"], results[tool])
            attempt(tool, f"cat round {index + 1}", results[tool], root, step)


def attempt(tool: str, label: str, results: ToolResults, root: BkdbgRoot, step: Step) -> None:
    """Run one measurement, recording a failure instead of ending the benchmark."""
    settle()
    try:
        print(f"  {label} {tool}: {step()}")
    except (RuntimeError, subprocess.TimeoutExpired, pexpect.ExceptionPexpect, OSError) as exc:
        results.failures.append(f"{label}: {exc}")
        print(f"  {label} {tool}: failed: {exc}")
    if tool == "bkdbg" and root.stop_servers():
        results.failures.append(f"{label}: a bkdbg server was still running afterwards")


def warm_up_round(tool: str, root: BkdbgRoot, engine: Engine, context: Path) -> str:
    prompt, _ = interactive_round(tool, root, engine, context, keystrokes=1)
    return f"prompt {prompt:.3f} s (not counted)"


def session_round(
    tool: str,
    image: str,
    keystrokes: int,
    root: BkdbgRoot,
    engine: Engine,
    contexts: dict[str, Path],
    results: ToolResults,
) -> str:
    prompt, echoes = interactive_round(tool, root, engine, contexts[image], keystrokes)
    results.prompt_seconds[image].append(prompt)
    results.echo_seconds.extend(echoes)
    return f"prompt {prompt:.3f} s, echo median {median(echoes) * 1000:.2f} ms"


def cat_round(
    tool: str, root: BkdbgRoot, engine: Engine, context: Path, results: ToolResults
) -> str:
    if tool == "bkdbg":
        rate, seconds = bkdbg_cat(root, context)
    else:
        rate, seconds = buildx_cat(engine, context)
    results.stream_rates.append(rate)
    results.command_seconds.append(seconds)
    return f"{rate / MB:.0f} MB/s while streaming, last byte after {seconds:.2f} s"


def report(results: dict[str, ToolResults]) -> None:
    bkdbg, buildx = results.get("bkdbg", ToolResults()), results.get("buildx", ToolResults())
    for image in DOCKERFILES:
        print(f"\nprompt time, cached build, {image} image (s):")
        for tool, result in results.items():
            print(f"  {tool:6} {describe(result.prompt_seconds[image], 's', digits=3)}")
        ratio = ratio_text(bkdbg.prompt_seconds[image], buildx.prompt_seconds[image])
        print(f"  ratio bkdbg/buildx: {ratio} (target <= 1.0)")
    print("keystroke echo round trip (ms):")
    for tool, result in results.items():
        print(f"  {tool:6} {describe(result.echo_seconds, 'ms', scale=1000)}")
    print("  target: bkdbg median <= 1.5 ms")
    print(f"cat of {BIG_SIZE // (1024 * 1024)} MiB to a pipe (MB/s, 1 MB = 10^6 bytes):")
    for tool, result in results.items():
        print(
            f"  {tool:6} {describe(result.stream_rates, 'MB/s', scale=1 / MB, digits=0)}; "
            f"from command start to the last byte {describe(result.command_seconds, 's')}"
        )
    print("  target: bkdbg >= 200 MB/s")
    for tool, result in results.items():
        for failure in result.failures:
            print(f"failed, {tool}: {failure}")


# ---------------------------------------------------------------- setup and cleanup


def prepare_contexts(directory: Path, engine: Engine) -> dict[str, Path]:
    """Write one build context per image and build each once, so every round is cached."""
    contexts = {}
    for image, dockerfile in DOCKERFILES.items():
        contexts[image] = directory / image
        contexts[image].mkdir()
        (contexts[image] / "Dockerfile").write_text(dockerfile)
        argv = ["docker", "buildx", "build", "--progress", "quiet", "--output", "type=cacheonly"]
        run_checked([*argv, str(contexts[image])], engine.docker_env(), timeout=300)
    return contexts


def prune_benchmark_cache(engine: Engine) -> None:
    """Remove the cache records whose description names BIG_FILE or SMALL_FILE.

    Only this benchmark writes those paths.
    """
    ours = [
        str(record["ID"])
        for record in cache_records(engine)
        if BIG_FILE in str(record.get("Description"))
        or SMALL_FILE in str(record.get("Description"))
    ]
    deleted = prune_records(engine, ours)
    print(f"\npruned {deleted} of {len(ours)} build cache records made by this benchmark")


def main() -> int:
    parser = make_parser(DESCRIPTION, DEFAULT_ROUNDS)
    parser.add_argument(
        "--keystrokes",
        type=int,
        default=DEFAULT_KEYSTROKES,
        help=f"echo round trips per session (default {DEFAULT_KEYSTROKES})",
    )
    parser.add_argument(
        "--spare",
        choices=("on", "off"),
        default="on",
        help="bkdbg's spare server: on (the default, as installed), or off to start every "
        "bkdbg session cold",
    )
    args = parser.parse_args()
    engine = Engine(args.docker_host)
    print(f"machine: {machine_summary(require_engine(engine))}")
    compile_bkdbg()
    warn_if_busy()
    results = {tool: ToolResults() for tool in selected_tools(args)}
    with tempfile.TemporaryDirectory(prefix="bkdbg-bench-invoke-") as scratch:
        with BkdbgRoot(engine, spare=args.spare == "on") as root:
            try:
                contexts = prepare_contexts(Path(scratch), engine)
                run_rounds(results, args.rounds, args.keystrokes, root, engine, contexts)
            except RuntimeError as exc:
                print(f"bench: error: {exc}", file=sys.stderr)
                return 1
            finally:
                if "bkdbg" in results:
                    print(f"bkdbg list at the end: {root.sessions_listed() or '(empty)'}")
        # after the root is closed, so that no bkdbg server still uses the cached result
        prune_benchmark_cache(engine)
    print(f"\nbkdbg's spare server: {args.spare}")
    report(results)
    print(f"load average at the end: {load_text()}")
    return 1 if any(result.failures for result in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

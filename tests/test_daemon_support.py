"""A fake BuildKit backend for server tests, and a server entry point that uses it.

`FakeBackend` implements `bkdbg.daemon.backend.Backend` without BuildKit. A build reads
control files from its context directory. Container processes are real local processes
(pipes, or a pty for tty), and each container runs them in a fresh temporary directory.
So a file written in one container is gone in the next, as after a rollback.

Control files in the build context:
- `fail`: the solve fails with BuildFailed; its text is the failed step's message.
- `fail-plain`: the solve fails without a state to debug (like a failing COPY).
- `slow`: the solve takes this many seconds (a float), or until cancelled.

`python -m tests.test_daemon_support --root R --id ID [--ready-fd N]` runs a server with
this backend, like `bkdbg __server`.
"""

from __future__ import annotations

import fcntl
import os
import pty
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
from pathlib import Path

from bkdbg.daemon.backend import OutputSink, ProcessSpec, ProgressSink, Terminal
from bkdbg.errors import BuildCancelled, BuildFailed, CommandNotFound, ContainerError, FailedStep
from bkdbg.options import BuildOptions, InvokeConfig
from bkdbg.progress import LogEvent, VertexEvent

REPO_ROOT = Path(__file__).resolve().parent.parent


class FakeProcess:
    """A local process standing in for a container process."""

    def __init__(self, spec: ProcessSpec, sink: OutputSink, cwd: str) -> None:
        self.spec = spec
        self.sink = sink
        self.done = threading.Event()
        self.command_not_found = False
        self._master: int | None = None
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": cwd, "PS1": "$ "}
        env.update(item.split("=", 1) for item in spec.env if "=" in item)  # type: ignore[misc]
        if spec.tty:
            self._start_tty(cwd, env)
        else:
            self._start_pipes(cwd, env)
        threading.Thread(target=self._wait, daemon=True, name="fake-wait").start()

    def _start_tty(self, cwd: str, env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        self._master = master
        if self.spec.rows and self.spec.cols:
            self.resize(self.spec.rows, self.spec.cols)
        self.popen = subprocess.Popen(
            self.spec.args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
            start_new_session=True,
        )
        os.close(slave)
        self._readers = [self._reader(1, master)]

    def _start_pipes(self, cwd: str, env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            self.spec.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=cwd, env=env, start_new_session=True,
        )
        assert self.popen.stdout is not None and self.popen.stderr is not None
        self._readers = [self._reader(1, self.popen.stdout.fileno()),
                         self._reader(2, self.popen.stderr.fileno())]

    def _reader(self, fd: int, source: int) -> threading.Thread:
        thread = threading.Thread(target=self._pump, args=(fd, source), daemon=True,
                                  name=f"fake-read-{fd}")
        thread.start()
        return thread

    def _pump(self, fd: int, source: int) -> None:
        while True:
            try:
                data = os.read(source, 65536)
            except OSError:  # EIO from a pty whose slave side closed
                data = b""
            if not data:
                break
            self.sink(fd, data)
        self.sink(fd, b"")
        if self.spec.tty:
            self.sink(2, b"")

    def _wait(self) -> None:
        self.popen.wait()
        for reader in self._readers:
            reader.join(5)
        if self._master is not None:
            os.close(self._master)
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()
        self.done.set()

    def write(self, data: bytes) -> None:
        if self.done.is_set():
            raise ContainerError("process has ended: fake: start a new process")
        if self._master is not None:
            os.write(self._master, data)
        elif self.popen.stdin is not None:
            self.popen.stdin.write(data)
            self.popen.stdin.flush()

    def close_stdin(self) -> None:
        if self._master is not None:
            os.write(self._master, b"\x04")
        elif self.popen.stdin is not None and not self.popen.stdin.closed:
            self.popen.stdin.close()

    def resize(self, rows: int, cols: int) -> None:
        if self._master is not None:
            fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def signal(self, name: str) -> None:
        number = getattr(signal, f"SIG{name.upper().removeprefix('SIG')}", None)
        if number is None:
            raise ValueError(f"unknown signal: {name}")
        self.popen.send_signal(number)

    def wait(self, timeout: float | None = None) -> int:
        if not self.done.wait(timeout):
            raise TimeoutError("fake process still running")
        code = self.popen.returncode
        return 128 - code if code < 0 else code


class FakeContainer:
    """A temporary directory in which fake processes run; release kills them."""

    released_count = 0

    def __init__(self, state: str) -> None:
        self.state = state
        self.directory = tempfile.mkdtemp(prefix="bkfake")
        self.processes: list[FakeProcess] = []
        self.released = False

    def run(self, spec: ProcessSpec, sink: OutputSink) -> FakeProcess:
        if self.released:
            raise ContainerError("container released: fake: start a new one")
        if shutil.which(spec.args[0]) is None:
            raise CommandNotFound(f"command not found in the container: {spec.args[0]}: "
                                  "check --invoke")
        process = FakeProcess(spec, sink, self.directory)
        self.processes.append(process)
        return process

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        FakeContainer.released_count += 1
        for process in self.processes:
            if process.popen.poll() is None:
                os.killpg(process.popen.pid, signal.SIGKILL)
        shutil.rmtree(self.directory, ignore_errors=True)


class FakeBuild:
    """A build whose outcome the control files of its context decide."""

    address = "fake://buildkit"

    def __init__(self, options: BuildOptions, on_progress: ProgressSink) -> None:
        self.options = options
        self.on_progress = on_progress
        self.context = Path(options.context)
        self.cancelled = threading.Event()
        self.closed = False
        self.failed = False
        self.containers: list[FakeContainer] = []

    def solve(self) -> None:
        self.on_progress([VertexEvent("sha256:fake", "[1/1] FAKE step", started=1.0)])
        slow = self.context / "slow"
        if slow.exists() and self.cancelled.wait(float(slow.read_text() or "60")):
            raise BuildCancelled(f"build cancelled: {self.context}: cancelled")
        for name in ("fail", "fail-plain"):
            if (self.context / name).exists():
                self.failed = name == "fail"
                message = (self.context / name).read_text().strip() or "step failed"
                self.on_progress([LogEvent("sha256:fake", 2, message.encode())])
                raise BuildFailed(message, FailedStep(message=message, exit_code=7, is_exec=True))
        self.on_progress([VertexEvent("sha256:fake", "[1/1] FAKE step", started=1.0,
                                      completed=2.0)])

    def export(self) -> list[str]:
        return [f"exported to {out.attrs.get('dest', '?')}" for out in self.options.outputs]

    def can_debug_failure(self) -> bool:
        return self.failed

    def new_container(self, state: str) -> FakeContainer:
        container = FakeContainer(state)
        self.containers.append(container)
        return container

    def process_spec(self, invoke: InvokeConfig, state: str, terminal: Terminal) -> ProcessSpec:
        args = (invoke.entrypoint or []) + (invoke.args or [])
        env = [f"BKDBG_STATE={state}", *invoke.env]
        if invoke.tty and terminal.term:
            env.append(f"TERM={terminal.term}")
        return ProcessSpec(args=args or ["sh"], tty=invoke.tty, env=env,
                           user=invoke.user or "", cwd=invoke.cwd or "",
                           rows=terminal.rows, cols=terminal.cols)

    def cancel(self) -> None:
        self.cancelled.set()

    def close(self) -> None:
        self.closed = True
        for container in self.containers:
            container.release()


class FakeBackend:
    """Starts `FakeBuild`s; `unreachable://` addresses fail like a stopped BuildKit."""

    def __init__(self) -> None:
        self.builds: list[FakeBuild] = []

    def start_build(self, options: BuildOptions, on_progress: ProgressSink) -> FakeBuild:
        from bkdbg.errors import BuildkitUnreachable

        if options.addr and options.addr.startswith("unreachable://"):
            raise BuildkitUnreachable(f"cannot reach BuildKit: tried {options.addr}: start it")
        build = FakeBuild(options, on_progress)
        self.builds.append(build)
        return build

    @property
    def open_containers(self) -> list[FakeContainer]:
        return [c for b in self.builds for c in b.containers if not c.released]


def fake_server_command(paths: object, debug: bool, idle_timeout: float | None,
                        ready_fd: int) -> list[str]:
    """A `launcher.server_command` replacement that runs the server with FakeBackend."""
    from bkdbg.daemon.instances import InstancePaths

    assert isinstance(paths, InstancePaths)
    argv = [sys.executable, "-m", "tests.test_daemon_support", "--root", str(paths.root),
            "--id", paths.instance_id, "--ready-fd", str(ready_fd)]
    if debug:
        argv.append("--debug")
    if idle_timeout:
        argv += ["--idle-timeout", str(idle_timeout)]
    return argv


if __name__ == "__main__":
    from bkdbg.daemon.main import serve_main

    sys.exit(serve_main(sys.argv[1:], backend=FakeBackend()))

"""Server behaviour through the real gRPC API, with a fake BuildKit backend.

Each test runs a server in this process (`run_in_process`). Requests still go through the
front socket, the relay and gRPC exactly as from another process. Container processes
are local processes (see tests/test_daemon_support.py).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bkdbg.daemon.backend import Terminal
from bkdbg.daemon.buffers import QUEUE_BYTES
from bkdbg.daemon.client import AttachStream, DaemonClient, build_error
from bkdbg.daemon.main import run_in_process
from bkdbg.daemon.messages import (
    BuildDone,
    BuildProgress,
    Closed,
    Exited,
    Output,
    TakenOver,
)
from bkdbg.daemon.session import Session
from bkdbg.errors import (
    BuildFailed,
    BuildkitUnreachable,
    NotAttached,
    ServerError,
    UsageError,
)
from bkdbg.options import BuildOptions, InvokeConfig, OutputSpec
from tests.test_daemon_support import FakeBackend

WAIT = 10.0  # seconds for anything a test waits for


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def client(backend: FakeBackend) -> Iterator[DaemonClient]:
    client = run_in_process(None, backend=backend)
    yield client
    client.close()


@pytest.fixture
def context_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ctx"
    directory.mkdir()
    return directory


def options(context: Path, command: list[str] | None = None, on: str = "always",
            tty: bool = False) -> BuildOptions:
    invoke = None
    if command is not None:
        invoke = InvokeConfig(entrypoint=command[:1], args=command[1:], tty=tty, on=on)
    return BuildOptions(context=str(context), invoke=invoke)


def finish(events: Iterator[object]) -> BuildDone:
    """Consume a build's events and return the BuildDone that ends them."""
    received = list(events)
    assert received, "no build events"
    done = received[-1]
    assert isinstance(done, BuildDone)
    return done


def second_client(client: DaemonClient) -> DaemonClient:
    return DaemonClient.connect(client.root, client.instance_id)


class Reader:
    """Reads an attach stream in a thread, so a test can wait with a timeout."""

    def __init__(self, stream: AttachStream) -> None:
        self.stream = stream
        self.messages: queue.Queue[object] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for message in self.stream:
                self.messages.put(message)
        except Exception as exc:  # handed to the test, which asserts on it
            self.messages.put(exc)
        self.messages.put(None)

    def until(self, predicate: object, timeout: float = WAIT) -> list[object]:
        """Return the messages up to and including the first one matching `predicate`."""
        seen: list[object] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out; got {seen!r}"
            try:
                message = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            seen.append(message)
            if callable(predicate) and predicate(message):
                return seen
            assert message is not None, f"stream ended; got {seen!r}"

    def output_until(self, text: bytes, timeout: float = WAIT) -> bytes:
        data = b""

        def has_text(message: object) -> bool:
            nonlocal data
            if isinstance(message, Output):
                data += message.data
            return text in data

        self.until(has_text, timeout)
        return data

    def end(self, timeout: float = WAIT) -> object:
        """Return the message that ended the stream."""
        messages = self.until(lambda m: m is None or isinstance(m, Exited | TakenOver | Closed),
                              timeout)
        return messages[-1]


# ---------------------------------------------------------------- builds


def test_build_without_invoke(client: DaemonClient, context_dir: Path) -> None:
    events = list(client.build(options(context_dir)))
    assert any(isinstance(e, BuildProgress) for e in events)
    done = events[-1]
    assert done == BuildDone(ok=True)
    info = client.info()
    assert info.build_state == "built"
    assert info.context == str(context_dir)
    meta = json.loads((client.paths.meta_file).read_text())
    assert meta["context"] == str(context_dir)


def test_build_progress_decodes(client: DaemonClient, context_dir: Path) -> None:
    from bkdbg.progress import events_from_json

    first = next(iter(client.build(options(context_dir))))
    assert isinstance(first, BuildProgress)
    assert events_from_json(first.events_json)[0].name == "[1/1] FAKE step"


def test_second_build_rejected(client: DaemonClient, context_dir: Path) -> None:
    finish(client.build(options(context_dir)))
    with pytest.raises(ServerError, match="already has a build"):
        finish(client.build(options(context_dir)))


def test_build_with_invoke_runs_process(client: DaemonClient, context_dir: Path) -> None:
    done = finish(client.build(options(context_dir, ["sh"])))
    assert done.ok
    assert done.process_id
    reader = Reader(client.attach())
    reader.stream.send_stdin(b"echo state=$BKDBG_STATE; exit 3\n")
    assert b"state=result" in reader.output_until(b"state=result")
    assert reader.end() == Exited(3)
    assert client.info().last_exit_code == 3


def test_build_export_notes(client: DaemonClient, context_dir: Path) -> None:
    opts = options(context_dir)
    opts.outputs = [OutputSpec("local", {"dest": "/tmp/out"})]
    assert finish(client.build(opts)).notes == ["exported to /tmp/out"]


def test_failed_build_invokes_in_failed_state(client: DaemonClient, context_dir: Path) -> None:
    (context_dir / "fail").write_text("process did not complete: exit code: 7")
    done = finish(client.build(options(context_dir, ["sh"])))
    assert not done.ok
    assert done.error_kind == "BuildFailed"
    assert done.failed_step is not None
    assert done.failed_step.exit_code == 7
    error = build_error(done)
    assert isinstance(error, BuildFailed)
    assert error.step == done.failed_step
    reader = Reader(client.attach(done.process_id))
    reader.stream.send_stdin(b"echo state=$BKDBG_STATE\n")
    assert b"state=failed" in reader.output_until(b"state=failed")
    assert client.info().build_state == "failed"


def test_failed_build_without_state(client: DaemonClient, context_dir: Path) -> None:
    (context_dir / "fail-plain").write_text("COPY failed: file not found")
    done = finish(client.build(options(context_dir, ["sh"])))
    assert not done.ok
    assert not done.process_id
    assert done.notes == [
        "no debug shell: BuildKit gave no state for the failed step: fix the step "
        "and build again"
    ]


def test_on_error_success_starts_nothing(client: DaemonClient, context_dir: Path,
                                         backend: FakeBackend) -> None:
    done = finish(client.build(options(context_dir, ["sh"], on="error")))
    assert done.ok
    assert not done.process_id
    assert backend.open_containers == []


def test_missing_command_reported(client: DaemonClient, context_dir: Path) -> None:
    done = finish(client.build(options(context_dir, ["no-such-command-here"])))
    assert done.ok
    assert done.error_kind == "CommandNotFound"
    assert "no-such-command-here" in done.error


def test_unreachable_buildkit(client: DaemonClient, context_dir: Path) -> None:
    opts = options(context_dir)
    opts.addr = "unreachable://nowhere"
    done = finish(client.build(opts))
    assert not done.ok
    assert isinstance(build_error(done), BuildkitUnreachable)
    assert client.info().build_state == "failed"


def test_invalid_options_json(client: DaemonClient) -> None:
    from bkdbg.daemon import api_pb2 as pb

    with pytest.raises(UsageError, match="invalid build options"), client._translated():
        list(client._stub.Build(pb.BuildRequest(options_json="{}")))


# ---------------------------------------------------------------- exec and rollback


def test_exec_output_kept_until_attach(client: DaemonClient, context_dir: Path) -> None:
    finish(client.build(options(context_dir, ["sh"])))
    process_id = client.exec(["sh", "-c", "echo out; echo err >&2; exit 5"])
    time.sleep(0.3)
    reader = Reader(client.attach(process_id))
    reader.stream.close_stdin()
    messages = reader.until(lambda m: isinstance(m, Exited))
    assert isinstance(messages[0], Output) or reader.stream.attached.replayed_bytes == 8
    outputs = {(m.fd, m.data) for m in messages if isinstance(m, Output)}
    assert outputs == {(1, b"out\n"), (2, b"err\n")}
    assert messages[-1] == Exited(5)


def test_exec_without_container(client: DaemonClient, context_dir: Path) -> None:
    finish(client.build(options(context_dir)))
    with pytest.raises(NotAttached, match="rollback"):
        client.exec(["true"])


def test_exec_empty_command(client: DaemonClient, context_dir: Path) -> None:
    finish(client.build(options(context_dir, ["sh"])))
    with pytest.raises(UsageError):
        client.exec([])


def test_rollback_replaces_process(client: DaemonClient, context_dir: Path,
                                   backend: FakeBackend) -> None:
    done = finish(client.build(options(context_dir, ["sh"])))
    reader = Reader(client.attach())
    reader.stream.send_stdin(b"echo data > made-here && echo written\n")
    reader.output_until(b"written")
    new_id = client.rollback()
    assert new_id != done.process_id
    ended = reader.end()
    assert isinstance(ended, Exited)
    assert ended.replaced_by == new_id
    fresh = Reader(client.attach())
    fresh.stream.send_stdin(b"ls; echo listed\n")
    assert b"made-here" not in fresh.output_until(b"listed")
    assert len(backend.open_containers) == 1


def test_rollback_init_needs_failure(client: DaemonClient, context_dir: Path) -> None:
    finish(client.build(options(context_dir, ["sh"])))
    with pytest.raises(UsageError, match="--init"):
        client.rollback(init=True)


def test_rollback_init_after_failure(client: DaemonClient, context_dir: Path) -> None:
    (context_dir / "fail").write_text("boom")
    finish(client.build(options(context_dir, ["sh"])))
    client.rollback(init=True)
    reader = Reader(client.attach())
    reader.stream.send_stdin(b"echo state=$BKDBG_STATE\n")
    assert b"state=failed-init" in reader.output_until(b"state=failed-init")


def test_rollback_without_build(client: DaemonClient) -> None:
    with pytest.raises(NotAttached):
        client.rollback()


def test_reload_rebuilds_and_restarts(client: DaemonClient, context_dir: Path,
                                      backend: FakeBackend) -> None:
    finish(client.build(options(context_dir, ["sh"])))
    reader = Reader(client.attach())
    (context_dir / "fail").write_text("now it fails")
    done = finish(client.reload())
    assert not done.ok
    assert done.process_id
    ended = reader.end()
    assert isinstance(ended, Exited)
    assert ended.message == "container released by reload"
    assert backend.builds[0].closed
    assert len(backend.open_containers) == 1
    (context_dir / "fail").unlink()
    assert finish(client.reload()).ok


def test_list_processes(client: DaemonClient, context_dir: Path) -> None:
    done = finish(client.build(options(context_dir, ["sh"])))
    exec_id = client.exec(["sleep", "30"])
    processes = {p.id: p for p in client.list_processes()}
    assert processes[done.process_id].current
    assert processes[done.process_id].state == "running"
    assert processes[exec_id].args == ["sleep", "30"]
    assert not processes[exec_id].current


# ---------------------------------------------------------------- attach


def test_attach_unknown_process(client: DaemonClient, context_dir: Path) -> None:
    finish(client.build(options(context_dir, ["sh"])))
    with pytest.raises(NotAttached, match="p99"):
        client.attach("p99")


def test_attach_without_process(client: DaemonClient) -> None:
    with pytest.raises(NotAttached, match="no process runs"):
        client.attach()


def test_output_while_detached_replayed(client: DaemonClient, context_dir: Path) -> None:
    finish(client.build(options(context_dir, ["sh"])))
    first = Reader(client.attach())
    first.stream.send_stdin(b"(sleep 0.3; echo while-you-were-away) &\n")
    first.stream.close()
    time.sleep(1.0)
    second = Reader(client.attach(replay=True))
    assert second.stream.attached.replayed_bytes == len(b"while-you-were-away\n")
    assert b"while-you-were-away" in second.output_until(b"while-you-were-away")


def test_takeover_between_clients(client: DaemonClient, context_dir: Path) -> None:
    finish(client.build(options(context_dir, ["sh"])))
    other = second_client(client)
    try:
        first = Reader(client.attach())
        second = Reader(other.attach())
        assert first.end() == TakenOver(other.client_id)
        second.stream.send_stdin(b"echo from-second\n")
        assert b"from-second" in second.output_until(b"from-second")
        info = client.info()
        assert {c.id: c.attached_process for c in info.clients}[other.client_id] == "p1"
    finally:
        other.close()


def test_read_only_watcher(client: DaemonClient, context_dir: Path) -> None:
    finish(client.build(options(context_dir, ["sh"])))
    other = second_client(client)
    try:
        owner = Reader(client.attach())
        watcher = Reader(other.attach(read_only=True))
        watcher.stream.send_stdin(b"echo ignored-input\n")
        owner.stream.send_stdin(b"echo from-owner\n")
        assert b"ignored-input" not in watcher.output_until(b"from-owner")
        assert b"ignored-input" not in owner.output_until(b"from-owner")
        owner.stream.send_stdin(b"exit 0\n")
        assert watcher.end() == Exited(0)
    finally:
        other.close()


def test_signal_by_name(client: DaemonClient, context_dir: Path) -> None:
    finish(client.build(options(context_dir, ["sh"])))
    process_id = client.exec(["sleep", "30"])
    reader = Reader(client.attach(process_id))
    reader.stream.signal("TERM")
    assert reader.end() == Exited(143)


def test_unknown_signal_rejected(client: DaemonClient, context_dir: Path) -> None:
    finish(client.build(options(context_dir, ["sh"])))
    stream = client.attach()
    try:
        with pytest.raises(UsageError, match="NOPE"):
            stream.signal("NOPE")
    finally:
        stream.close()


def test_tty_resize(client: DaemonClient, context_dir: Path) -> None:
    finish(client.build(options(context_dir, ["sh"], tty=True)))
    reader = Reader(client.attach(tty=True, rows=33, cols=101))
    reader.stream.send_stdin(b"stty size\n")
    assert b"33 101" in reader.output_until(b"33 101")
    reader.stream.resize(40, 120)
    reader.stream.send_stdin(b"stty size\n")
    assert b"40 120" in reader.output_until(b"40 120")


def test_input_owner_gets_every_byte(client: DaemonClient, context_dir: Path) -> None:
    """The client holding the input receives all output: the process waits for it."""
    finish(client.build(options(context_dir, ["sh"])))
    total = 16 * 1024 * 1024
    process_id = client.exec(["sh", "-c", f"sleep 0.2; head -c {total} /dev/zero; echo END"])
    stream = client.attach(process_id, replay=False)
    received, dropped, tail = 0, 0, b""
    for message in stream:
        if isinstance(message, Output):
            received += len(message.data)
            dropped += message.dropped_bytes
            tail = (tail + message.data)[-100:]
            time.sleep(0.0005)  # a slow reader
    assert dropped == 0
    assert received == total + len(b"END\n")
    assert tail.endswith(b"END\n")


def test_slow_watcher_bounded(client: DaemonClient, context_dir: Path) -> None:
    """A watcher that reads nothing must neither stall the process nor grow memory."""
    finish(client.build(options(context_dir, ["sh"])))
    total = 64 * 1024 * 1024
    process_id = client.exec(["sh", "-c", f"head -c {total} /dev/zero; echo THE-END"])
    stream = client.attach(process_id, replay=False, read_only=True)
    assert client._server is not None
    process = client._server.session._processes[process_id]
    queue_peak = 0
    while not process.wait_exited(0.05):
        queues = [a.queue for a in process._attachments]
        queue_peak = max([queue_peak, *(q.output_bytes for q in queues)])
    assert process.state == "exited", "the process stalled behind a client that does not read"
    assert queue_peak <= QUEUE_BYTES
    received, dropped, tail = 0, 0, b""
    for message in stream:
        if isinstance(message, Output):
            received += len(message.data)
            dropped += message.dropped_bytes
            tail = (tail + message.data)[-100:]
    print(f"\nslow client: received {received} bytes, dropped {dropped} of {total + 8}, "
          f"queue peak {queue_peak}")
    # the rest was in flight: gRPC's flow-control windows and the sockets' buffers
    assert received < total // 4
    assert dropped > 0
    assert tail.endswith(b"THE-END\n")


# ---------------------------------------------------------------- clients and lifetime


def test_events_stream(client: DaemonClient, context_dir: Path) -> None:
    events = client.events()
    received: queue.Queue[object] = queue.Queue()
    threading.Thread(target=lambda: [received.put(e) for e in events], daemon=True).start()
    time.sleep(0.2)
    done = finish(client.build(options(context_dir, ["true"])))
    kinds = []
    deadline = time.monotonic() + WAIT
    while len(kinds) < 3 and time.monotonic() < deadline:
        try:
            kinds.append(received.get(timeout=0.5).kind)  # type: ignore[attr-defined]
        except queue.Empty:
            pass
    events.close()
    # a process that ends at once may exit before the build thread reports the build
    assert sorted(kinds[:3]) == ["build-finished", "process-exited", "process-started"], kinds
    assert kinds.index("process-started") < kinds.index("process-exited")
    assert done.process_id


def test_disconnect_other_client(client: DaemonClient, context_dir: Path) -> None:
    finish(client.build(options(context_dir, ["sh"])))
    other = second_client(client)
    try:
        reader = Reader(other.attach())
        events = other.events()
        time.sleep(0.2)
        assert client.disconnect() == 1
        ended = reader.end()
        assert isinstance(ended, Closed)
        assert "disconnected" in ended.reason
        assert [e.kind for e in events] == ["disconnected"]
    finally:
        other.close()


def test_goodbye_with_other_client_keeps_server(client: DaemonClient) -> None:
    other = second_client(client)
    events = other.events()
    try:
        time.sleep(0.2)
        assert not client.goodbye(end_session=True)
        assert client.info().instance_id == client.instance_id
    finally:
        events.close()
        other.close()


def test_goodbye_alone_stops_server(backend: FakeBackend, context_dir: Path) -> None:
    client = run_in_process(None, backend=backend)
    finish(client.build(options(context_dir, ["sh"])))
    assert client.goodbye(end_session=True)
    assert client.wait_stopped(WAIT)
    assert not client.paths.directory.exists()
    assert backend.open_containers == []
    client.close()


def test_shutdown_ends_streams_and_releases(backend: FakeBackend, context_dir: Path) -> None:
    client = run_in_process(None, backend=backend)
    finish(client.build(options(context_dir, ["sh"])))
    reader = Reader(client.attach())
    client.shutdown()
    ended = reader.end()
    assert isinstance(ended, Closed | Exited), ended
    assert backend.open_containers == []
    assert backend.builds[0].closed
    assert not client.paths.directory.exists()
    client.close()


def test_shutdown_cancels_running_build(backend: FakeBackend, context_dir: Path) -> None:
    (context_dir / "slow").write_text("60")
    client = run_in_process(None, backend=backend)
    events = client.build(options(context_dir))
    next(iter(events))
    started = time.monotonic()
    client.shutdown()
    assert time.monotonic() - started < 5
    assert backend.builds[0].cancelled.is_set()
    client.close()


def test_cancel_build_ends_stream(backend: FakeBackend, context_dir: Path) -> None:
    (context_dir / "slow").write_text("60")
    client = run_in_process(None, backend=backend)
    events = client.build(options(context_dir, ["sh"]))
    next(iter(events))

    assert client.cancel_build()
    done = finish(events)

    assert not done.ok
    assert done.error_kind == "BuildCancelled"
    assert done.process_id == ""
    assert backend.builds[0].cancelled.is_set()
    assert client.info().build_state == "cancelled"
    assert not client.cancel_build()  # nothing runs any more
    client.close()


def test_cancel_without_build_is_false(client: DaemonClient) -> None:
    assert not client.cancel_build()
    assert client.info().build_state == "idle"


def test_idle_timeout_stops_server(backend: FakeBackend, context_dir: Path) -> None:
    client = run_in_process(None, backend=backend, idle_timeout=0.5)
    finish(client.build(options(context_dir)))
    assert client.wait_stopped(WAIT)
    client.close()


def test_idle_timeout_waits_for_running_process(backend: FakeBackend,
                                                context_dir: Path) -> None:
    client = run_in_process(None, backend=backend, idle_timeout=0.5)
    finish(client.build(options(context_dir, ["sleep", "2"])))
    assert not client.wait_stopped(1.2)
    assert client.wait_stopped(WAIT)
    client.close()


def test_clients_listed_while_streaming(client: DaemonClient) -> None:
    events = client.events()
    try:
        deadline = time.monotonic() + WAIT
        while not client.info().clients and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [c.id for c in client.info().clients] == [client.client_id]
    finally:
        events.close()


def test_build_goes_on_without_client(client: DaemonClient, context_dir: Path) -> None:
    (context_dir / "slow").write_text("0.5")
    events = client.build(options(context_dir, ["sh"]))
    assert isinstance(next(events), BuildProgress)
    events.close()  # the client stops reading, as when it is killed
    deadline = time.monotonic() + WAIT
    while client.info().build_state == "building" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.info().build_state == "built"
    assert client.info().current_process == "p1"


# ---------------------------------------------------------------- the first build


def owned_session(client: DaemonClient) -> Session:
    """Return the session of the server that `client` runs in this process."""
    server = client._server
    assert server is not None
    return server.session


def test_first_build_taken_over(backend: FakeBackend, client: DaemonClient,
                                context_dir: Path) -> None:
    requested = options(context_dir, ["sh"])
    session = owned_session(client)
    session.start_first_build(requested.to_json(), Terminal(term="xterm"))
    events = list(client.build(requested))
    assert isinstance(events[0], BuildProgress)
    done = events[-1]
    assert isinstance(done, BuildDone)
    assert done.ok
    assert done.process_id
    assert len(backend.builds) == 1


def test_first_build_other_options(backend: FakeBackend, client: DaemonClient,
                                   context_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    session = owned_session(client)
    session.start_first_build(options(context_dir, ["sh"]).to_json(), Terminal())
    done = finish(client.build(options(other, ["sh"])))
    assert done.ok
    assert len(backend.builds) == 2
    assert client.info().context == str(other)
    assert backend.open_containers == backend.builds[1].containers

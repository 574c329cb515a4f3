"""A fake `DaemonClient` for in-process tests of the shell (monitor, scripts, attach).

It records every call in `calls` and answers from plain attributes that a test sets:
`processes`, `build_events`, `reload_events`, and `outputs` (the messages that an attach
to a process yields after `Attached`). An attach stream blocks like a real one until the
test pushes a message or the stream is closed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from bkdbg.daemon.messages import (
    Attached,
    BuildDone,
    BuildProgress,
    ClientInfo,
    Exited,
    Output,
    ProcessInfo,
    ServerEvent,
    ServerStatus,
)
from bkdbg.progress import VertexEvent, events_to_json

INSTANCE_ID = "0a1b2c3d"


def progress(name: str = "[1/1] RUN true") -> BuildProgress:
    """Return a progress batch with one finished step."""
    vertex = VertexEvent(digest="sha256:1", name=name, started=1.0, completed=2.0)
    return BuildProgress(events_to_json([vertex]))


class FakeStream:
    """An attach stream: iteration blocks until `push` or `close`.

    A pushed exception is raised by the iteration, as a stream to a dead server does.
    """

    def __init__(self, attached: Attached, messages: list[Any] | None = None) -> None:
        self.attached = attached
        self._queue: queue.Queue[Any] = queue.Queue()
        for message in messages or []:
            self._queue.put(message)
        self.stdin = b""
        self.stdin_closed = False
        self.resizes: list[tuple[int, int]] = []
        self.signals: list[str] = []
        self.closed = threading.Event()
        self.on_stdin: Any = None

    def push(self, message: Any) -> None:
        self._queue.put(message)

    def __iter__(self) -> Iterator[Any]:
        while True:
            message = self._queue.get()
            if message is None:
                return
            if isinstance(message, BaseException):
                raise message
            yield message
            if isinstance(message, Exited) or type(message).__name__ in ("TakenOver", "Closed"):
                return

    def send_stdin(self, data: bytes) -> None:
        self.stdin += data
        if self.on_stdin is not None:
            self.on_stdin(self, data)

    def close_stdin(self) -> None:
        self.stdin_closed = True

    def resize(self, rows: int, cols: int) -> None:
        self.resizes.append((rows, cols))

    def signal(self, name: str) -> None:
        self.signals.append(name)

    def close(self) -> None:
        self.closed.set()
        self._queue.put(None)


class FakeEvents:
    """An event stream that yields the events pushed to it until closed."""

    def __init__(self) -> None:
        self._queue: queue.Queue[ServerEvent | None] = queue.Queue()

    def push(self, event: ServerEvent) -> None:
        self._queue.put(event)

    def __iter__(self) -> Iterator[ServerEvent]:
        while (event := self._queue.get()) is not None:
            yield event

    def close(self) -> None:
        self._queue.put(None)


class FakeClient:
    """Stands in for `bkdbg.daemon.client.DaemonClient`; see the module docstring."""

    def __init__(self, instance_id: str = INSTANCE_ID) -> None:
        self.instance_id = instance_id
        self.client_id = "c1"
        self.calls: list[tuple[Any, ...]] = []
        self.processes = [ProcessInfo("p1", ["sh"], "running", tty=True, current=True)]
        self.build_events: list[Any] = [progress(), BuildDone(ok=True, process_id="p1")]
        self.reload_events: list[Any] = [progress(), BuildDone(ok=True, process_id="p2")]
        self.outputs: dict[str, list[Any]] = {}
        self.streams: list[FakeStream] = []
        self.event_streams: list[FakeEvents] = []
        self.next_process = 3
        self.closed = False

    def build(self, options: Any) -> Iterator[Any]:
        self.calls.append(("build", options))
        return iter(self.build_events)

    def reload(self) -> Iterator[Any]:
        self.calls.append(("reload",))
        return iter(self.reload_events)

    def rollback(self, init: bool = False) -> str:
        self.calls.append(("rollback", init))
        return self._new_process(["sh"], tty=True)

    def exec(
        self,
        args: list[str],
        env: list[str] | None = None,
        user: str = "",
        cwd: str = "",
        tty: bool = False,
    ) -> str:
        self.calls.append(("exec", list(args), list(env or []), user, cwd, tty))
        return self._new_process(list(args), tty=tty)

    def _new_process(self, args: list[str], tty: bool) -> str:
        process_id = f"p{self.next_process}"
        self.next_process += 1
        self.processes.append(ProcessInfo(process_id, args, "running", tty=tty))
        return process_id

    def attach(
        self,
        process_id: str = "",
        tty: bool = False,
        rows: int = 0,
        cols: int = 0,
        read_only: bool = False,
        replay: bool = True,
    ) -> FakeStream:
        self.calls.append(("attach", process_id, rows, cols, replay))
        process = self._process(process_id)
        attached = Attached(process.id, list(process.args), process.tty)
        messages = self.outputs.get(process.id, [Output(1, b"out\n"), Exited(0)])
        stream = FakeStream(attached, list(messages))
        self.streams.append(stream)
        return stream

    def _process(self, process_id: str) -> ProcessInfo:
        for process in self.processes:
            if process.id == process_id or (not process_id and process.current):
                return process
        from bkdbg.errors import NotAttached

        raise NotAttached(f"no process {process_id}: type ps to list them")

    def list_processes(self) -> list[ProcessInfo]:
        self.calls.append(("list_processes",))
        return list(self.processes)

    def info(self, timeout: float | None = None) -> ServerStatus:
        current = next((p.id for p in self.processes if p.current), "")
        return ServerStatus(
            self.instance_id, 4242, 1.0, "built", [ClientInfo("c1")], current_process=current
        )

    def events(self) -> FakeEvents:
        stream = FakeEvents()
        self.event_streams.append(stream)
        return stream

    def disconnect(self, client_id: str = "") -> int:
        self.calls.append(("disconnect", client_id))
        return 2

    def goodbye(self, end_session: bool = False) -> bool:
        self.calls.append(("goodbye", end_session))
        return end_session

    def close(self, say_goodbye: bool = True) -> None:
        self.closed = True
        for stream in self.event_streams:
            stream.close()


class FakeDaemon:
    """The module-level side of the fake: servers by id, for connect, list and kill."""

    def __init__(self) -> None:
        self.clients: dict[str, FakeClient] = {}
        self.killed: list[str] = []

    def add(self, client: FakeClient) -> FakeClient:
        self.clients[client.instance_id] = client
        return client

    def connect(self, root: Any, instance_id: str, **_: Any) -> FakeClient:
        from bkdbg.errors import UnknownInstance

        if instance_id not in self.clients:
            raise UnknownInstance(f"no bkdbg server with id {instance_id}: {root}: run bkdbg list")
        return self.clients[instance_id]

    def list_instances(self, root: Any = None) -> list[Any]:
        from bkdbg.daemon.messages import InstanceInfo

        return [
            InstanceInfo(client.instance_id, "running", 4242, 1.0, status=client.info())
            for client in self.clients.values()
        ]

    def kill_instance(self, root: Any, instance_id: str) -> str:
        self.connect(root, instance_id)
        self.killed.append(instance_id)
        del self.clients[instance_id]
        return "stopped"

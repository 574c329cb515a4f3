"""One build or reload of a session: its progress for the client that requested it, then
its BuildDone."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from bkdbg.daemon.messages import BuildDone, BuildEvent, BuildProgress
from bkdbg.progress import ProgressEvent, events_to_json


class BuildRun:
    """One build or reload: its progress for the client that asked, then its BuildDone."""

    def __init__(self) -> None:
        self._events: queue.Queue[BuildEvent | None] = queue.Queue()
        self._listening = True
        self.done: BuildDone | None = None
        self.finished = threading.Event()
        self.connected = threading.Event()  # BuildKit's connection and session are up

    def publish(self, events: list[ProgressEvent]) -> None:
        # NOTE: unbounded, but BuildKit clips each step's log (2 MiB by default)
        if self._listening and events:
            self._events.put(BuildProgress(events_to_json(events)))

    def finish(self, done: BuildDone) -> None:
        self.done = done
        self._events.put(done)
        self.finished.set()

    def stop_listening(self) -> None:
        """End `stream()` and drop later progress; the build itself goes on."""
        self._listening = False
        self._events.put(None)

    def stream(self) -> Iterator[BuildEvent]:
        while (event := self._events.get()) is not None:
            yield event
            if isinstance(event, BuildDone):
                return

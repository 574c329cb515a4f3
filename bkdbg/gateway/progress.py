"""BuildKit's `Control.Status` stream as neutral progress events, plus what a failure needs.

`StatusTracker` converts each `StatusResponse` into `bkdbg.progress` events and remembers,
per vertex, its name, its error and the last lines of its output, so that a failed step
can be described after the solve fails.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from bkdbg.buildkit_proto import control_pb2
from bkdbg.progress import LogEvent, ProgressEvent, StatusEvent, VertexEvent, WarningEvent

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 10  # lines of a vertex's output kept for a failed-step report


def _seconds(message: Message, name: str) -> float | None:
    """Return timestamp field `name` as Unix seconds, or None when it is unset."""
    if not message.HasField(name):
        return None
    stamp: Timestamp = getattr(message, name)
    return stamp.seconds + stamp.nanos / 1e9


def status_events(response: control_pb2.StatusResponse) -> list[ProgressEvent]:
    """Convert one StatusResponse into events, in the order vertexes, statuses, logs, warnings."""
    events: list[ProgressEvent] = []
    for vertex in response.vertexes:
        events.append(
            VertexEvent(
                digest=vertex.digest,
                name=vertex.name,
                inputs=list(vertex.inputs),
                cached=vertex.cached,
                started=_seconds(vertex, "started"),
                completed=_seconds(vertex, "completed"),
                error=vertex.error,
            )
        )
    for status in response.statuses:
        events.append(
            StatusEvent(
                id=status.ID,
                vertex=status.vertex,
                name=status.name,
                current=status.current,
                total=status.total,
                timestamp=_seconds(status, "timestamp"),
                started=_seconds(status, "started"),
                completed=_seconds(status, "completed"),
            )
        )
    for log in response.logs:
        events.append(
            LogEvent(
                vertex=log.vertex,
                stream=int(log.stream),
                data=log.msg,
                timestamp=_seconds(log, "timestamp"),
            )
        )
    for warning in response.warnings:
        events.append(
            WarningEvent(
                vertex=warning.vertex,
                short=warning.short.decode("utf-8", "replace"),
                level=int(warning.level),
                detail=[d.decode("utf-8", "replace") for d in warning.detail],
                url=warning.url,
            )
        )
    return events


class _VertexRecord:
    """Name, error and output tail of one vertex."""

    def __init__(self) -> None:
        self.name = ""
        self.error = ""
        self.started = False
        self.completed = False
        self.lines: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.partial = b""

    def add_output(self, data: bytes) -> None:
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            self.lines.append(line.decode("utf-8", "replace").rstrip("\r"))

    def tail(self) -> list[str]:
        lines = list(self.lines)
        if self.partial:
            lines.append(self.partial.decode("utf-8", "replace"))
        return lines[-LOG_TAIL_LINES:]


class StatusTracker:
    """Feeds progress events to a callback and keeps per-vertex facts for failure reports.

    `feed` runs on the Status thread; the other methods may run on any thread.
    """

    def __init__(self, on_progress: Callable[[list[ProgressEvent]], None]) -> None:
        self._on_progress = on_progress
        self._records: dict[str, _VertexRecord] = {}
        self._changed = threading.Condition()
        self._ended = False

    def feed(self, response: control_pb2.StatusResponse) -> None:
        events = status_events(response)
        # deliver first, so that a waiter woken below finds the events already rendered
        if events:
            self._deliver(events)
        with self._changed:
            for event in events:
                self._record(event)
            self._changed.notify_all()

    def _deliver(self, events: list[ProgressEvent]) -> None:
        try:
            self._on_progress(events)
        except Exception:
            # a broken progress consumer must not stop the build, nor the tracking here
            logger.exception("progress callback failed; %d events dropped", len(events))

    def _record(self, event: ProgressEvent) -> None:
        if isinstance(event, VertexEvent):
            record = self._records.setdefault(event.digest, _VertexRecord())
            record.name = event.name or record.name
            record.error = event.error or record.error
            record.started = event.started is not None
            record.completed = event.completed is not None
        elif isinstance(event, LogEvent):
            self._records.setdefault(event.vertex, _VertexRecord()).add_output(event.data)

    def end(self) -> None:
        """Mark the stream as ended, so that waiters stop waiting."""
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_vertex_done(self, digest: str, timeout: float) -> bool:
        """Wait until vertex `digest` is reported completed or the stream ends."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self._ended or self._is_completed(digest), timeout=timeout
            )

    def wait_settled(self, digest: str, timeout: float) -> bool:
        """Wait until vertex `digest` and every started vertex are completed.

        BuildKit returns a solve's result before the Status stream reports its last steps,
        and a renderer closed at that point would miss them.
        """
        with self._changed:
            return self._changed.wait_for(
                lambda: self._ended or (self._is_completed(digest) and self._all_completed()),
                timeout=timeout,
            )

    def _all_completed(self) -> bool:
        return all(r.completed for r in self._records.values() if r.started)

    def _is_completed(self, digest: str) -> bool:
        record = self._records.get(digest)
        return record is not None and record.completed

    def failed_vertex(self) -> str | None:
        """Return the digest of the first vertex reported with an error, if any."""
        with self._changed:
            for digest, record in self._records.items():
                if record.error and not record.error.endswith("context canceled"):
                    return digest
        return None

    def vertex_name(self, digest: str) -> str | None:
        with self._changed:
            record = self._records.get(digest)
            return record.name if record and record.name else None

    def vertex_logs(self, digest: str) -> list[str]:
        """Return the last LOG_TAIL_LINES lines of the vertex's output."""
        with self._changed:
            record = self._records.get(digest)
            return record.tail() if record else []

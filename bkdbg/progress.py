"""Build progress: neutral events, their JSON form, and the `--progress` renderers.

The gateway turns BuildKit's `Control.Status` stream into these events. The server sends
them to the client as JSON, and the client draws them with one renderer:

* `plain` prints `#N ...` lines in the format of BuildKit's progressui printer
  (`docker buildx build --progress plain`).
* `tty` draws a live view with rich and leaves a compact summary when closed
  (`bkdbg.progress_tty`).
* `rawjson` prints one JSON object per batch, shaped like BuildKit's `client.SolveStatus`.
* `quiet` prints nothing; `auto` is `tty` on a terminal and `plain` otherwise.

A renderer writes nothing after `close()`, so progress never interleaves with the I/O of a
container that the client attaches to afterwards.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

from bkdbg.errors import UsageError
from bkdbg.options import PROGRESS_MODES


@dataclass
class VertexEvent:
    """A build step's state; BuildKit resends it whenever the state changes.

    Times are Unix seconds as reported by BuildKit, None when not reached yet.
    """

    digest: str
    name: str = ""
    inputs: list[str] = field(default_factory=list)
    cached: bool = False
    started: float | None = None
    completed: float | None = None
    error: str = ""


@dataclass
class StatusEvent:
    """A progress counter of a step, such as bytes transferred."""

    id: str
    vertex: str
    name: str = ""
    current: int = 0
    total: int = 0
    timestamp: float | None = None
    started: float | None = None
    completed: float | None = None


@dataclass
class LogEvent:
    """Output of a step: raw bytes from file descriptor `stream` (1 stdout, 2 stderr)."""

    vertex: str
    stream: int
    data: bytes
    timestamp: float | None = None


@dataclass
class WarningEvent:
    """A build warning, such as a Dockerfile lint finding."""

    vertex: str
    short: str
    level: int = 0
    detail: list[str] = field(default_factory=list)
    url: str = ""


ProgressEvent = VertexEvent | StatusEvent | LogEvent | WarningEvent

_EVENT_TYPES: dict[str, type[Any]] = {
    "vertex": VertexEvent,
    "status": StatusEvent,
    "log": LogEvent,
    "warning": WarningEvent,
}
_TYPE_NAMES = {cls: name for name, cls in _EVENT_TYPES.items()}


def events_to_json(events: list[ProgressEvent]) -> str:
    """Encode a batch of events as a JSON array; log bytes become base64."""
    items = []
    for event in events:
        item = asdict(event)
        if isinstance(event, LogEvent):
            item["data"] = base64.b64encode(event.data).decode("ascii")
        item["type"] = _TYPE_NAMES[type(event)]
        items.append(item)
    return json.dumps(items, separators=(",", ":"))


def events_from_json(text: str) -> list[ProgressEvent]:
    """Decode a batch made by `events_to_json`; raises ValueError on a malformed batch."""
    events: list[ProgressEvent] = []
    for item in json.loads(text):
        cls = _EVENT_TYPES.get(item.pop("type", None))
        if cls is None:
            raise ValueError(f"unknown progress event type in {text[:80]!r}")
        if cls is LogEvent:
            item["data"] = base64.b64decode(item["data"])
        events.append(cls(**item))
    return events


# ---------------------------------------------------------------------------------------
# Shared state of the text renderers


@dataclass
class StepState:
    """A renderer's state of one vertex."""

    digest: str
    name: str = ""
    index: int = 0  # the N in `#N`, given when first printed
    cached: bool = False
    started: float | None = None
    completed: float | None = None
    error: str = ""
    partial: bytearray = field(default_factory=bytearray)  # a log line without its newline
    tail: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.completed is not None

    def duration(self, now: float | None = None) -> float:
        if self.started is None:
            return 0.0
        end = self.completed if self.completed is not None else now
        return max(0.0, (end or self.started) - self.started)


TAIL_LINES = 6  # log lines the tty view shows under a running step


class StepTrace:
    """Steps in the order BuildKit first reported them, updated from events."""

    def __init__(self) -> None:
        self.steps: dict[str, StepState] = {}

    def apply_vertex(self, event: VertexEvent) -> StepState:
        step = self.steps.setdefault(event.digest, StepState(event.digest))
        step.name = event.name or step.name
        step.cached = event.cached
        # a vertex resent before it starts again must not wipe a known start time
        if event.started is not None:
            step.started = event.started
        step.completed = event.completed
        step.error = event.error
        return step

    def add_log(self, step: StepState, data: bytes) -> list[str]:
        """Append output to `step` and return the lines it completed."""
        step.partial.extend(data)
        *lines, rest = bytes(step.partial).split(b"\n")
        step.partial = bytearray(rest)
        text = [line.decode("utf-8", "replace").rstrip("\r") for line in lines]
        step.tail = (step.tail + text)[-TAIL_LINES:]
        return text


def _log_offset(step: StepState, timestamp: float | None) -> str:
    """Format a log line's time since its step started, as BuildKit's printer does."""
    seconds = 0.0
    if timestamp is not None and step.started is not None:
        seconds = max(0.0, timestamp - step.started)
    precision = 1
    if seconds < 10:
        precision = 3
    elif seconds < 100:
        precision = 2
    return f"{seconds:.{precision}f}"


def is_cancelled(error: str) -> bool:
    """Tell whether a step's error is BuildKit's for a cancelled build."""
    return error.endswith("context canceled")


# ---------------------------------------------------------------------------------------
# Renderers


class Renderer(Protocol):
    """Draws progress events; thread-safe, and silent after `close`.

    `close(cancelled=True)` means that the user interrupted the build, so the steps still
    running end as cancelled.
    """

    def update(self, events: list[ProgressEvent]) -> None: ...

    def close(self, ok: bool = True, cancelled: bool = False) -> None: ...


class QuietRenderer:
    """Prints nothing (`--progress quiet`)."""

    def update(self, events: list[ProgressEvent]) -> None:
        pass

    def close(self, ok: bool = True, cancelled: bool = False) -> None:
        pass


class LockedRenderer:
    """Base of the writing renderers: one lock, and no output once closed."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._closed = False

    def update(self, events: list[ProgressEvent]) -> None:
        with self._lock:
            if self._closed:
                return
            self._render(events)
            self._stream.flush()

    def close(self, ok: bool = True, cancelled: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._finish(ok, cancelled)
            self._closed = True
            self._stream.flush()

    def _render(self, events: list[ProgressEvent]) -> None:
        raise NotImplementedError

    def _finish(self, ok: bool, cancelled: bool) -> None:
        pass


@dataclass
class _Pending:
    """The output one batch brings for one step, printed together as BuildKit's printer does."""

    step: StepState
    newly_started: bool = False
    newly_completed: bool = False
    lines: list[tuple[float | None, str]] = field(default_factory=list)
    statuses: list[StatusEvent] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def has_output(self) -> bool:
        return bool(
            self.newly_started
            or self.newly_completed
            or self.lines
            or self.statuses
            or self.warnings
        )


PLAIN_INTERVAL = 0.1  # seconds between two prints of the plain renderer, as BuildKit's printer
STATUS_MIN_FRACTION = 0.05  # print a running counter again after 5% more progress ...
STATUS_MIN_INTERVAL = 5.0  # ... or 5 s later, the thresholds of BuildKit's printer


def _format_bytes(count: int) -> str:
    """Format a byte count in decimal units, like BuildKit's progress output (`4.19kB`)."""
    if count < 1000:
        return f"{count}B"
    value = float(count)
    units = ["kB", "MB", "GB", "TB"]
    value /= 1000
    while value >= 1000 and len(units) > 1:
        value /= 1000
        units.pop(0)
    return f"{value:.2f}{units[0]}"


class PlainRenderer(LockedRenderer):
    """Prints `#N name`, `#N 0.123 output`, `#N DONE 0.1s` lines like buildx's plain mode.

    Like BuildKit's printer, it prints at most once per `interval` seconds while the build
    runs, with every batch that came meanwhile (`close` prints what is left at once).
    BuildKit restarts some steps within a millisecond of their end (`[internal] load build
    definition`), and printing each batch at once showed such a step twice, with two DONE
    lines.
    """

    def __init__(self, stream: TextIO, interval: float = PLAIN_INTERVAL) -> None:
        super().__init__(stream)
        self._trace = StepTrace()
        self._current: StepState | None = None
        self._next_index = 0
        self._printed_any = False
        self._status_printed: dict[str, tuple[int, float]] = {}  # id: (current, timestamp)
        self._interval = interval
        self._unprinted: list[ProgressEvent] = []
        self._printed_at = float("-inf")  # time.monotonic() of the last print
        self._timer: threading.Timer | None = None
        self._broken = False  # the timer's print found the stream's reader gone

    def _render(self, events: list[ProgressEvent]) -> None:
        if self._broken:
            raise BrokenPipeError  # in the caller's thread, which ends the session
        self._unprinted.extend(events)
        wait = self._printed_at + self._interval - time.monotonic()
        if wait <= 0:
            self._print_unprinted()
        elif self._timer is None:
            self._timer = threading.Timer(wait, self._print_later)
            self._timer.daemon = True
            self._timer.start()

    def _print_later(self) -> None:
        with self._lock:
            self._timer = None
            if self._closed or self._broken:
                return
            try:
                self._print_unprinted()
                self._stream.flush()
            except BrokenPipeError:
                self._broken = True

    def _print_unprinted(self) -> None:
        events, self._unprinted = self._unprinted, []
        self._printed_at = time.monotonic()
        pending: dict[str, _Pending] = {}
        for event in events:
            self._collect(event, pending)
        # steps that completed in this batch first, the one printed last ahead of the
        # others, then in the order they completed, as BuildKit's printer does
        batch = sorted(
            pending.values(),
            key=lambda p: (
                not p.newly_completed,
                p.step is not self._current,
                p.step.completed or 0.0 if p.newly_completed else 0.0,
            ),
        )
        for item in batch:
            if item.has_output and (item.step.started is not None or item.step.done):
                self._print_pending(item)

    def _finish(self, ok: bool, cancelled: bool) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._broken:
            raise BrokenPipeError
        self._print_unprinted()
        if self._current is not None:
            self._flush_partial(self._current)
        if not cancelled:
            return
        if self._stream.isatty():
            self._stream.write("\n")  # after the terminal's echo of ^C
        # the build stream ends here, so no event will end the steps that still run
        for step in self._trace.steps.values():
            if step.index and step.started is not None and not step.done:
                self._switch_to(step)
                self._write(step, "CANCELED")
                self._current = None

    def _collect(self, event: ProgressEvent, pending: dict[str, _Pending]) -> None:
        if isinstance(event, VertexEvent):
            self._collect_vertex(event, pending)
            return
        step = self._trace.steps.get(event.vertex)
        if step is None:
            if isinstance(event, WarningEvent):
                self._stream.write(f"WARN: {event.short}\n")
            return  # BuildKit names a vertex before sending anything about it
        item = pending.setdefault(step.digest, _Pending(step))
        if isinstance(event, LogEvent):
            item.lines.extend(
                (event.timestamp, line) for line in self._trace.add_log(step, event.data)
            )
        elif isinstance(event, StatusEvent):
            item.statuses.append(event)
        else:
            item.warnings.append(event.short)

    def _collect_vertex(self, event: VertexEvent, pending: dict[str, _Pending]) -> None:
        before = self._trace.steps.get(event.digest)
        was_started = before is not None and before.started is not None
        was_completed = before.completed if before is not None else None
        step = self._trace.apply_vertex(event)
        item = pending.setdefault(step.digest, _Pending(step))
        item.newly_started |= step.started is not None and not was_started
        item.newly_completed |= step.done and step.completed != was_completed

    def _print_pending(self, item: _Pending) -> None:
        step = item.step
        self._switch_to(step)
        for status in item.statuses:
            self._print_status(step, status)
        for warning in item.warnings:
            self._write(step, f"WARN: {warning}")
        for timestamp, line in item.lines:
            self._write(step, f"{_log_offset(step, timestamp)} {line}")
        if item.newly_completed:
            self._print_end(step)

    def _write(self, step: StepState, text: str) -> None:
        self._stream.write(f"#{step.index} {text}\n")

    def _switch_to(self, step: StepState) -> None:
        """Print the header of `step` unless it is the step printed last."""
        if step is self._current:
            return
        previous = self._current
        if previous is not None and not previous.done:
            self._flush_partial(previous)
            self._write(previous, "...")
        if self._printed_any:
            self._stream.write("\n")
        if step.index == 0:
            self._next_index += 1
            step.index = self._next_index
        self._write(step, step.name)
        self._printed_any = True
        self._current = step

    def _print_end(self, step: StepState) -> None:
        self._flush_partial(step)
        if step.error:
            self._write(step, "CANCELED" if is_cancelled(step.error) else f"ERROR: {step.error}")
        elif step.cached:
            self._write(step, "CACHED")
        else:
            self._write(step, f"DONE {step.duration():.1f}s")
        self._current = None

    def _flush_partial(self, step: StepState) -> None:
        if step.partial:
            line = step.partial.decode("utf-8", "replace")
            step.partial.clear()
            self._write(step, f"{_log_offset(step, step.completed)} {line}")

    def _print_status(self, step: StepState, event: StatusEvent) -> None:
        if event.completed is None and not self._status_due(event):
            return
        self._status_printed[event.id] = (event.current, event.timestamp or 0.0)
        amount = ""
        if event.total:
            amount = f" {_format_bytes(event.current)} / {_format_bytes(event.total)}"
        elif event.current:
            amount = f" {_format_bytes(event.current)}"
        end = event.completed if event.completed is not None else event.timestamp
        elapsed = ""
        if event.started is not None and end is not None and end - event.started > 0.01:
            elapsed = f" {end - event.started:.1f}s"
        done = " done" if event.completed is not None else ""
        self._write(step, f"{event.id}{amount}{elapsed}{done}")

    def _status_due(self, event: StatusEvent) -> bool:
        """Tell whether a running counter moved enough since it was last printed."""
        last = self._status_printed.get(event.id)
        if last is None:
            return True
        fraction = (event.current - last[0]) / event.total if event.total else 0.0
        waited = (event.timestamp or 0.0) - last[1]
        return fraction >= STATUS_MIN_FRACTION or waited >= STATUS_MIN_INTERVAL


def _rfc3339(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def _drop_empty(item: dict[str, Any]) -> dict[str, Any]:
    """Leave out empty fields, as Go's `omitempty` does in BuildKit's JSON."""
    return {key: value for key, value in item.items() if value not in (None, "", [], False, 0)}


def solve_status_json(events: list[ProgressEvent]) -> dict[str, Any]:
    """Convert a batch into the JSON shape of BuildKit's `client.SolveStatus`."""
    status: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        if isinstance(event, VertexEvent):
            item = asdict(event)
            item["started"], item["completed"] = _rfc3339(event.started), _rfc3339(event.completed)
            status.setdefault("vertexes", []).append(_drop_empty(item))
        elif isinstance(event, StatusEvent):
            item = asdict(event)
            for key in ("timestamp", "started", "completed"):
                item[key] = _rfc3339(item[key])
            status.setdefault("statuses", []).append(_drop_empty(item) | {"id": event.id})
        elif isinstance(event, LogEvent):
            data = base64.b64encode(event.data).decode("ascii")
            item = {"vertex": event.vertex, "stream": event.stream, "data": data}
            item["timestamp"] = _rfc3339(event.timestamp)
            status.setdefault("logs", []).append(item)
        else:
            item = asdict(event)
            item["short"] = base64.b64encode(event.short.encode()).decode("ascii")
            item["detail"] = [base64.b64encode(d.encode()).decode("ascii") for d in event.detail]
            status.setdefault("warnings", []).append(_drop_empty(item))
    return status


class RawJSONRenderer(LockedRenderer):
    """Prints each batch as one line of JSON (`--progress rawjson`)."""

    def _render(self, events: list[ProgressEvent]) -> None:
        if events:
            self._stream.write(json.dumps(solve_status_json(events), separators=(",", ":")) + "\n")


def make_renderer(mode: str, stream: TextIO) -> Renderer:
    """Return the renderer for `--progress MODE` writing to `stream`.

    Raises UsageError for a mode not in PROGRESS_MODES.
    """
    if mode not in PROGRESS_MODES:
        raise UsageError(f"invalid --progress value: {mode!r}: use {', '.join(PROGRESS_MODES)}")
    if mode == "auto":
        mode = "tty" if stream.isatty() else "plain"
    if mode == "quiet":
        return QuietRenderer()
    if mode == "rawjson":
        return RawJSONRenderer(stream)
    if mode == "plain":
        return PlainRenderer(stream)
    # imported here because rich takes about 0.1 s to import and only this mode needs it
    from bkdbg.progress_tty import TtyRenderer

    return TtyRenderer(stream)

"""Tests for progress events, their JSON form and the renderers (no BuildKit needed)."""

import base64
import io
import json
import time

import pytest

from bkdbg.buildkit_proto import control_pb2
from bkdbg.errors import UsageError
from bkdbg.gateway.progress import StatusTracker, status_events
from bkdbg.progress import (
    LogEvent,
    PlainRenderer,
    QuietRenderer,
    RawJSONRenderer,
    StatusEvent,
    VertexEvent,
    WarningEvent,
    events_from_json,
    events_to_json,
    make_renderer,
)
from bkdbg.progress_tty import TtyRenderer

T0 = 1_700_000_000.0
FROM = "sha256:aaa"
RUN = "sha256:bbb"
COPY = "sha256:ccc"


def _run_step_events() -> list[list]:
    """Batches as BuildKit sends them for a cached FROM and a RUN that prints two lines."""
    return [
        [
            VertexEvent(FROM, "[1/2] FROM docker.io/library/busybox"),
            VertexEvent(RUN, "[2/2] RUN echo hi"),
        ],
        [
            VertexEvent(
                FROM, "[1/2] FROM docker.io/library/busybox", cached=True, started=T0, completed=T0
            )
        ],
        [VertexEvent(RUN, "[2/2] RUN echo hi", started=T0 + 0.1)],
        [LogEvent(RUN, 1, b"hi\nsecond ", T0 + 0.2)],
        [LogEvent(RUN, 1, b"part\n", T0 + 0.3)],
        [VertexEvent(RUN, "[2/2] RUN echo hi", started=T0 + 0.1, completed=T0 + 0.4)],
    ]


def _render_plain(batches: list[list]) -> str:
    out = io.StringIO()
    renderer = PlainRenderer(out, interval=0)
    for batch in batches:
        renderer.update(batch)
    renderer.close(True)
    return out.getvalue()


# --- JSON ----------------------------------------------------------------------------


def test_events_json_round_trip() -> None:
    events = [
        VertexEvent(RUN, "[2/2] RUN x", [FROM], False, T0, T0 + 1.5, "boom"),
        StatusEvent("sha256:layer", RUN, "extracting", 10, 20, T0, T0, None),
        LogEvent(RUN, 2, b"\x00\xffbinary\n", T0 + 0.25),
        WarningEvent(RUN, "JSON args recommended", 1, ["detail"], "https://example.invalid"),
    ]

    decoded = events_from_json(events_to_json(events))

    assert decoded == events


def test_events_from_json_rejects_unknown_type() -> None:
    with pytest.raises(ValueError, match="unknown progress event type"):
        events_from_json('[{"type": "bogus"}]')


# --- plain ---------------------------------------------------------------------------


def test_plain_renders_buildx_lines() -> None:
    text = _render_plain(_run_step_events())

    assert text.splitlines() == [
        "#1 [1/2] FROM docker.io/library/busybox",
        "#1 CACHED",
        "",
        "#2 [2/2] RUN echo hi",
        "#2 0.100 hi",
        "#2 0.200 second part",
        "#2 DONE 0.3s",
    ]


def test_plain_restarted_step_printed_once() -> None:
    # BuildKit ends `load build definition` and starts it again within a millisecond
    name = "[internal] load build definition from Dockerfile"
    batches = [
        [VertexEvent(FROM, name)],
        [VertexEvent(FROM, name, started=T0)],
        [VertexEvent(FROM, name, started=T0, completed=T0 + 0.0002)],
        [VertexEvent(FROM, name, started=T0 + 0.0003)],
        [VertexEvent(FROM, name, started=T0 + 0.0003, completed=T0 + 0.025)],
    ]
    out = io.StringIO()
    renderer = PlainRenderer(out, interval=60)  # every batch after the first is held
    for batch in batches:
        renderer.update(batch)
    renderer.close(True)

    assert out.getvalue().splitlines() == [f"#1 {name}", "#1 DONE 0.0s"]


def test_plain_held_batch_printed_after_interval() -> None:
    out = io.StringIO()
    renderer = PlainRenderer(out, interval=0.05)
    renderer.update([VertexEvent(RUN, "[2/2] RUN sleep 1")])
    renderer.update([VertexEvent(RUN, "[2/2] RUN sleep 1", started=T0)])

    first_output = out.getvalue()
    deadline = time.monotonic() + 5
    while out.getvalue() == first_output and time.monotonic() < deadline:
        time.sleep(0.01)

    assert first_output == ""
    assert out.getvalue() == "#1 [2/2] RUN sleep 1\n"
    renderer.close(True)


def test_plain_error_and_cancel() -> None:
    batches = [
        [VertexEvent(RUN, "[2/2] RUN exit 7", started=T0)],
        [VertexEvent(RUN, "[2/2] RUN exit 7", started=T0, completed=T0 + 1, error="exit code: 7")],
        [VertexEvent(COPY, "[3/3] COPY . /", started=T0)],
        [VertexEvent(COPY, "[3/3] COPY . /", started=T0, completed=T0, error="context canceled")],
    ]

    lines = _render_plain(batches).splitlines()

    assert "#1 ERROR: exit code: 7" in lines
    assert "#2 CANCELED" in lines


def test_plain_interrupted_steps_cancelled() -> None:
    out = io.StringIO()
    renderer = PlainRenderer(out, interval=0)
    renderer.update([VertexEvent(FROM, "[1/2] FROM busybox", started=T0, completed=T0)])
    renderer.update([VertexEvent(RUN, "[2/2] RUN sleep 30", started=T0)])
    renderer.update([LogEvent(RUN, 1, b"no newline yet", T0 + 0.5)])
    renderer.close(False, cancelled=True)

    lines = out.getvalue().splitlines()

    assert lines[-2].endswith(" no newline yet")
    assert lines[-1] == "#2 CANCELED"
    assert lines.count("#1 DONE 0.0s") == 1
    assert "#1 CANCELED" not in lines


def test_plain_switching_steps_marks_interruption() -> None:
    batches = [
        [VertexEvent(RUN, "run", started=T0), VertexEvent(COPY, "copy", started=T0)],
        [LogEvent(RUN, 1, b"from run\n", T0 + 1)],
        [LogEvent(COPY, 1, b"from copy\n", T0 + 1)],
    ]

    lines = _render_plain(batches).splitlines()

    assert lines == [
        "#1 run",
        "#1 ...",
        "",
        "#2 copy",
        "#2 ...",
        "",
        "#1 run",
        "#1 1.000 from run",
        "#1 ...",
        "",
        "#2 copy",
        "#2 1.000 from copy",
    ]


def test_plain_flushes_partial_line_on_close() -> None:
    batches = [[VertexEvent(RUN, "run", started=T0)], [LogEvent(RUN, 1, b"no newline", T0)]]

    assert _render_plain(batches).splitlines()[-1] == "#1 0.000 no newline"


def test_plain_status_and_warning() -> None:
    batches = [
        [VertexEvent(FROM, "[1/1] FROM img", started=T0)],
        [StatusEvent("sha256:1234", FROM, current=5, total=10, started=T0)],
        [StatusEvent("sha256:1234", FROM, current=10, total=10, started=T0, completed=T0 + 2)],
        [WarningEvent(FROM, "something odd")],
    ]

    lines = _render_plain(batches).splitlines()

    assert lines == [
        "#1 [1/1] FROM img",
        "#1 sha256:1234 5B / 10B",
        "#1 sha256:1234 10B / 10B 2.0s done",
        "#1 WARN: something odd",
    ]


def test_plain_silent_after_close() -> None:
    out = io.StringIO()
    renderer = PlainRenderer(out, interval=0)
    renderer.close(True)

    renderer.update([VertexEvent(RUN, "run", started=T0)])

    assert out.getvalue() == ""


# --- rawjson, quiet, tty -------------------------------------------------------------


def test_rawjson_one_object_per_batch() -> None:
    out = io.StringIO()
    renderer = RawJSONRenderer(out)
    for batch in _run_step_events():
        renderer.update(batch)
    renderer.close(True)

    lines = out.getvalue().splitlines()
    objects = [json.loads(line) for line in lines]
    assert len(objects) == len(_run_step_events())
    assert objects[1]["vertexes"][0]["cached"] is True
    assert objects[1]["vertexes"][0]["started"] == "2023-11-14T22:13:20Z"
    assert base64.b64decode(objects[3]["logs"][0]["data"]) == b"hi\nsecond "


def test_tty_leaves_summary_and_stops() -> None:
    out = io.StringIO()
    renderer = TtyRenderer(out)
    for batch in _run_step_events():
        renderer.update(batch)
    renderer.close(True)
    written = out.getvalue()

    renderer.update([VertexEvent(COPY, "late step", started=T0)])

    assert "FINISHED" in written
    assert "CACHED [1/2] FROM docker.io/library/busybox" in written
    assert "[2/2] RUN echo hi" in written
    assert out.getvalue() == written
    assert "late step" not in out.getvalue()


def test_tty_failed_summary_names_error_step() -> None:
    out = io.StringIO()
    renderer = TtyRenderer(out)
    renderer.update([VertexEvent(RUN, "[2/2] RUN exit 7", started=T0, completed=T0, error="x")])
    renderer.close(False)

    assert "FAILED" in out.getvalue()
    assert "ERROR [2/2] RUN exit 7" in out.getvalue()


def test_tty_interrupted_summary_cancelled() -> None:
    out = io.StringIO()
    renderer = TtyRenderer(out)
    renderer.update([VertexEvent(FROM, "[1/2] FROM busybox", started=T0, completed=T0)])
    renderer.update([VertexEvent(RUN, "[2/2] RUN sleep 30", started=T0)])
    renderer.close(False, cancelled=True)

    written = out.getvalue()

    assert "CANCELED [2/2] RUN sleep 30" in written
    assert "CANCELED [1/2]" not in written
    assert "Building" in written.splitlines()[-3]
    assert "CANCELED" in written.splitlines()[-3]


def test_make_renderer_modes() -> None:
    out = io.StringIO()  # not a terminal, so auto means plain

    assert isinstance(make_renderer("auto", out), PlainRenderer)
    assert isinstance(make_renderer("plain", out), PlainRenderer)
    assert isinstance(make_renderer("rawjson", out), RawJSONRenderer)
    assert isinstance(make_renderer("quiet", out), QuietRenderer)
    with pytest.raises(UsageError, match="invalid --progress value: 'fancy'"):
        make_renderer("fancy", out)


# --- Status stream -------------------------------------------------------------------


def _status_response() -> control_pb2.StatusResponse:
    response = control_pb2.StatusResponse()
    vertex = response.vertexes.add(digest=RUN, name="[2/2] RUN exit 7", error="exit code: 7")
    vertex.started.FromNanoseconds(int(T0 * 1e9))
    vertex.completed.FromNanoseconds(int((T0 + 1) * 1e9))
    for number in range(12):
        log = response.logs.add(vertex=RUN, stream=1, msg=f"line {number}\n".encode())
        log.timestamp.FromNanoseconds(int(T0 * 1e9))
    response.logs.add(vertex=RUN, stream=2, msg=b"tail without newline")
    return response


def test_status_events_convert_fields() -> None:
    events = status_events(_status_response())

    vertex = events[0]
    assert isinstance(vertex, VertexEvent)
    assert (vertex.started, vertex.completed, vertex.error) == (T0, T0 + 1, "exit code: 7")
    assert isinstance(events[1], LogEvent)
    assert events[1].timestamp == T0
    assert isinstance(events[-1], LogEvent)
    assert events[-1].timestamp is None


def test_tracker_keeps_failed_vertex_tail() -> None:
    received: list = []
    tracker = StatusTracker(received.extend)

    tracker.feed(_status_response())

    assert tracker.failed_vertex() == RUN
    assert tracker.vertex_name(RUN) == "[2/2] RUN exit 7"
    logs = tracker.vertex_logs(RUN)
    assert len(logs) == 10
    assert logs[0] == "line 3"
    assert logs[-1] == "tail without newline"
    assert tracker.wait_vertex_done(RUN, 0.01)
    assert len(received) == 14

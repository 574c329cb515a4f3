"""Show a build that the server runs: progress, then the failed step or the notes.

The server streams `BuildEvent`s: progress batches as JSON, then one `BuildDone`. The
client draws the progress with a `bkdbg.progress` renderer on stderr, as buildx does.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable, Iterable
from typing import TextIO

from bkdbg.daemon.messages import BuildDone, BuildEvent, BuildProgress
from bkdbg.errors import FailedStep
from bkdbg.progress import Renderer, events_from_json
from bkdbg.shell.terminal import sigint_deferred

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 10  # log lines of the failed step repeated under its block
RULE = "-" * 20
# BuildDone.error_kind when no BuildKit was reached (BuildkitLost when it went away later)
UNREACHABLE = "BuildkitUnreachable"


def follow_build(
    events: Iterable[BuildEvent], make_renderer: Callable[[], Renderer]
) -> BuildDone:
    """Render the progress of a build stream and return how it ended.

    A stream that ends without BuildDone counts as a failed build. On Ctrl-C the renderer
    shows the steps still running as cancelled, because the caller cancels the build.
    """
    result = BuildDone(ok=False, error="the server ended the build stream before the build ended")
    cancelled = False
    renderer: Renderer | None = None
    try:
        # a Ctrl-C while the renderer starts would skip its close, which restores the
        # terminal's echo and cursor, so it waits until `renderer` is set
        with sigint_deferred():
            renderer = make_renderer()
        for event in events:
            if isinstance(event, BuildProgress):
                renderer.update(events_from_json(event.events_json))
            else:
                result = event
    except KeyboardInterrupt:
        cancelled = True
        raise
    finally:
        if renderer is not None:
            renderer.close(result.ok, cancelled=cancelled)
    return result


def _source_lines(step: FailedStep) -> list[str]:
    # the gateway sends the excerpt already numbered and marked, as BuildKit prints it
    if step.source_lines:
        return list(step.source_lines)
    if step.instruction and step.line is not None:
        return [f" {step.line:3d} | >>> {step.instruction}"]
    return []


def failed_step_block(step: FailedStep, *, with_command: bool = True) -> list[str]:
    """Return the lines that describe a failed step, in the layout of buildx's error output.

    `with_command=False` leaves out the `command:` line, for when the hints show it.
    """
    lines: list[str] = []
    if step.vertex_name:
        lines += ["------", f" > {step.vertex_name}:"]
        lines += [f" {log}" for log in step.logs[-LOG_TAIL_LINES:]]
        lines.append("------")
    if step.filename and step.line is not None:
        lines += [f"{step.filename}:{step.line}", RULE, *_source_lines(step), RULE]
    elif step.instruction:
        lines.append(f"instruction: {step.instruction}")
    if step.command and with_command:
        lines.append(f"command: {shlex.join(step.command)}")
    if step.exit_code is not None:
        lines.append(f"exit code: {step.exit_code}")
    return lines


def debug_hint(step: FailedStep, *, monitor: bool = True) -> list[str]:
    """Return how to rerun the failed command and reach the state before it.

    Without `monitor` (a build through pipes, which has no monitor), the hints leave out
    the monitor's commands.
    """
    if not step.is_exec:
        line = "The failed step is not a RUN: the shell runs on the state BuildKit gave for it"
        return [f"{line}; type reload after fixing the Dockerfile." if monitor else f"{line}."]
    hint = ["The shell runs in the state the failed command left."]
    if step.command:
        hint.append(f"Run the command again: {shlex.join(step.command)}")
    if monitor:
        hint.append("rollback --init restarts the shell on the state before the command ran.")
    return hint


def print_result(
    result: BuildDone, out: TextIO, *, goes_on: bool = False, monitor: bool = True
) -> None:
    """Print the failed step block (if any) and the server's notes.

    When the session goes on after a failure (`goes_on`, or a shell started in the failed
    step's state), the block opens with the error itself, so the caller must not print it.
    Otherwise the caller ends with its `bkdbg: error:` line.
    """
    step = result.failed_step if not result.ok else None
    if error_shown(result, goes_on):
        print(result.error, file=out)
    if step is not None:
        hints = debug_hint(step, monitor=monitor) if result.process_id else []
        lines = failed_step_block(step, with_command=not hints) + hints
        for line in lines:
            print(line, file=out)
    for note in result.notes:
        print(note, file=out)
    out.flush()


def error_shown(result: BuildDone, goes_on: bool) -> bool:
    """Return True if print_result already printed the result's error.

    An unreachable BuildKit ends the session even where a failure would go on.
    """
    if result.error_kind == UNREACHABLE:
        return False
    return bool(result.error) and (goes_on or bool(result.process_id))

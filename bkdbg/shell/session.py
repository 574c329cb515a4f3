"""The client's flows after a build.

On a terminal the client attaches to the process, reports how that ended and opens the
monitor. On pipes it runs the process to its end and returns the process's status.
"""

from __future__ import annotations

import shlex
import signal

from bkdbg.errors import BkdbgError
from bkdbg.shell.attach import AttachEnd, AttachOutcome
from bkdbg.shell.workspace import Workspace

NEXT_STEPS = "type reload, rollback, exec or exit"
DISCONNECTED_PREFIX = "disconnected by client "  # the reason of `bkdbg disconnect`
EXIT_OUTPUT_CLOSED = 128 + signal.SIGPIPE  # what a shell reports for a writer without reader
TAKEN_OVER_LINE = (
    "another client took over this session; you are at the monitor prompt: attach takes it back"
)


def detach_hint(instance_id: str) -> str:
    """Return the line that shows how to return to a detached server."""
    return f"detached from server {instance_id}; it keeps running: bkdbg attach {instance_id}"


def closed_line(instance_id: str, reason: str) -> str:
    """Return the note printed when the server closed this client's connection."""
    # the server's reason names the other client by its internal id (`c2`), which the
    # user cannot act on
    if reason.startswith(DISCONNECTED_PREFIX):
        return (
            "disconnected by another bkdbg client (bkdbg disconnect); "
            f"bkdbg attach {instance_id} reattaches"
        )
    return f"server {instance_id} closed this client's connection: {reason}"


def exit_notice(process_id: str, args: list[str], code: int) -> str:
    """Return the one format of every note that a process ended."""
    command = f" ({shlex.join(args)})" if args else ""
    return f"Process {process_id}{command} exited with status {code}"


def exit_line(outcome: AttachOutcome) -> str:
    """Return the note printed when the interactive process ends."""
    return f"{exit_notice(outcome.process_id, outcome.args, outcome.code)}; {NEXT_STEPS}"


def report(ws: Workspace, outcome: AttachOutcome) -> int | None:
    """Print what ended an attachment; return an exit status when bkdbg should end.

    None means: go on at the monitor prompt.
    """
    current = ws.current
    instance_id = current.instance_id if current else "?"
    if outcome.end is AttachEnd.EXITED:
        if outcome.message:
            # the server's message gives the reason (released, command not found); no
            # `bkdbg: error:` prefix, because bkdbg goes on at the monitor prompt
            ws.say(f"process {outcome.process_id}: {outcome.message}")
        ws.say(exit_line(outcome))
        return None
    if ws.local.interactive:
        # the cursor is still where the process left it, often after its prompt
        ws.say("")
    if outcome.end is AttachEnd.TAKEN_OVER:
        ws.say(TAKEN_OVER_LINE)
        return None
    if outcome.end is AttachEnd.MONITOR:
        return None
    if outcome.end is AttachEnd.OUTPUT_CLOSED:
        # the local output lost its reader: leave the session, as a closed terminal does
        ws.leave(end_session=False)
        return EXIT_OUTPUT_CLOSED
    if outcome.end is AttachEnd.DETACH:
        ws.leave(end_session=False)
        ws.say(detach_hint(instance_id))
        return 0
    if outcome.end is AttachEnd.CLOSED:
        ws.forget(instance_id)
        ws.say(closed_line(instance_id, outcome.message))
        # 0 after a disconnect, as after a detach (the session goes on); 1 when the server ended
        return 0 if outcome.message.startswith(DISCONNECTED_PREFIX) else 1
    ws.forget(instance_id)
    ws.say(f"bkdbg: error: {outcome.message}")
    return 1


def enter(ws: Workspace, process_id: str, *, replay: bool = True) -> int | None:
    """Attach to a process and follow reloads and rollbacks that replace it.

    Returns an exit status when bkdbg should end, None to go to the monitor prompt.
    """
    while True:
        outcome = ws.attach(process_id, replay=replay)
        if outcome.end is AttachEnd.EXITED and outcome.replaced_by:
            # another client's reload or rollback replaced the process: follow it
            ws.say(f"Process {process_id} was replaced by {outcome.replaced_by}")
            process_id = outcome.replaced_by
            ws.require().process_id = process_id
            continue
        return report(ws, outcome)


def run_piped(ws: Workspace, process_id: str) -> int:
    """Forward stdin until EOF, print the output, and end with the process's status.

    The session ends with the process (the server shuts down unless another client is
    attached).
    """
    outcome = ws.attach(process_id)
    if outcome.end is AttachEnd.EXITED:
        if outcome.message:
            # the server's message gives the reason (released, command not found)
            ws.say(f"bkdbg: error: process {outcome.process_id}: {outcome.message}")
        final = ws.require().exit_status(outcome.code)
        if final != outcome.code:
            ws.say(f"bkdbg: the build failed, so bkdbg exits with status {final}")
        ws.leave(end_session=True)
        return final
    if outcome.end is AttachEnd.OUTPUT_CLOSED:
        # like a pipeline's writer whose reader is gone (`| head`): end quietly, with the
        # process, and with a shell's status for SIGPIPE
        ws.leave(end_session=True)
        return EXIT_OUTPUT_CLOSED
    status = report(ws, outcome)
    if ws.current is not None:
        ws.leave(end_session=False)
    return 1 if status is None else max(status, 1)


def launch_line(process_id: str) -> str:
    """Return the note printed before the terminal is attached to a process."""
    return f"Process {process_id}: Ctrl-a c switches to the monitor, Ctrl-a d detaches"


def interactive(ws: Workspace, process_id: str = "") -> int:
    """Attach the terminal to `process_id` (if any), then run the monitor until it ends."""
    if process_id:
        ws.say(launch_line(process_id))
        status = enter(ws, process_id)
        if status is not None:
            return status
    return run_monitor(ws)


def run_monitor(ws: Workspace) -> int:
    """Run the monitor prompt until exit or detach; return bkdbg's exit status."""
    # cmd2 and prompt_toolkit take a noticeable time to import, so only a client that
    # reaches the prompt pays for them
    from bkdbg.shell.monitor import Monitor

    monitor = Monitor(ws)
    try:
        return monitor.run()
    finally:
        monitor.close()


def finish_without_process(ws: Workspace, ok: bool) -> int:
    """End the session of a build that started no process; return 0 or 1."""
    try:
        ws.leave(end_session=True)
    except BkdbgError:
        if ok:
            raise
    return 0 if ok else 1

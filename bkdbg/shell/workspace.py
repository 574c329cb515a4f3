"""The client's state: which server is current, its interactive process, and the servers
this bkdbg process started.

The CLI and the monitor commands both act through a `Workspace`, so `bkdbg build` and the
monitor's `build` run the same code.
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from bkdbg.daemon.client import DaemonClient
from bkdbg.daemon.messages import BuildDone, BuildEvent, ProcessInfo
from bkdbg.errors import BkdbgError, NotAttached
from bkdbg.options import BuildOptions, TLSConfig
from bkdbg.progress import make_renderer
from bkdbg.shell.attach import AttachEnd, AttachOutcome, LocalIO, attach, run_collect
from bkdbg.shell.background import Expected
from bkdbg.shell.buildview import follow_build, print_result

logger = logging.getLogger(__name__)

NO_SERVER_HINT = "no current server: start one with build, or switch with attach ID"


@dataclass
class Current:
    """The server this client works with, and its interactive process."""

    client: DaemonClient
    process_id: str = ""
    last_exit: int = 0
    build_failed: bool = False  # the server's last build failed or was cancelled

    @property
    def instance_id(self) -> str:
        return self.client.instance_id

    def exit_status(self, code: int) -> int:
        """Return bkdbg's exit status when the session ends with a process's `code`.

        A failed build is not a success even when the shell in its failed step exits 0.
        buildx, likewise, returns the build's error once its debugger ends.
        """
        return 1 if code == 0 and self.build_failed else code


Launcher = Callable[[], DaemonClient]
SwitchListener = Callable[["Current | None"], None]


@dataclass
class Workspace:
    """Everything a client session needs: root, flags, local I/O, the current server.

    `expected` contains the server events this client caused and already showed, so the
    monitor does not show them a second time.
    """

    root: Path
    debug: bool = False
    local: LocalIO = field(default_factory=LocalIO)
    err: TextIO | None = None  # None: sys.stderr at the time of writing
    addr: str | None = None
    tls: TLSConfig | None = None
    current: Current | None = None
    launched: list[str] = field(default_factory=list)
    launcher: Launcher | None = None
    expected: Expected = field(default_factory=Expected)
    switch_listeners: list[SwitchListener] = field(default_factory=list)

    def say(self, line: str) -> None:
        """Print a status line for the user (on stderr, so stdout keeps only process output)."""
        print(line, file=self.err_stream, flush=True)

    @property
    def err_stream(self) -> TextIO:
        """The stream for progress and status lines."""
        return self.err or sys.stderr

    def require(self) -> Current:
        """Return the current server, or raise NotAttached saying how to get one."""
        if self.current is None:
            raise NotAttached(NO_SERVER_HINT)
        return self.current

    # -- servers

    def launch(self) -> Current:
        """Start a new server, make it current, and remember that this client started it."""
        if self.launcher is not None:
            client = self.launcher()
        else:
            client = DaemonClient.launch(self.root, self.debug)
        self.launched.append(client.instance_id)
        self._set_current(Current(client))
        return self.require()

    def connect(self, instance_id: str) -> Current:
        """Connect to a running server and make it current."""
        client = DaemonClient.connect(self.root, instance_id)
        info = client.info()
        self._set_current(
            Current(
                client,
                info.current_process,
                info.last_exit_code,
                build_failed=failed_state(info.build_state),
            )
        )
        return self.require()

    def _set_current(self, current: Current | None) -> None:
        previous, self.current = self.current, current
        for listener in self.switch_listeners:
            listener(current)
        if previous is not None and (current is None or previous.client is not current.client):
            _say_goodbye(previous, end_session=False)

    def leave(self, *, end_session: bool) -> None:
        """Leave the current server; with `end_session` it stops once no client remains."""
        previous = self.current
        if previous is None:
            return
        self.current = None
        for listener in self.switch_listeners:
            listener(None)
        _say_goodbye(previous, end_session=end_session)

    def forget(self, instance_id: str) -> None:
        """Drop the current server without talking to it (it was killed or is gone)."""
        if self.current is None or self.current.instance_id != instance_id:
            return
        client, self.current = self.current.client, None
        for listener in self.switch_listeners:
            listener(None)
        client.close(say_goodbye=False)

    # -- builds and processes

    def build(
        self, options: BuildOptions, *, goes_on: bool = False, monitor: bool = True
    ) -> BuildDone:
        """Start a server, run the build in it and show its progress and result.

        `goes_on` says that the session continues after a failed build, so the error
        opens the failure's block (see `print_result`). `monitor=False` leaves the
        monitor's commands out of the hints, for a build through pipes.
        """
        current = self.launch()
        events = current.client.build(options)
        return self._show_build(
            current, events, options.progress, goes_on=goes_on, monitor=monitor
        )

    def reload(self) -> BuildDone:
        """Rebuild in the current server and show it."""
        current = self.require()
        running = self._running_processes(current)
        replaced = current.process_id
        try:
            done = self._show_build(current, current.client.reload(), "auto")
        except KeyboardInterrupt:
            # the server ended the old container as the reload began
            self._say_replaced(running, replaced, "", "reload")
            raise
        self._say_replaced(running, replaced, done.process_id, "reload")
        return done

    def _show_build(
        self,
        current: Current,
        events: Iterable[BuildEvent],
        progress: str,
        *,
        goes_on: bool = False,
        monitor: bool = True,
    ) -> BuildDone:
        try:
            done = follow_build(events, lambda: make_renderer(progress, self.err_stream))
        except KeyboardInterrupt:
            # Ctrl-C cancels the build, as in buildx, rather than leaving it running
            self._cancel_build(current)
            raise
        self.expected.add("build-finished", done.process_id)
        print_result(done, self.err_stream, goes_on=goes_on, monitor=monitor)
        current.build_failed = not done.ok
        if done.process_id:
            self._started(current, done.process_id, interactive=True)
        return done

    def _cancel_build(self, current: Current) -> None:
        # the caller reports the cancel, so the server's build-finished event is not news
        self.expected.add("build-finished", "")
        cancelled = False
        try:
            cancelled = current.client.cancel_build()
        except BkdbgError as exc:
            logger.warning("cancelling the build of server %s failed: %s", current.instance_id, exc)
        if cancelled:
            current.build_failed = True
        else:
            self.expected.take("build-finished", "")

    def _started(self, current: Current, process_id: str, *, interactive: bool) -> None:
        self.expected.add("process-started", process_id)
        if interactive:
            # `exit` gives this process's status, not the one of the process it replaced
            current.process_id, current.last_exit = process_id, 0

    def rollback(self, init: bool) -> str:
        """Restart the interactive process; return its id."""
        current = self.require()
        running = self._running_processes(current)
        replaced = current.process_id
        process_id = current.client.rollback(init)
        self._started(current, process_id, interactive=True)
        self._say_replaced(running, replaced, process_id, "rollback")
        return process_id

    def _running_processes(self, current: Current) -> list[ProcessInfo]:
        try:
            return [p for p in current.client.list_processes() if p.state == "running"]
        except BkdbgError as exc:
            logger.info("listing the processes of server %s failed: %s", current.instance_id, exc)
            return []

    def _say_replaced(
        self, running: list[ProcessInfo], replaced: str, new_id: str, command: str
    ) -> None:
        """Report the processes that reload or rollback ended with the old container.

        Their exits are expected, so the monitor does not announce them as server events.
        """
        for process in running:
            if process.id == new_id:
                continue
            self.expected.add("process-exited", process.id)
            if process.id == replaced and new_id:
                self.say(f"Process {process.id} was replaced by {new_id} ({command})")
            else:
                self.say(
                    f"Process {process.id} ({shlex.join(process.args)}) was ended by {command}"
                )

    def exec(self, args: list[str], *, env: list[str], user: str, cwd: str, tty: bool) -> str:
        """Start a process in the current container; return its id."""
        current = self.require()
        process_id = current.client.exec(args, env=env, user=user, cwd=cwd, tty=tty)
        self._started(current, process_id, interactive=False)
        return process_id

    def attach(self, process_id: str, *, replay: bool = True) -> AttachOutcome:
        """Attach the local terminal or pipes to a process of the current server."""
        current = self.require()
        outcome = attach(current.client, process_id, self.local, replay=replay)
        self._ended(current, outcome)
        return outcome

    def collect(self, process_id: str) -> AttachOutcome:
        """Run a process to its end without stdin, its output on the local fds."""
        current = self.require()
        outcome = run_collect(current.client, process_id, self.local)
        self._ended(current, outcome)
        return outcome

    def _ended(self, current: Current, outcome: AttachOutcome) -> None:
        if outcome.end is not AttachEnd.EXITED:
            return
        self.expected.add("process-exited", outcome.process_id)
        if outcome.process_id == current.process_id:
            current.last_exit = outcome.code


def failed_state(build_state: str) -> bool:
    """Tell whether a server's build state (ServerInfo.build_state) is a failed build."""
    return build_state in ("failed", "cancelled")


def _say_goodbye(current: Current, *, end_session: bool) -> None:
    try:
        current.client.goodbye(end_session=end_session)
    except BkdbgError as exc:
        logger.warning("goodbye to server %s failed: %s", current.instance_id, exc)
    finally:
        current.client.close(say_goodbye=False)

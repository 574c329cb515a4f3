"""The monitor: the `(bkdbg) ` prompt, a cmd2 application.

The commands live in command sets, one module per group (`cmd_build`, `cmd_process`,
`cmd_server`); this module contains the application: errors, exit and detach, history,
server events shown above the prompt, and the completion cache.

A command that fails prints `<command>: <message>` and returns to the prompt. In a
script (`run-script`) the same line starts with `FILE:LINE: `, and `failed` tells the
script runner to stop.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import threading
from pathlib import Path
from typing import Any, NoReturn

import cmd2
import platformdirs
from cmd2 import Cmd2ArgumentParser, Completions, Statement, with_argparser
from cmd2.argparse_completer import ArgparseCompleter
from cmd2.parsing import shlex_split
from cmd2.plugin import PostcommandData, PrecommandData
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

from bkdbg.errors import BkdbgError
from bkdbg.shell.background import EventWatcher, IdCache
from bkdbg.shell.session import NEXT_STEPS, closed_line, detach_hint, exit_notice
from bkdbg.shell.workspace import Current, Workspace

logger = logging.getLogger(__name__)

PROMPT = "(bkdbg) "
CATEGORY = "Debugging"
# cmd2 commands that do not belong in a debugger prompt: they run programs or scripts on
# this machine, which `exec` in the container and `bkdbg run-script` do instead
HIDDEN_BUILTINS = (
    "shell", "edit", "run_pyscript", "run_script", "quit", "alias", "macro", "set", "shortcuts",
)
UNKNOWN_COMMAND = "unknown command: type help to list the commands"

_parse_errors = threading.local()


class FlagsOnRequestCompleter(ArgparseCompleter):
    """A completer that offers flags only once a `-` is typed.

    cmd2 4.3's completer offers the flags for an empty word when no positional is left,
    so TAB after `reload ` typed `reload -h`.

    NOTE: this overrides a private method of cmd2 4.3's ArgparseCompleter.
    """

    def _complete_flags(
        self, text: str, line: str, begidx: int, endidx: int, used_flags: set[str]
    ) -> Completions:
        if not text:
            return Completions()
        return super()._complete_flags(text, line, begidx, endidx, used_flags)


class MonitorParser(Cmd2ArgumentParser):
    """An argument parser whose errors become one `<command>: <message>` line.

    cmd2's parser prints the usage and an `Error:` line itself; this one only keeps the
    message for `Monitor.onecmd`, which prints it with the command name (and the script
    line in run-script). `<command> -h` still shows the usage.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("completer_class", FlagsOnRequestCompleter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        _parse_errors.last = message
        # cmd2's with_argparser turns SystemExit into Cmd2ArgparseError
        raise SystemExit(2)


def _run_typed(command: str, event: KeyPressEvent) -> None:
    """Replace the prompt's text with `command` and run it, as if typed."""
    event.current_buffer.text = command
    event.current_buffer.validate_and_handle()


def history_file() -> Path:
    """Return the monitor's history file, in platformdirs' user state dir."""
    return Path(platformdirs.user_state_dir("bkdbg")) / "history"


class Monitor(cmd2.Cmd):
    """The `(bkdbg) ` prompt over a Workspace.

    `batch` (run-script) turns off the history file and the server events, and makes
    commands that would take the terminal print their output instead.
    """

    DEFAULT_PROMPT = PROMPT

    def __init__(
        self,
        ws: Workspace,
        *,
        batch: bool = False,
        history: Path | None = None,
        **cmd2_args: Any,
    ) -> None:
        from bkdbg.shell.cmd_build import BuildCommands
        from bkdbg.shell.cmd_process import ProcessCommands
        from bkdbg.shell.cmd_server import ServerCommands

        # run-script keeps no history, so that scripts do not fill the user's
        history_path = "" if batch else str(history or history_file())
        super().__init__(
            allow_cli_args=False,
            persistent_history_file=history_path,
            command_sets=[BuildCommands(), ProcessCommands(), ServerCommands()],
            suggest_similar_command=True,
            **cmd2_args,
        )
        self.ws = ws
        self.batch = batch
        self.failed = False
        self.error_prefix = ""
        self.hidden_commands.extend(HIDDEN_BUILTINS)
        # the cmd2 commands that remain are listed with bkdbg's own
        cmd2.categorize((cmd2.Cmd.do_help, cmd2.Cmd.do_history), CATEGORY)
        self.cache = IdCache(self._server_ids, self._process_ids)
        self._watcher: EventWatcher | None = None
        self._idle = threading.Event()
        self._lost = ""
        self._lost_status = 1
        self.register_precmd_hook(self._before_command)
        self.register_postcmd_hook(self._after_command)
        ws.switch_listeners.append(self._on_switch)
        if not batch:
            self._bind_escape()

    def _bind_escape(self) -> None:
        """Bind the escape keys at the prompt as in a process: `Ctrl-a c` goes back to
        the process and `Ctrl-a d` detaches."""
        bindings = self.main_session.key_bindings
        if not isinstance(bindings, KeyBindings):
            return
        for key, command in (("c", "attach"), ("d", "detach")):
            bindings.add("c-a", key)(functools.partial(_run_typed, command))

    # -- running

    @property
    def interactive(self) -> bool:
        """True when commands may take the terminal: at a prompt on a terminal, not in a script."""
        return not self.batch and self.ws.local.interactive

    def run(self) -> int:
        """Run the prompt until exit or detach; return the exit status."""
        self.cache.start()
        self._on_switch(self.ws.current)
        return self.cmdloop()

    def close(self) -> None:
        """Stop the background threads and save the history."""
        self.cache.stop()
        self._stop_watching()
        self.ws.switch_listeners.remove(self._on_switch)
        # cmd2 saves it only at interpreter exit (atexit); saving now keeps it when this
        # process is later killed, e.g. while attached to a container again
        self._persist_history()
        if self.persistent_history_file:
            # typed commands can name hosts and files; keep them private like the logs
            with contextlib.suppress(OSError):
                os.chmod(self.persistent_history_file, 0o600)

    def pre_prompt(self) -> None:
        self._idle.set()

    def _before_command(self, data: PrecommandData) -> PrecommandData:
        self._idle.clear()
        self.failed = False
        return data

    def _after_command(self, data: PostcommandData) -> PostcommandData:
        self.cache.refresh_soon()
        if self._lost and not data.stop:
            data.stop = self._stop_lost()
        return data

    # -- errors

    def fail(self, command: str, message: str) -> None:
        """Report a failed command as `<command>: <message>` and mark it failed."""
        self.failed = True
        self.perror(f"{self.error_prefix}{command}: {message}")

    def onecmd_plus_hooks(
        self,
        line: str,
        *,
        add_to_history: bool = True,
        raise_keyboard_interrupt: bool = False,
        py_bridge_call: bool = False,
    ) -> bool:
        """Run one line; a line whose quotes do not close fails as `<command>: <message>`.

        cmd2 prints its own `Invalid syntax` line for such a line, without the command
        or a script's `FILE:LINE:`, and without marking it failed, so a script went on.
        """
        try:
            shlex_split(line)  # the split of cmd2's statement parser
        except ValueError as exc:
            words = line.split(maxsplit=1)
            reason = str(exc).lower()  # shlex's "No closing quotation"
            self.fail(words[0] if words else "", f"invalid line: {reason}: close the quote")
            return False
        return super().onecmd_plus_hooks(
            line,
            add_to_history=add_to_history,
            raise_keyboard_interrupt=raise_keyboard_interrupt,
            py_bridge_call=py_bridge_call,
        )

    def onecmd(self, statement: Statement | str, *, add_to_history: bool = True) -> bool:
        """Run one command; a BkdbgError becomes a `<command>: <message>` line."""
        _parse_errors.last = None
        command = statement.command if isinstance(statement, Statement) else str(statement)
        try:
            return super().onecmd(statement, add_to_history=add_to_history)
        except cmd2.Cmd2ArgparseError:
            if _parse_errors.last is not None:
                self.fail(command, _parse_errors.last)
            raise
        except BkdbgError as exc:
            logger.info("%s failed: %s", command, exc, exc_info=self.ws.debug)
            self.fail(command, str(exc))
            return False

    def default(self, statement: Statement) -> bool | None:
        """Report an unknown command and point to help."""
        self.fail(statement.command, UNKNOWN_COMMAND)
        return None

    # -- leaving

    def stop_with(self, status: int) -> bool:
        """End the prompt with exit status `status` (return this from a command)."""
        self.exit_code = status
        return True

    @with_argparser(lambda: MonitorParser(description="End the debugging session."))
    @cmd2.with_category(CATEGORY)
    def do_exit(self, _args: argparse.Namespace) -> bool:
        """End the session: stop the server, exit with the interactive process's status.

        The status is 0 while the current interactive process runs, and 1 instead of 0
        when the last build failed.
        """
        current = self.ws.current
        status = current.exit_status(current.last_exit) if current else 0
        if current is not None and status != current.last_exit:
            self.perror(
                f"bkdbg: the last build did not succeed, so bkdbg exits with status {status}"
            )
        self.ws.leave(end_session=True)
        return self.stop_with(status)

    @with_argparser(lambda: MonitorParser(description="End the debugging session (as exit)."))
    def do_quit(self, args: argparse.Namespace) -> bool:
        """End the debugging session, as exit does."""
        return bool(self.do_exit(""))

    @with_argparser(lambda: MonitorParser(description="Leave; the server keeps running."))
    @cmd2.with_category(CATEGORY)
    def do_detach(self, _args: argparse.Namespace) -> bool:
        """Leave with the server running; print the command that comes back to it."""
        current = self.ws.current
        if current is not None:
            self.ws.leave(end_session=False)
            self.poutput(detach_hint(current.instance_id))
        return self.stop_with(0)

    @with_argparser(lambda: MonitorParser(description="End of input (Ctrl-D): detach."))
    def do__eof(self, _args: argparse.Namespace) -> bool:
        """Detach at end of input (Ctrl-D), so that no work is lost by accident."""
        self.poutput("")
        if self._lost:
            return self._stop_lost()
        return bool(self.do_detach(""))

    # -- server events

    def _on_switch(self, current: Current | None) -> None:
        """Watch the events of the new current server instead of the old one's."""
        self._stop_watching()
        if self.batch or current is None:
            return
        self._lost = ""
        self._watcher = EventWatcher(
            current.client.events(),
            self._show_event,
            functools.partial(self._on_lost, current.instance_id),
        )
        self._watcher.start()

    def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def _show_event(self, event: Any) -> None:
        # decide once this client is back at the prompt, when the events it caused
        # itself are all in `expected`
        self._idle.wait()
        if self.ws.expected.take(event.kind, event.process_id):
            return
        if event.kind == "disconnected":
            # the server dropped this client, as it does an attached one, which exits
            self._leave_prompt(self._event_line(event), status=0)
            return
        self.add_alert(msg=self._event_line(event))

    def _event_line(self, event: Any) -> str:
        """Return the alert line for a server event, with a process exit in the client's format."""
        current = self.ws.current
        if event.kind == "disconnected" and current is not None:
            return closed_line(current.instance_id, str(event.message))
        if event.kind != "process-exited" or current is None:
            return str(event.message or f"server event: {event.kind}")
        try:
            processes = current.client.list_processes()
        except BkdbgError as exc:
            logger.info("listing processes for an exit notice failed: %s", exc)
            return str(event.message)
        process = next((p for p in processes if p.id == event.process_id), None)
        if process is None:
            return str(event.message)
        line = exit_notice(process.id, list(process.args), process.exit_code)
        return f"{line}; {NEXT_STEPS}" if process.id == current.process_id else line

    def _on_lost(self, instance_id: str, reason: str) -> None:
        if not self._lost:  # a disconnect ends the event stream too, after its own line
            self._leave_prompt(f"lost the connection to server {instance_id}: {reason}", 1)

    def _leave_prompt(self, line: str, status: int) -> None:
        """End the prompt from a background thread; bkdbg prints `line` and exits `status`."""
        self._lost, self._lost_status = line, status
        app = self.main_session.app
        if app.is_running and app.loop is not None:
            # leave the prompt as if Ctrl-D was typed; do__eof then reports it
            app.loop.call_soon_threadsafe(lambda: app.exit(exception=EOFError()))

    def _stop_lost(self) -> bool:
        self.perror(self._lost)
        current = self.ws.current
        if current is not None:
            self.ws.forget(current.instance_id)
        return self.stop_with(self._lost_status)

    # -- completion cache

    def _server_ids(self) -> list[str]:
        from bkdbg.shell.servers import server_ids

        return server_ids(self.ws)

    def _process_ids(self) -> list[str]:
        current = self.ws.current
        if current is None:
            return []
        return [process.id for process in current.client.list_processes()]

"""Monitor commands that make builds and restart the interactive process: build, reload,
rollback.
"""

from __future__ import annotations

import argparse
import sys
import termios
from typing import TextIO

import cmd2
from cmd2 import with_argparser

from bkdbg.daemon.messages import BuildDone
from bkdbg.shell import session
from bkdbg.shell.buildflags import add_build_arguments, build_options, tls_config
from bkdbg.shell.monitor import CATEGORY, Monitor, MonitorParser


class BuildCommands(cmd2.CommandSet[Monitor]):
    """build, reload and rollback."""

    DEFAULT_CATEGORY = CATEGORY

    def sigint_handler(self) -> bool:
        """Raise KeyboardInterrupt for Ctrl-C, with a newline only after an echoed ^C.

        cmd2's own handler always writes a newline first. While the live progress view
        is drawn the terminal does not echo, and that newline would move the cursor under
        the view, so that its last redraw left the view's first line behind.
        """
        if _echoes(sys.stdin):
            self._cmd.poutput()
        raise KeyboardInterrupt

    def _cancelled(self, command: str) -> bool:
        self._cmd.fail(command, "cancelled with Ctrl-C: type reload to build again")
        return False

    def _after_build(self, command: str, result: BuildDone) -> bool:
        """Attach to the process a build started, or report the build's failure.

        A failed build that started a process in the failed step's state is a success of
        the command: debugging that state is what `--on error` asked for.
        """
        app = self._cmd
        if result.process_id:
            return self._enter(result.process_id)
        if not result.ok or result.error:
            app.fail(command, result.error or "the build failed")
        return False

    def _enter(self, process_id: str) -> bool:
        app = self._cmd
        if not app.interactive:
            app.poutput(f"started process {process_id}")
            return False
        status = session.enter(app.ws, process_id)
        return False if status is None else app.stop_with(status)

    # -- build

    @staticmethod
    def _build_parser() -> MonitorParser:
        parser = MonitorParser(
            description="Build CONTEXT in a new server and make that server current."
        )
        add_build_arguments(parser, {"completer": cmd2.Cmd.path_complete})
        _add_address_arguments(parser)
        return parser

    @with_argparser(_build_parser)
    def do_build(self, args: argparse.Namespace) -> bool:
        """Build a context in a new server (the flags of bkdbg build) and make it current."""
        app = self._cmd
        options = build_options(args, tty=True)
        previous = app.ws.current
        if previous is not None:
            app.poutput(
                f"server {previous.instance_id} keeps running: "
                f"bkdbg kill {previous.instance_id} stops it"
            )
        options.addr = args.addr or app.ws.addr
        options.tls = tls_config(args) or app.ws.tls
        try:
            result = app.ws.build(options)
        except KeyboardInterrupt:
            return self._cancelled("build")
        return self._after_build("build", result)

    # -- reload

    @staticmethod
    def _reload_parser() -> MonitorParser:
        return MonitorParser(
            description="Read the context again, rebuild with the same options and restart "
            "the interactive process on the new result."
        )

    @with_argparser(_reload_parser)
    def do_reload(self, _args: argparse.Namespace) -> bool:
        """Rebuild with the same options and restart the interactive process on the result."""
        try:
            result = self._cmd.ws.reload()
        except KeyboardInterrupt:
            return self._cancelled("reload")
        return self._after_build("reload", result)

    # -- rollback

    @staticmethod
    def _rollback_parser() -> MonitorParser:
        parser = MonitorParser(
            description="Restart the interactive process on the unchanged build result, "
            "dropping the changes made in the container."
        )
        parser.add_argument(
            "--init",
            action="store_true",
            help="after a failed step: start from the state before the failed command ran",
        )
        return parser

    @with_argparser(_rollback_parser)
    def do_rollback(self, args: argparse.Namespace) -> bool:
        """Restart the interactive process on the build result, dropping container changes."""
        process_id = self._cmd.ws.rollback(args.init)
        return self._enter(process_id)


def _add_address_arguments(parser: MonitorParser) -> None:
    """Let a script's `build` line name its BuildKit, as `bkdbg --addr ... build` does."""
    parser.add_argument(
        "--addr", metavar="ADDRESS", help="BuildKit address (default: the one bkdbg started with)"
    )
    parser.add_argument("--tlscacert", metavar="FILE", help="CA certificate for TLS (tcp:// only)")
    parser.add_argument("--tlscert", metavar="FILE", help="client certificate for TLS")
    parser.add_argument("--tlskey", metavar="FILE", help="client key for TLS")
    parser.add_argument(
        "--tlsservername", metavar="NAME", help="server name expected in BuildKit's certificate"
    )


def _echoes(stream: TextIO) -> bool:
    """Tell whether `stream` is a terminal that echoes typed keys (so it showed ^C)."""
    try:
        return bool(termios.tcgetattr(stream.fileno())[3] & termios.ECHO)
    except (OSError, ValueError, termios.error):
        return False

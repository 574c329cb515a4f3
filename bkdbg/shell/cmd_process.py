"""Monitor commands for container processes: exec, ps, attach."""

from __future__ import annotations

import argparse
import shlex

import cmd2
from cmd2 import Choices, CompletionError, with_argparser

from bkdbg.errors import UsageError
from bkdbg.options import parse_key_value
from bkdbg.shell import session
from bkdbg.shell.attach import AttachEnd
from bkdbg.shell.monitor import CATEGORY, Monitor, MonitorParser
from bkdbg.shell.tables import ProcessRow, process_table


def cached_choices(ids: list[str], error: str | None, subject: str) -> Choices:
    """Return completion choices from the cache; raise CompletionError if it cannot load."""
    if not ids and error:
        raise CompletionError(f"cannot list {subject}: {error}")
    return Choices.from_values(ids)


class ProcessCommands(cmd2.CommandSet[Monitor]):
    """exec, ps and attach."""

    DEFAULT_CATEGORY = CATEGORY

    # -- completion

    def process_choices(self) -> Choices:
        cache = self._cmd.cache
        return cached_choices(cache.processes(), cache.error("processes"), "processes")

    def attach_choices(self) -> Choices:
        cache = self._cmd.cache
        ids = cache.processes() + cache.servers()
        return cached_choices(ids, cache.error("servers"), "processes and servers")

    # -- exec

    @staticmethod
    def _exec_parser() -> MonitorParser:
        parser = MonitorParser(
            description="Start a process in the current container. At the prompt the "
            "terminal is attached to it; in a script its output is printed and a non-zero "
            "exit status fails the script."
        )
        parser.add_argument("--tty", action="store_true", help="give the process a terminal")
        parser.add_argument(
            "--env",
            metavar="K=V",
            action="append",
            default=[],
            help="set an environment variable (repeatable)",
        )
        parser.add_argument("--user", metavar="USER", default="", help="user to run as")
        parser.add_argument("--cwd", metavar="DIR", default="", help="working directory")
        parser.add_argument(
            "argv",
            metavar="CMD [ARG ...]",
            nargs=argparse.REMAINDER,
            help="program to run and its arguments (options of exec go before CMD)",
        )
        return parser

    @with_argparser(_exec_parser)
    def do_exec(self, args: argparse.Namespace) -> bool:
        """Start a process in the current container (interactive at the prompt)."""
        app = self._cmd
        if not args.argv:
            raise UsageError("missing CMD: give the program to run, e.g. exec ls -l /")
        env = [_env_item(item) for item in args.env]
        argv = list(args.argv)
        tty = args.tty and app.interactive
        process_id = app.ws.exec(argv, env=env, user=args.user, cwd=args.cwd, tty=tty)
        if app.interactive:
            status = session.enter(app.ws, process_id)
            return False if status is None else app.stop_with(status)
        return self._collect(process_id, argv)

    def _collect(self, process_id: str, argv: list[str]) -> bool:
        app = self._cmd
        app.stdout.flush()
        outcome = app.ws.collect(process_id)
        if outcome.end is not AttachEnd.EXITED:
            app.fail("exec", f"process {process_id} ({shlex.join(argv)}): {outcome.message}")
        elif outcome.code != 0:
            app.fail(
                "exec",
                f"process {process_id} ({shlex.join(argv)}) exited with status {outcome.code}",
            )
        return False

    # -- ps

    @staticmethod
    def _ps_parser() -> MonitorParser:
        return MonitorParser(description="List the processes of the current server.")

    @with_argparser(_ps_parser)
    def do_ps(self, _args: argparse.Namespace) -> None:
        """List the current server's processes: ID, CURRENT, COMMAND, STATE, STATUS."""
        client = self._cmd.ws.require().client
        rows = [
            ProcessRow(p.id, list(p.args), p.state, p.exit_code, p.current)
            for p in client.list_processes()
        ]
        for line in process_table(rows):
            self._cmd.poutput(line)

    # -- attach

    @staticmethod
    def _attach_parser() -> MonitorParser:
        parser = MonitorParser(
            description="Attach the terminal to a process of the current server, or switch "
            "to another server (ID from list) and attach to its interactive process."
        )
        parser.add_argument(
            "id",
            metavar="ID",
            nargs="?",
            default="",
            choices_provider=ProcessCommands.attach_choices,
            help="process id (from ps) or server id (from list); default: the interactive process",
        )
        return parser

    @with_argparser(_attach_parser)
    def do_attach(self, args: argparse.Namespace) -> bool:
        """Attach the terminal to a process, or switch to another server."""
        app = self._cmd
        target = args.id
        if target and not _is_process(app, target):
            current = app.ws.connect(target)
            app.poutput(f"switched to server {current.instance_id}")
            if not app.interactive:
                return False
            target = current.process_id
            if not target:
                app.poutput("no interactive process there: type rollback, exec or reload")
                return False
        target = target or app.ws.require().process_id
        if not target:
            raise UsageError("no interactive process: type rollback or exec CMD to start one")
        if not app.interactive:
            raise UsageError("a process needs a terminal to attach to: use exec in scripts")
        status = session.enter(app.ws, target)
        return False if status is None else app.stop_with(status)


def _is_process(app: Monitor, target: str) -> bool:
    current = app.ws.current
    if current is None:
        return False
    return any(process.id == target for process in current.client.list_processes())


def _env_item(value: str) -> str:
    key, val = parse_key_value(value, "--env")
    return f"{key}={val}"

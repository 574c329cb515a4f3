"""Monitor commands for servers: list, kill, disconnect."""

from __future__ import annotations

import argparse

import cmd2
from cmd2 import Choices, with_argparser

from bkdbg.shell import servers
from bkdbg.shell.cmd_process import cached_choices
from bkdbg.shell.monitor import CATEGORY, Monitor, MonitorParser


class ServerCommands(cmd2.CommandSet[Monitor]):
    """list, kill and disconnect."""

    DEFAULT_CATEGORY = CATEGORY

    def server_choices(self) -> Choices:
        cache = self._cmd.cache
        return cached_choices(cache.servers(), cache.error("servers"), "servers")

    # -- list

    @staticmethod
    def _list_parser() -> MonitorParser:
        return MonitorParser(description="List the bkdbg servers of this user.")

    @with_argparser(_list_parser)
    def do_list(self, _args: argparse.Namespace) -> None:
        """List the servers: ID, PID, STARTED, BUILD, CLIENTS, CURRENT."""
        for line in servers.list_lines(self._cmd.ws):
            self._cmd.poutput(line)

    # -- kill

    @staticmethod
    def _kill_parser() -> MonitorParser:
        parser = MonitorParser(
            description="Stop a server at once: release its containers, cancel its build, "
            "remove its directory."
        )
        _add_server_id(parser)
        return parser

    @with_argparser(_kill_parser)
    def do_kill(self, args: argparse.Namespace) -> None:
        """Stop a server (default: the current one) and remove its directory."""
        ws = self._cmd.ws
        instance_id = args.id or servers.default_instance(ws)
        self._cmd.poutput(servers.kill(ws, instance_id))

    # -- disconnect

    @staticmethod
    def _disconnect_parser() -> MonitorParser:
        parser = MonitorParser(
            description="Disconnect every other client from a server; the server keeps running."
        )
        _add_server_id(parser)
        return parser

    @with_argparser(_disconnect_parser)
    def do_disconnect(self, args: argparse.Namespace) -> None:
        """Disconnect the other clients of a server (default: the current one)."""
        ws = self._cmd.ws
        instance_id = args.id or servers.default_instance(ws)
        self._cmd.poutput(servers.disconnect(ws, instance_id))


def _add_server_id(parser: MonitorParser) -> None:
    """Add the optional server ID argument, completed from the server cache."""
    parser.add_argument(
        "id",
        metavar="ID",
        nargs="?",
        default="",
        choices_provider=ServerCommands.server_choices,
        help="server id from list (default: the current server)",
    )

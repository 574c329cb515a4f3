"""bkdbg's command line: the parser of `bkdbg COMMAND ...` and its global flags.

`bkdbg.commands` gives it the function that runs each command.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from bkdbg import __version__
from bkdbg.shell.buildflags import add_build_arguments

if TYPE_CHECKING:
    from bkdbg.shell.workspace import Workspace

Handler = Callable[[argparse.Namespace, "Workspace"], int]

ADDR_HELP = (
    "BuildKit address: unix:///PATH, tcp://HOST:PORT, docker://[unix:///PATH] (the BuildKit "
    "in a Docker Engine) or docker-container://NAME (default: $BUILDKIT_HOST, else "
    "unix:///run/buildkit/buildkitd.sock, else the Docker Engine)"
)


def _add_global_flags(parser: argparse.ArgumentParser, default: object) -> None:
    """Add the global flags; subcommands get `default` SUPPRESS so the main value stays."""

    def value(normal: object) -> object:
        return normal if default is None else default

    parser.add_argument(
        "--addr", metavar="ADDRESS", default=value(os.environ.get("BUILDKIT_HOST")), help=ADDR_HELP
    )
    parser.add_argument(
        "--tlscacert",
        metavar="FILE",
        default=value(None),
        help="CA certificate for TLS (tcp:// only)",
    )
    parser.add_argument(
        "--tlscert", metavar="FILE", default=value(None), help="client certificate for TLS"
    )
    parser.add_argument("--tlskey", metavar="FILE", default=value(None), help="client key for TLS")
    parser.add_argument(
        "--tlsservername",
        metavar="NAME",
        default=value(None),
        help="server name expected in BuildKit's certificate",
    )
    parser.add_argument(
        "--root",
        metavar="DIR",
        default=value(os.environ.get("BKDBG_ROOT")),
        help="directory of the servers' sockets, pid files and logs (default: $BKDBG_ROOT, "
        "else the user runtime dir, else the user data dir)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=value(False),
        help="show tracebacks, and log at DEBUG level to the client and server log files",
    )


def _build_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    handlers: Mapping[str, Handler],
) -> None:
    parser = sub.add_parser(
        "build",
        parents=[common],
        help="build a context and debug the result",
        description="Build CONTEXT in a new detached server; with --invoke, attach the "
        "terminal to a process in a container on the result.",
    )
    add_build_arguments(parser)
    parser.add_argument(
        "--detach",
        metavar="BOOL",
        default="true",
        help="--detach=false runs the server inside this process, for debugging bkdbg "
        "itself (default: true, a detached server process)",
    )
    parser.add_argument(
        "--server-idle-timeout",
        metavar="DURATION",
        default="",
        help="stop the server after it had no client and no running process for DURATION "
        "(e.g. 30s, 10m, 1h; default: never)",
    )
    parser.set_defaults(handler=handlers["build"])


def _server_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    handlers: Mapping[str, Handler],
) -> None:
    attach = sub.add_parser(
        "attach",
        parents=[common],
        help="reattach the terminal to a server",
        description="Reattach to a server's interactive process (output printed meanwhile "
        "is replayed), or open its monitor when no process runs.",
    )
    attach.add_argument(
        "id", metavar="ID", nargs="?", help="server id (default: the only or newest server)"
    )
    attach.set_defaults(handler=handlers["attach"])

    listing = sub.add_parser(
        "list",
        parents=[common],
        help="list the servers",
        description="List the servers under the root, oldest first. A * in CURRENT marks "
        "the newest server, which bkdbg attach without an ID picks.",
    )
    listing.set_defaults(handler=handlers["list"])

    kill = sub.add_parser(
        "kill",
        parents=[common],
        help="stop servers",
        description="Stop servers at once: release their containers, cancel their builds "
        "and remove their directories. --all stops the spare server too.",
    )
    kill.add_argument("ids", metavar="ID", nargs="*", help="server ids (default: the only server)")
    kill.add_argument("--all", action="store_true", help="stop every server")
    kill.set_defaults(handler=handlers["kill"])

    disconnect = sub.add_parser(
        "disconnect",
        parents=[common],
        help="disconnect every client from a server",
        description="Disconnect every client from a server; the server keeps running.",
    )
    disconnect.add_argument(
        "id", metavar="ID", nargs="?", help="server id (default: the only server)"
    )
    disconnect.set_defaults(handler=handlers["disconnect"])


def _other_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    handlers: Mapping[str, Handler],
) -> None:
    info = sub.add_parser("info", parents=[common], help="show BuildKit's version and workers")
    info.set_defaults(handler=handlers["info"])

    script = sub.add_parser(
        "run-script",
        parents=[common],
        help="run monitor commands from a file",
        description="Run monitor commands from FILE, one per line ('#' starts a comment). "
        "Stops at the first failing line; exits 0 only if every command succeeded.",
    )
    script.add_argument("file", metavar="FILE", help="script to run")
    script.add_argument(
        "--keep-going", action="store_true", help="run the remaining lines after a failure"
    )
    script.add_argument(
        "--attach", metavar="ID", default="", help="run against this existing server"
    )
    script.set_defaults(handler=handlers["run-script"])


class _Parser(argparse.ArgumentParser):
    """The top-level parser, which reports a command's unknown arguments with its usage.

    argparse reports them with the top-level usage, which does not show the command's
    flags.
    """

    commands: dict[str, argparse.ArgumentParser]

    def parse_args(  # type: ignore[override]
        self, args: list[str], namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            command = self.commands.get(getattr(parsed, "command", ""), self)
            command.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def build_parser(handlers: Mapping[str, Handler]) -> argparse.ArgumentParser:
    """Return the parser of bkdbg's command line; `handlers` runs each command by name.

    Each command's namespace carries its handler as `handler`.
    """
    parser = _Parser(
        prog="bkdbg",
        description="Interactive debugger for BuildKit builds.",
    )
    parser.add_argument("--version", action="version", version=f"bkdbg {__version__}")
    _add_global_flags(parser, None)
    common = argparse.ArgumentParser(add_help=False)
    _add_global_flags(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=argparse.ArgumentParser
    )
    _build_command(sub, common, handlers)
    _server_commands(sub, common, handlers)
    _other_commands(sub, common, handlers)
    parser.commands = sub.choices
    return parser


def expand_bool_flags(argv: list[str]) -> list[str]:
    """Turn a bare `--detach` into `--detach true`, so that it never takes CONTEXT as a value.

    buildx's boolean flags take a value only as `--detach=false`; argparse would read
    `--detach CONTEXT` as the value CONTEXT. `--detach true` and `--detach false`, as the
    help's `--detach BOOL` reads, keep their value.
    """
    expanded: list[str] = []
    for index, arg in enumerate(argv):
        expanded.append(arg)
        if arg == "--detach" and argv[index + 1 : index + 2] not in (["true"], ["false"]):
            expanded.append("true")
    return expanded

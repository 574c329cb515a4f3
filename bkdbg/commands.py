"""bkdbg's commands: `bkdbg build`, `attach`, `list`, `kill`, `disconnect`, `info` and
`run-script`, which `bkdbg.cli.main` runs.

Errors: a `BkdbgError` prints one line `bkdbg: error: <message>` and exits 1 (a process
exit status passes through); with `--debug` its traceback is printed too. Any other
exception is a bug and shows its traceback. Usage errors from argparse exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from bkdbg import __version__
from bkdbg.daemon.backend import FirstBuild, Terminal
from bkdbg.daemon.launcher import StartingServer, start_early
from bkdbg.errors import BkdbgError, UsageError, report_error
from bkdbg.options import parse_choice, parse_duration
from bkdbg.shell import verbs
from bkdbg.shell.buildflags import add_build_arguments, build_options, tls_config

if TYPE_CHECKING:
    # imported in functions: it pulls in grpc and the daemon client, about 65 ms, and
    # `bkdbg build` starts its server before that
    from bkdbg.cli import DeferredInterrupt
    from bkdbg.daemon.client import DaemonClient
    from bkdbg.daemon.early import EarlyClaim
    from bkdbg.options import BuildOptions
    from bkdbg.shell.workspace import Current, Launcher, Workspace

logger = logging.getLogger(__name__)

ADDR_HELP = (
    "BuildKit address: unix:///PATH, tcp://HOST:PORT, docker://[unix:///PATH] (the BuildKit "
    "in a Docker Engine) or docker-container://NAME (default: $BUILDKIT_HOST, else "
    "unix:///run/buildkit/buildkitd.sock, else the Docker Engine)"
)
_OWN_HANDLER = "_bkdbg_client_log"  # marks the log handler that configure_logging added
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
EXIT_OUTPUT_CLOSED = 141  # 128 + SIGPIPE, as a shell reports it
Handler = Callable[[argparse.Namespace, "Workspace"], int]


# ---------------------------------------------------------------- parser


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
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
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
    parser.set_defaults(handler=_run_build)


def _server_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
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
    attach.set_defaults(handler=_run_attach)

    listing = sub.add_parser(
        "list",
        parents=[common],
        help="list the servers",
        description="List the servers under the root, oldest first. A * in CURRENT marks "
        "the newest server, which bkdbg attach without an ID picks.",
    )
    listing.set_defaults(handler=verbs.run_list)

    kill = sub.add_parser(
        "kill",
        parents=[common],
        help="stop servers",
        description="Stop servers at once: release their containers, cancel their builds "
        "and remove their directories. --all stops the spare server too.",
    )
    kill.add_argument("ids", metavar="ID", nargs="*", help="server ids (default: the only server)")
    kill.add_argument("--all", action="store_true", help="stop every server")
    kill.set_defaults(handler=verbs.run_kill)

    disconnect = sub.add_parser(
        "disconnect",
        parents=[common],
        help="disconnect every client from a server",
        description="Disconnect every client from a server; the server keeps running.",
    )
    disconnect.add_argument(
        "id", metavar="ID", nargs="?", help="server id (default: the only server)"
    )
    disconnect.set_defaults(handler=verbs.run_disconnect)


def _other_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    info = sub.add_parser("info", parents=[common], help="show BuildKit's version and workers")
    info.set_defaults(handler=_run_info)

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
    script.set_defaults(handler=_run_script)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of bkdbg's command line."""
    parser = argparse.ArgumentParser(
        prog="bkdbg",
        description="Interactive debugger for BuildKit builds.",
    )
    parser.add_argument("--version", action="version", version=f"bkdbg {__version__}")
    _add_global_flags(parser, None)
    common = argparse.ArgumentParser(add_help=False)
    _add_global_flags(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _build_command(sub, common)
    _server_commands(sub, common)
    _other_commands(sub, common)
    return parser


# ---------------------------------------------------------------- setup


def configure_logging(debug: bool) -> None:
    """Send log records to the client log file in the user state dir, never to the terminal."""
    # imported here, so that `bkdbg build` starts its server (in main) before this import
    import platformdirs

    root_logger = logging.getLogger()
    root_logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    path = Path(platformdirs.user_state_dir("bkdbg")) / "client.log"
    handler: logging.Handler
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        os.chmod(path, 0o600)
    except OSError:
        # logging is a diagnostic aid; a read-only home must not stop the debugger
        handler = logging.NullHandler()
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s %(process)d %(threadName)s %(levelname)s %(name)s: %(message)s"
        )
    )
    # main() may run more than once in one process (tests): replace our handler
    for previous in [h for h in root_logger.handlers if getattr(h, _OWN_HANDLER, False)]:
        root_logger.removeHandler(previous)
        previous.close()
    setattr(handler, _OWN_HANDLER, True)
    root_logger.addHandler(handler)
    threading.excepthook = _log_thread_crash


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    # a crash in a background thread goes to the log, not over the user's terminal
    name = args.thread.name if args.thread is not None else "unknown"
    exc_info = (args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)
    logger.error("thread %s crashed", name, exc_info=exc_info)


def _check_address(addr: str | None) -> None:
    if addr:
        from bkdbg.gateway.address import parse_address

        parse_address(addr)


def _check_tls(args: argparse.Namespace) -> None:
    from bkdbg.gateway.address import TLSOptions

    tls = tls_config(args)
    if tls is not None:
        TLSOptions(ca=tls.ca, cert=tls.cert, key=tls.key, server_name=tls.server_name).validate()


def make_workspace(args: argparse.Namespace) -> Workspace:
    """Return the Workspace for the global flags."""
    from bkdbg.daemon.instances import resolve_root
    from bkdbg.shell.workspace import Workspace

    root = resolve_root(args.root)
    if root.exists() and not root.is_dir():
        raise UsageError(
            f"bkdbg root is not a directory: {root}: choose another with --root or BKDBG_ROOT"
        )
    return Workspace(root=root, debug=args.debug, addr=args.addr, tls=tls_config(args))


# ---------------------------------------------------------------- commands


def _run_build(args: argparse.Namespace, ws: Workspace) -> int:
    from bkdbg.daemon.spare import parse_spare_setting
    from bkdbg.shell import session
    from bkdbg.shell.buildview import UNREACHABLE

    detach = parse_choice(args.detach, "--detach", ("true", "false")) == "true"
    idle_timeout = parse_duration(args.server_idle_timeout, "--server-idle-timeout")
    if detach:
        parse_spare_setting()  # the server ignores an invalid value, so report it here
    options = build_request(args, ws.local.interactive)
    ws.launcher = _launcher(ws, detach, idle_timeout, args.early_server)

    # no state to start a shell on (a failed COPY, say) still keeps the monitor on a
    # terminal, so the user can fix the context and reload
    to_monitor = options.invoke is not None and ws.local.interactive
    result = ws.build(options, goes_on=to_monitor)
    if result.process_id:
        # a failed step's shell was started: the failed-step block already explains why
        if ws.local.interactive:
            return session.interactive(ws, result.process_id)
        return session.run_piped(ws, result.process_id)
    # a BuildKit that cannot be reached has no build to fix and reload, as in buildx
    if result.error and to_monitor and result.error_kind != UNREACHABLE:
        return session.interactive(ws, "")
    if result.error:
        ws.say(f"bkdbg: error: {result.error}")
    return session.finish_without_process(ws, result.ok and not result.error)


def build_request(args: argparse.Namespace, interactive: bool) -> BuildOptions:
    """Return the options that `bkdbg build` with `args` sends to its server."""
    options = build_options(args, tty=interactive)
    options.addr, options.tls = args.addr, tls_config(args)
    return options


def first_build(argv: list[str], interactive: bool) -> FirstBuild | None:
    """Return the build that `bkdbg ARGV` requests from the server it launches, if any.

    A launched server calls this in the client's environment and working directory, so it
    derives the options that the client sends. None for another command, a Dockerfile on
    stdin, or bad flags (the client reports those).
    """
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = build_parser().parse_args(_expand_bool_flags(argv))
        if args.command != "build" or args.file == "-" or args.detach != "true":
            return None
        _check_address(args.addr)
        _check_tls(args)
        options = build_request(args, interactive)
    except (BkdbgError, SystemExit):
        return None
    return FirstBuild(options.to_json(), Terminal(term=os.environ.get("TERM", "")))


def _launcher(ws: Workspace, detach: bool, idle_timeout: float | None,
              early: StartingServer | None) -> Launcher:
    from bkdbg.daemon.client import DaemonClient

    if not detach:
        if early is not None:
            early.abandon()
        from bkdbg.daemon.main import run_in_process

        return lambda: run_in_process(ws.root, idle_timeout=idle_timeout)

    def launch() -> DaemonClient:
        # only the first build of this client can use the server that main started
        nonlocal early
        starting, early = early, None
        if starting is not None and _fits(starting, ws, idle_timeout):
            return _adopt(starting)
        if starting is not None:
            starting.abandon()
        return DaemonClient.launch(ws.root, ws.debug, idle_timeout=idle_timeout)

    return launch


def _fits(starting: StartingServer, ws: Workspace, idle_timeout: float | None) -> bool:
    """Tell whether argparse agrees with the early scan on the server's root and flags."""
    return (starting.paths.root, starting.debug, starting.idle_timeout) == (
        ws.root, ws.debug, idle_timeout
    )


def _adopt(starting: StartingServer) -> DaemonClient:
    from bkdbg.daemon.client import DaemonClient

    starting.wait_ready()
    client = DaemonClient.connect(starting.paths.root, starting.paths.instance_id)
    starting.adopted = True
    return client


def _run_attach(args: argparse.Namespace, ws: Workspace) -> int:
    from bkdbg.shell import servers, session

    instance_id = args.id or servers.default_instance(ws)
    current = ws.connect(instance_id)
    _wait_for_build(ws, current)
    if not ws.local.interactive and current.process_id:
        return session.run_piped(ws, current.process_id)
    if not current.process_id:
        ws.say(f"server {instance_id} has no running process: type rollback, exec or reload")
    return session.interactive(ws, current.process_id)


def _wait_for_build(ws: Workspace, current: Current) -> None:
    """Wait until the server's build ends, so that attach lands in the process it starts."""
    from bkdbg.shell.workspace import failed_state

    client = current.client
    if client.info().build_state != "building":
        return
    ws.say(
        f"server {current.instance_id} is still building: waiting for it "
        "(Ctrl-C stops waiting, the build goes on)"
    )
    events = client.events()
    try:
        # the build may have ended before the event stream was open
        if client.info().build_state == "building":
            for event in events:
                if event.kind == "build-finished":
                    break
    finally:
        events.close()
    info = client.info()
    current.process_id = info.current_process
    current.last_exit = info.last_exit_code
    current.build_failed = failed_state(info.build_state)


def _run_info(args: argparse.Namespace, _ws: Workspace) -> int:
    """Print the client's version and BuildKit's address, version and workers."""
    from bkdbg.gateway.address import TLSOptions
    from bkdbg.gateway.connection import connect
    from bkdbg.gateway.info import buildkit_info, format_info

    tls = tls_config(args)
    tls_options = None
    if tls is not None:
        tls_options = TLSOptions(ca=tls.ca, cert=tls.cert, key=tls.key, server_name=tls.server_name)
    with connect(args.addr, tls_options) as conn:
        for line in conn.warnings:
            print(f"bkdbg: warning: {line}", file=sys.stderr)
        for line in format_info(__version__, conn.address, buildkit_info(conn)):
            print(line)
    return 0


def _run_script(args: argparse.Namespace, ws: Workspace) -> int:
    from bkdbg.shell.script import run_script

    return run_script(ws, args.file, keep_going=args.keep_going, attach_id=args.attach)


# ---------------------------------------------------------------- main


def _expand_bool_flags(argv: list[str]) -> list[str]:
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


def _silence_output() -> None:
    """Point stdout and stderr at /dev/null, so that no later write or flush fails."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _cleanup(ws: Workspace | None) -> None:
    """End the session of a server this client started and is leaving early."""
    if ws is None or ws.current is None or ws.current.instance_id not in ws.launched:
        return
    try:
        ws.leave(end_session=True)
    except BkdbgError as exc:
        logger.warning("ending the session after Ctrl-C failed: %s", exc)


def run(
    args_list: list[str],
    claimed: EarlyClaim | None = None,
    deferred: DeferredInterrupt | None = None,
) -> int:
    """Run bkdbg's command `args_list`, with the spare server `claimed` for a build.

    `deferred` contains a Ctrl-C that came before the server was started. It is raised
    here, where the server is stopped again.
    """
    # a detached build starts its server first, so that the server starts up while this
    # client imports the shell and checks the command line
    early = start_early(args_list, first_build, claimed)
    try:
        if deferred is not None:
            deferred.resume()
        return _run(args_list, early)
    except KeyboardInterrupt:
        # before _run's own handler: while the command line was parsed
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        # every path that did not connect to it, argparse's exit and Ctrl-C included
        if early is not None:
            early.abandon()


def _run(args_list: list[str], early: StartingServer | None) -> int:
    namespace = argparse.Namespace(early_server=early)
    args = build_parser().parse_args(_expand_bool_flags(args_list), namespace)
    configure_logging(args.debug)
    ws: Workspace | None = None
    try:
        _check_address(args.addr)
        _check_tls(args)
        ws = make_workspace(args)
        handler: Handler = args.handler
        return handler(args, ws)
    except BkdbgError as exc:
        logger.info("bkdbg %s failed: %s", args.command, exc)
        return report_error(exc, args.debug)
    except KeyboardInterrupt:
        _cleanup(ws)
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader of the progress went away (`2>&1 | head`): end the session as for
        # a closed stdout, and exit as a shell reports a writer without a reader
        _silence_output()
        _cleanup(ws)
        return EXIT_OUTPUT_CLOSED

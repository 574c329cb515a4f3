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
from pathlib import Path
from typing import TYPE_CHECKING

from bkdbg import __version__
from bkdbg.cliparser import Handler, build_parser, expand_bool_flags
from bkdbg.daemon.backend import FirstBuild, Terminal
from bkdbg.daemon.launcher import StartingServer, start_early
from bkdbg.errors import BkdbgError, UsageError, report_error
from bkdbg.options import parse_choice, parse_duration
from bkdbg.shell import verbs
from bkdbg.shell.buildflags import build_options, tls_config

if TYPE_CHECKING:
    # imported in functions: it pulls in grpc and the daemon client, about 65 ms, and
    # `bkdbg build` starts its server before that
    from bkdbg.cli import DeferredInterrupt
    from bkdbg.daemon.client import DaemonClient
    from bkdbg.daemon.early import EarlyClaim
    from bkdbg.options import BuildOptions
    from bkdbg.shell.workspace import Current, Launcher, Workspace

logger = logging.getLogger(__name__)

_OWN_HANDLER = "_bkdbg_client_log"  # marks the log handler that configure_logging added
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
EXIT_OUTPUT_CLOSED = 141  # 128 + SIGPIPE, as a shell reports it


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
    result = ws.build(options, goes_on=to_monitor, monitor=ws.local.interactive)
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
            args = build_parser(HANDLERS).parse_args(expand_bool_flags(argv))
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


HANDLERS: dict[str, Handler] = {
    "build": _run_build,
    "attach": _run_attach,
    "list": verbs.run_list,
    "kill": verbs.run_kill,
    "disconnect": verbs.run_disconnect,
    "info": _run_info,
    "run-script": _run_script,
}


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
    args = build_parser(HANDLERS).parse_args(expand_bool_flags(args_list), namespace)
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

"""The flags of `bkdbg build` and of the monitor's `build`, and their conversion to BuildOptions.

Flag names and meanings follow `docker buildx build`. Values are checked after argparse
(in `build_options`), so a malformed value is one `UsageError` line, exit status 1, and
never a usage dump.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from bkdbg.errors import UsageError
from bkdbg.options import (
    NETWORK_MODES,
    ON_MODES,
    PROGRESS_MODES,
    BuildOptions,
    TLSConfig,
    parse_add_host,
    parse_build_arg,
    parse_build_context,
    parse_choice,
    parse_invoke,
    parse_label,
    parse_output,
    parse_platforms,
    parse_secret,
    parse_ssh,
    resolve_build_paths,
)


def add_build_arguments(
    parser: argparse.ArgumentParser, path_kwargs: Mapping[str, Any] | None = None
) -> None:
    """Add the build flags and the CONTEXT argument to `parser`.

    `path_kwargs` go to the arguments that take local paths (the monitor passes its
    path completer there).
    """
    paths = dict(path_kwargs or {})
    parser.add_argument("context", metavar="CONTEXT", help="build context directory", **paths)
    parser.add_argument(
        "-f",
        "--file",
        metavar="PATH",
        dest="file",
        help="Dockerfile to build; '-' reads it from stdin (default: CONTEXT/Dockerfile)",
        **paths,
    )
    _add_image_flags(parser)
    _add_access_flags(parser)
    _add_output_flags(parser)
    _add_invoke_flags(parser)


def _add_image_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", metavar="STAGE", help="build stage to build (default: last)")
    parser.add_argument(
        "--build-arg",
        metavar="KEY[=VALUE]",
        dest="build_args",
        action="append",
        default=[],
        help="set a build-time variable; a bare KEY takes its value from the environment "
        "(repeatable)",
    )
    parser.add_argument(
        "--platform",
        metavar="OS/ARCH",
        dest="platforms",
        action="append",
        default=[],
        help="target platform, e.g. linux/amd64; comma-separated or repeated",
    )
    parser.add_argument("--no-cache", action="store_true", help="do not use the cache for any step")
    parser.add_argument(
        "--label",
        metavar="KEY=VALUE",
        dest="labels",
        action="append",
        default=[],
        help="set a label on the image (repeatable)",
    )
    parser.add_argument(
        "--build-context",
        metavar="NAME=VALUE",
        dest="build_contexts",
        action="append",
        default=[],
        help="extra named context: a directory or docker-image://REF (repeatable)",
    )


def _add_access_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--network",
        metavar="MODE",
        default="default",
        help=f"network mode of RUN steps: {', '.join(NETWORK_MODES)} (default: default)",
    )
    parser.add_argument(
        "--add-host",
        metavar="HOST:IP",
        dest="add_hosts",
        action="append",
        default=[],
        help="add a host-to-IP mapping to /etc/hosts of RUN steps (repeatable)",
    )
    parser.add_argument(
        "--secret",
        metavar="id=ID,src=PATH",
        dest="secrets",
        action="append",
        default=[],
        help="expose a secret to the build: id=ID,src=PATH or id=ID,env=VAR (repeatable)",
    )
    parser.add_argument(
        "--ssh",
        metavar="default|ID=PATH",
        action="append",
        default=[],
        help="expose an SSH agent socket or keys to the build (repeatable)",
    )


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        metavar="type=TYPE,dest=PATH",
        dest="outputs",
        action="append",
        default=[],
        help="export the result: type=local|tar|image|docker|oci|registry with its keys; "
        "a bare PATH means type=local,dest=PATH (repeatable)",
    )
    parser.add_argument(
        "-t",
        "--tag",
        metavar="NAME[:TAG]",
        dest="tags",
        action="append",
        default=[],
        help="image name and tag for an image export (repeatable)",
    )
    parser.add_argument(
        "--progress",
        metavar="MODE",
        default="auto",
        help=f"progress output: {', '.join(PROGRESS_MODES)} (default: auto, which is tty "
        "on a terminal and plain otherwise)",
    )


def _add_invoke_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--invoke",
        metavar="CMD",
        help="start CMD in a container on the result and attach the terminal: a command "
        "such as sh, 'sh -c \"ls /\"', the CSV form entrypoint=...,args=...,env=K=V,user=...,"
        "cwd=...,tty=true|false, or default for the image's own Entrypoint and Cmd",
    )
    parser.add_argument(
        "--on",
        metavar="WHEN",
        default="always",
        help="with --invoke: always starts the container (on the result, or in the failed "
        "step's state), error only when the build fails (default: always)",
    )


def build_options(
    args: argparse.Namespace,
    *,
    environ: Mapping[str, str] | None = None,
    stdin: TextIO | None = None,
    tty: bool = True,
) -> BuildOptions:
    """Check the parsed build flags and return them as BuildOptions.

    `tty` False (no terminal) turns off the tty of the invoked process. Raises
    UsageError naming the first bad value.
    """
    env = dict(os.environ if environ is None else environ)
    context, dockerfile = resolve_build_paths(args.context, args.file)
    options = BuildOptions(context=context, dockerfile=dockerfile)
    if dockerfile == "-":
        options.dockerfile = None
        options.dockerfile_content = (stdin or sys.stdin).read()
    _apply_image_flags(options, args, env)
    _apply_access_flags(options, args, env)
    _apply_output_flags(options, args)
    _apply_invoke_flags(options, args, tty)
    return options


def _apply_image_flags(
    options: BuildOptions, args: argparse.Namespace, env: dict[str, str]
) -> None:
    options.target = args.target
    options.build_args = dict(parse_build_arg(value, env) for value in args.build_args)
    options.platforms = [p for value in args.platforms for p in parse_platforms(value)]
    options.no_cache = args.no_cache
    options.labels = dict(parse_label(value) for value in args.labels)
    options.build_contexts = dict(parse_build_context(value) for value in args.build_contexts)


def _apply_access_flags(
    options: BuildOptions, args: argparse.Namespace, env: dict[str, str]
) -> None:
    options.network = parse_choice(args.network, "--network", NETWORK_MODES)
    options.add_hosts = [parse_add_host(value) for value in args.add_hosts]
    options.secrets = [parse_secret(value, env) for value in args.secrets]
    options.ssh = [parse_ssh(value, env) for value in args.ssh]


def _apply_output_flags(options: BuildOptions, args: argparse.Namespace) -> None:
    options.outputs = [parse_output(value) for value in args.outputs]
    options.tags = list(args.tags)
    options.progress = parse_choice(args.progress, "--progress", PROGRESS_MODES)


def _apply_invoke_flags(options: BuildOptions, args: argparse.Namespace, tty: bool) -> None:
    on = parse_choice(args.on, "--on", ON_MODES)
    if args.invoke is None:
        if args.on != "always":
            raise UsageError(f"invalid --on value: {args.on!r}: --on needs --invoke CMD")
        return
    options.invoke = parse_invoke(args.invoke, on)
    if not tty:
        options.invoke.tty = False


def tls_config(args: argparse.Namespace) -> TLSConfig | None:
    """Return the TLS files of the global `--tls*` flags, or None when none was given.

    The files are checked by the CLI (with the gateway's TLSOptions) before any server starts.
    """
    tls = TLSConfig(
        ca=_absolute(args.tlscacert),
        cert=_absolute(args.tlscert),
        key=_absolute(args.tlskey),
        server_name=args.tlsservername,
    )
    return None if tls == TLSConfig() else tls


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None

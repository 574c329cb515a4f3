"""Plain-text tables for `list` and `ps`, and relative times such as "2 minutes ago"."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

MINUTE = 60.0
HOUR = 60 * MINUTE
DAY = 24 * HOUR


def _plural(count: int, unit: str) -> str:
    return f"{count} {unit}" if count == 1 else f"{count} {unit}s"


def human_duration(seconds: float) -> str:
    """Return a duration in the words of Docker's `docker ps` (go-units HumanDuration)."""
    if seconds < 1:
        return "Less than a second"
    if seconds < MINUTE:
        return _plural(int(seconds), "second")
    if seconds < 2 * MINUTE:
        return "About a minute"
    if seconds < HOUR:
        return _plural(int(seconds // MINUTE), "minute")
    if seconds < 2 * HOUR:
        return "About an hour"
    if seconds < 2 * DAY:
        return _plural(int(seconds // HOUR), "hour")
    return _plural(int(seconds // DAY), "day")


def relative_time(started: float, now: float) -> str:
    """Return "<duration> ago" for a Unix time `started`, or "-" when it is unknown."""
    if started <= 0:
        return "-"
    return f"{human_duration(max(0.0, now - started))} ago"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Return the lines of a left-aligned table with two spaces between columns."""
    widths = [len(name) for name in header]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return lines


@dataclass
class InstanceRow:
    """One server as `list` shows it."""

    instance_id: str
    pid: int
    started: float
    build: str
    clients: int
    current: bool = False


INSTANCE_HEADER = ("ID", "PID", "STARTED", "BUILD", "CLIENTS", "CURRENT")


def instance_table(rows: Sequence[InstanceRow], now: float) -> list[str]:
    """Return the lines of the `list` table."""
    cells = [
        (
            row.instance_id,
            str(row.pid) if row.pid > 0 else "-",
            relative_time(row.started, now),
            row.build or "-",
            str(row.clients),
            "*" if row.current else "",
        )
        for row in rows
    ]
    return format_table(INSTANCE_HEADER, cells)


@dataclass
class ProcessRow:
    """One container process as `ps` shows it."""

    process_id: str
    args: list[str]
    state: str
    exit_code: int
    current: bool = False


PROCESS_HEADER = ("ID", "CURRENT", "COMMAND", "STATE", "STATUS")
COMMAND_WIDTH = 40  # characters of COMMAND shown before "..."


def _short_command(args: Sequence[str]) -> str:
    text = shlex.join(args)
    return text if len(text) <= COMMAND_WIDTH else text[: COMMAND_WIDTH - 3] + "..."


def process_table(rows: Sequence[ProcessRow]) -> list[str]:
    """Return the lines of the `ps` table; STATUS is the exit status of a process that ended."""
    cells = [
        (
            row.process_id,
            "*" if row.current else "",
            _short_command(row.args),
            row.state,
            str(row.exit_code) if row.state == "exited" else "-",
        )
        for row in rows
    ]
    return format_table(PROCESS_HEADER, cells)

"""Helpers shared by bkdbg's benchmarks: the engine, a private bkdbg root, figures and peak RSS.

Every benchmark compares bkdbg with `docker buildx` against one Docker Engine, by default
the local one that scripts/local-buildkit.sh runs. Run them from the repository with the
project's venv, for example `.venv/bin/python bench/invoke.py --rounds 5`.
"""

from __future__ import annotations

import argparse
import compileall
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

DEFAULT_DOCKER_HOST = "unix:///run/bkdbg-buildkit/docker.sock"
# made by scripts/local-buildkit.sh start; it exists only in the local engine, so no registry
BASE_IMAGE = "bkdbg-test/busybox:latest"
# variables that would point either tool at another BuildKit or builder than the one measured
FOREIGN_ENV = ("BUILDKIT_HOST", "DOCKER_CONTEXT", "BUILDX_BUILDER", "BKDBG_ADDR", "BKDBG_ROOT")
HTTP_TIMEOUT = 30.0  # seconds for one request to the engine's API
SERVER_EXIT_TIMEOUT = 10.0  # seconds that a bkdbg server gets to exit after its session ends
# seconds of rest between two measurements, so that the engine has finished releasing the
# previous build's containers and references before the next one starts
SETTLE_SECONDS = 1.0
MB = 1_000_000  # throughput and sizes are printed in MB (10^6 bytes)
TOOLS = ("bkdbg", "buildx")


# ---------------------------------------------------------------- command line


def make_parser(description: str, default_rounds: int) -> argparse.ArgumentParser:
    """Return an argument parser with the options that every benchmark takes.

    After parse_args, `tools` is the list of tools to measure, both when --tool is absent.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--rounds",
        type=int,
        default=default_rounds,
        help=f"measured rounds per tool, after one warm-up where noted (default {default_rounds})",
    )
    parser.add_argument(
        "--tool",
        dest="tools",
        action="append",
        choices=TOOLS,
        help="measure only this tool; repeat for both (default: both)",
    )
    parser.add_argument(
        "--docker-host",
        default=DEFAULT_DOCKER_HOST,
        help=f"the Docker Engine both tools use, as unix:///PATH (default {DEFAULT_DOCKER_HOST})",
    )
    parser.set_defaults(tools=None)
    return parser


def settle() -> None:
    """Pause between two measurements; see SETTLE_SECONDS."""
    time.sleep(SETTLE_SECONDS)


def selected_tools(args: argparse.Namespace) -> list[str]:
    """Return the tools named by --tool, in TOOLS order, or all of them."""
    return [tool for tool in TOOLS if not args.tools or tool in args.tools]


# ---------------------------------------------------------------- the engine


@dataclass(frozen=True)
class Engine:
    """The Docker Engine whose embedded BuildKit both tools build on."""

    docker_host: str

    @property
    def socket_path(self) -> str:
        if not self.docker_host.startswith("unix:///"):
            raise SystemExit(
                f"bench: error: --docker-host must be unix:///PATH: {self.docker_host}"
            )
        return self.docker_host.removeprefix("unix://")

    @property
    def bkdbg_addr(self) -> str:
        """bkdbg's --addr for this engine."""
        return f"docker://{self.docker_host}"

    def docker_env(self, experimental: bool = False) -> dict[str, str]:
        """Return an environment for `docker` and `docker buildx` aimed at this engine."""
        env = clean_environ()
        env["DOCKER_HOST"] = self.docker_host
        if experimental:
            env["BUILDX_EXPERIMENTAL"] = "1"  # `docker buildx debug` is experimental in 0.13
        return env

    def request(self, method: str, path: str) -> object:
        """Send one HTTP request to the engine's API and return the decoded JSON body."""
        conn = _UnixHTTPConnection(self.socket_path)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path} returned {response.status}: {body[:200]!r}")
        return json.loads(body) if body.strip() else None

    def version(self) -> str:
        """Return the engine's name and version, e.g. `Docker Engine 26.1.5`."""
        info = self.request("GET", "/version")
        assert isinstance(info, dict)
        return f"Docker Engine {info.get('Version', '?')}"


class _UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP/1.1 connection to a server on a unix socket."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=HTTP_TIMEOUT)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def clean_environ() -> dict[str, str]:
    """Return a copy of os.environ without the variables that would redirect either tool."""
    return {key: value for key, value in os.environ.items() if key not in FOREIGN_ENV}


def warn_if_busy() -> None:
    """Print a warning when the machine's 1-minute load average exceeds its CPU count.

    Every figure here is a wall time, so other work on the machine inflates both tools'
    figures and blurs their ratio.
    """
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    if load > cpus:
        print(
            f"bench: warning: load average {load:.1f} exceeds the {cpus} CPUs: "
            "other work on this machine makes the figures slower and noisier",
            file=sys.stderr,
        )


def require_engine(engine: Engine) -> str:
    """Return the engine's version, or exit with one line saying how to start it."""
    try:
        return engine.version()
    except (OSError, RuntimeError, http.client.HTTPException, ValueError) as exc:
        raise SystemExit(
            f"bench: error: Docker Engine not reachable at {engine.docker_host}: {exc}: "
            "start it with scripts/local-buildkit.sh start"
        ) from exc


# ---------------------------------------------------------------- build cache cleanup


def cache_records(engine: Engine) -> list[dict[str, object]]:
    """Return the engine's build cache records (GET /system/df?type=build-cache)."""
    usage = engine.request("GET", "/system/df?type=build-cache")
    assert isinstance(usage, dict)
    return list(usage.get("BuildCache") or [])


def prune_records(engine: Engine, record_ids: Iterable[str]) -> int:
    """Remove the build cache records `record_ids`; returns how many BuildKit deleted.

    BuildKit skips a record that a build still uses, which is not an error.
    """
    deleted = 0
    for record_id in record_ids:
        # moby turns the `id` filter into BuildKit's `id~=VALUE`, one value per call
        filters = urllib.parse.quote(json.dumps({"id": [record_id]}))
        try:
            response = engine.request("POST", f"/build/prune?filters={filters}")
        except (OSError, RuntimeError, http.client.HTTPException) as exc:
            print(f"bench: warning: cannot prune cache record {record_id}: {exc}", file=sys.stderr)
            continue
        if isinstance(response, dict):
            deleted += len(response.get("CachesDeleted") or [])
    return deleted


def created_since(record: dict[str, object], started: float) -> bool:
    """Return whether a cache record was created at or after Unix time `started`."""
    text = str(record.get("CreatedAt", ""))
    # the engine prints nanoseconds; fromisoformat takes at most microseconds
    head, _, rest = text.partition(".")
    fraction = "".join(ch for ch in rest if ch.isdigit())[:6]
    try:
        created = datetime.fromisoformat(f"{head}.{fraction or '0'}+00:00")
    except ValueError:
        return False
    return created.timestamp() >= started - 1.0


# ---------------------------------------------------------------- figures


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def describe(values: Sequence[float], unit: str, scale: float = 1.0, digits: int = 2) -> str:
    """Return `median X unit (min A, max B, n N)` for `values` multiplied by `scale`."""
    if not values:
        return "no samples"
    scaled = [value * scale for value in values]
    return (
        f"median {median(scaled):.{digits}f} {unit} "
        f"(min {min(scaled):.{digits}f}, max {max(scaled):.{digits}f}, n {len(scaled)})"
    )


def ratio_text(numerator: Sequence[float], denominator: Sequence[float]) -> str:
    """Return the ratio of the two medians, or `n/a` when either side has no samples."""
    if not numerator or not denominator or median(denominator) == 0:
        return "n/a"
    return f"{median(numerator) / median(denominator):.2f}"


def machine_summary(engine_version: str) -> str:
    """Return one line describing this machine and its load, for the benchmark page."""
    memory_kib = _meminfo_kib("MemTotal")
    buildx = _command_output(["docker", "buildx", "version"]).split()
    return (
        f"{os.cpu_count()} CPUs, {memory_kib / 1024 / 1024:.1f} GiB memory, "
        f"Linux {os.uname().release}, Python {sys.version.split()[0]}, {engine_version}, "
        f"buildx {buildx[1] if len(buildx) > 1 else '?'}; load average {load_text()}"
    )


def load_text() -> str:
    """Return the 1, 5 and 15 minute load averages, e.g. `0.52, 0.61, 0.70`."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def _meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return 0


def _command_output(argv: Sequence[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return ""
    return result.stdout.strip()


# ---------------------------------------------------------------- running commands


def bkdbg_executable() -> str:
    """Return the bkdbg console script of the interpreter that runs the benchmark."""
    candidate = Path(sys.executable).parent / "bkdbg"
    if not candidate.exists():
        raise SystemExit(
            f"bench: error: bkdbg not installed next to {sys.executable}: "
            "run the benchmark with the project's .venv/bin/python"
        )
    return str(candidate)


def compile_bkdbg() -> None:
    """Write the bytecode of bkdbg's modules, as `pip install` does for a regular install.

    The project's editable install leaves that to the first import, and where
    PYTHONDONTWRITEBYTECODE is set (as on the machine of docs/benchmarks.md), every bkdbg
    process would compile each module from source again: about 100 ms more per process.
    """
    import bkdbg

    package = Path(bkdbg.__file__).parent
    if not compileall.compile_dir(package, quiet=1):
        raise SystemExit(f"bench: error: cannot compile the modules in {package}: see above")


def run_checked(argv: Sequence[str], env: dict[str, str], timeout: float) -> float:
    """Run `argv` with output discarded and return its wall time in seconds.

    Raises RuntimeError naming the command and the tail of its stderr when it fails.
    """
    started = time.perf_counter()
    result = subprocess.run(
        list(argv),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=timeout,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {result.returncode}: "
            f"{result.stderr.decode(errors='replace')[-800:].strip()}"
        )
    return elapsed


# ---------------------------------------------------------------- bkdbg's private root


class BkdbgRoot:
    """A fresh BKDBG_ROOT under /tmp, so the benchmark finds only its own bkdbg servers.

    On close, any server still running is reported and stopped (SIGTERM, then SIGKILL), and
    the directory is removed.
    """

    def __init__(self, engine: Engine, spare: bool = True) -> None:
        # a short path: socket paths under it must fit in AF_UNIX's 107 bytes
        self.path = Path(tempfile.mkdtemp(prefix="bkbench-", dir="/tmp"))
        self.engine = engine
        self.spare = spare

    def env(self) -> dict[str, str]:
        """Return the environment for bkdbg: this root, and spare servers on or off."""
        env = clean_environ()
        env["BKDBG_ROOT"] = str(self.path)
        env["BKDBG_SPARE_SERVER"] = "10m" if self.spare else "off"
        return env

    def argv(self, *args: str) -> list[str]:
        """Return a bkdbg command line aimed at the engine, e.g. argv("build", CTX)."""
        return [bkdbg_executable(), "--addr", self.engine.bkdbg_addr, *args]

    def server_pids(self) -> dict[str, int]:
        """Return {instance id: pid} of the servers under this root whose process is alive."""
        alive = {}
        for pid_file in self.path.glob("*/pid"):
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            if _is_live_with(pid, pid_file.parent.name):
                alive[pid_file.parent.name] = pid
        return alive

    def wait_servers_gone(self, timeout: float = SERVER_EXIT_TIMEOUT) -> dict[str, int]:
        """Wait until no server runs under this root; returns those still running after it."""
        deadline = time.monotonic() + timeout
        while (alive := self.server_pids()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return alive

    def sessions_listed(self) -> str:
        """Return what `bkdbg list` prints for this root (stripped), or its error."""
        result = subprocess.run(
            self.argv("list"),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return (result.stdout + result.stderr).strip()

    def stop_servers(self) -> dict[str, int]:
        """Stop every server still running after a short wait; returns those it stopped."""
        leftover = self.wait_servers_gone()
        for instance_id, pid in leftover.items():
            print(
                f"bench: warning: bkdbg server {instance_id} (pid {pid}) still running: "
                "stopping it",
                file=sys.stderr,
            )
            _stop_process(pid)
        return leftover

    def close(self) -> None:
        self.stop_servers()
        # stops the spare server too, which would otherwise exit only once it finds the
        # root gone
        subprocess.run(self.argv("kill", "--all"), env=self.env(), capture_output=True,
                       timeout=30, check=False)
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> BkdbgRoot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _is_live_with(pid: int, instance_id: str) -> bool:
    """Return whether `pid` is alive and is the server `instance_id` (pid reuse check).

    A server has the id in its command line, or, forked from its client, in its process
    name `bkdbg-ID`.
    """
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    named = instance_id.encode() in cmdline or name == f"bkdbg-{instance_id}"
    return state not in ("Z", "X") and named


def _stop_process(pid: int, grace: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------- peak RSS


@dataclass
class ProcessUsage:
    """The highest resident set size and the CPU time seen for one process."""

    pid: int
    name: str
    peak_kib: int = 0
    cpu_seconds: float = 0.0  # user + system, as of the last sample


@dataclass
class PeakRssMonitor:
    """Sample the peak RSS (VmHWM) of a process tree while a command runs.

    The tree is the process `root_pid`, every process whose command line contains `marker`,
    and their descendants. A bkdbg client starts its server in a new session, and the
    server outlives the client. An exec'd server and a spare server are found by the
    `--root` in their command lines. A server forked by its client is the client's child
    until the client exits, and is sampled from then on.
    VmHWM is the kernel's high-water mark of each process, so sampling every `interval`
    seconds misses only growth within the last interval before a process exits.
    """

    root_pid: int
    marker: bytes
    interval: float = 0.05
    usage_by_pid: dict[int, ProcessUsage] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()

    def stop(self) -> dict[int, ProcessUsage]:
        """Take a last sample, stop sampling and return the usage by pid."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        return self.usage_by_pid

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        for pid in self._members():
            hwm = _vm_hwm_kib(pid)
            if hwm is None:
                continue
            usage = self.usage_by_pid.get(pid)
            if usage is None:
                usage = self.usage_by_pid[pid] = ProcessUsage(pid, _process_label(pid))
            elif usage.name in ("bkdbg client", "bkdbg spare"):
                # a server forked by the client is the client until it names itself, and
                # a claimed spare is the spare
                usage.name = _process_label(pid)
            usage.peak_kib = max(usage.peak_kib, hwm)
            usage.cpu_seconds = max(usage.cpu_seconds, _cpu_seconds(pid))

    def _members(self) -> set[int]:
        parents = _parent_map()
        members = {self.root_pid} | set(self.usage_by_pid)
        for pid in parents:
            if self.marker in _cmdline(pid):
                members.add(pid)
        # add descendants until nothing changes (the tree is a few levels deep)
        grew = True
        while grew:
            children = {pid for pid, ppid in parents.items() if ppid in members}
            grew = not children <= members
            members |= children
        return members


def _parent_map() -> dict[int, int]:
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        # /proc/PID/stat starts with "pid (comm) state ppid", and comm may contain spaces
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1:
            parents[int(entry.name)] = int(fields[1])
    return parents


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _vm_hwm_kib(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None  # a zombie or kernel thread has no memory map


def _cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # utime and stime are fields 14 and 15 of /proc/PID/stat (proc(5)), so 12 and 13 after "(comm)"
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_label(pid: int) -> str:
    args = [arg.decode(errors="replace") for arg in _cmdline(pid).split(b"\0") if arg]
    if "__server" in args or _process_name(pid).startswith("bkdbg-"):
        # a server forked by its client keeps the client's command line, and a claimed
        # spare its own, but both name themselves bkdbg-ID
        return "bkdbg server"
    if "__spare" in args:
        return "bkdbg spare"
    if not args:
        return "?"
    name = Path(args[0]).name
    if name.startswith("python") and len(args) > 1:
        name = Path(args[1]).name
    return "bkdbg client" if name == "bkdbg" else name


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def summarize_peaks(usage_by_pid: dict[int, ProcessUsage]) -> dict[str, int]:
    """Return the highest peak RSS in KiB per process label (client, server, ...)."""
    by_label: dict[str, int] = {}
    for usage in usage_by_pid.values():
        by_label[usage.name] = max(by_label.get(usage.name, 0), usage.peak_kib)
    return by_label


def summarize_cpu(usage_by_pid: dict[int, ProcessUsage]) -> dict[str, float]:
    """Return the CPU seconds per process label, summed over processes with that label."""
    by_label: dict[str, float] = {}
    for usage in usage_by_pid.values():
        by_label[usage.name] = by_label.get(usage.name, 0.0) + usage.cpu_seconds
    return by_label

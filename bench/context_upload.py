"""Benchmark the upload of a large build context: `bkdbg build` against `docker buildx build`.

Each round writes two fresh contexts, one per tool, of 20,000 small files (100 per
directory) plus one 200 MB file, all random bytes. A fresh directory gets a new
local-source cache key in BuildKit and new content misses the COPY cache, so every
build uploads the whole context. The Dockerfile is `FROM scratch` + `COPY . DEST`, so the
upload and the copy are all the work there is. The tools run interleaved, and the first
tool alternates from round to round. The result stays in the build cache for both. bkdbg
keeps it there when no output is given, and buildx gets `--output type=cacheonly`,
because its docker driver would otherwise also load a 200 MB image into the image store.

Peak RSS is sampled for both tools' whole process trees (bkdbg: the client and the
detached server that uploads the context). It is measured at the full size during the
timed rounds and once more at a tenth of it, to show whether it grows with the context.

    .venv/bin/python bench/context_upload.py [--rounds N] [--tool bkdbg|buildx]
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import (
    MB,
    BkdbgRoot,
    Engine,
    PeakRssMonitor,
    cache_records,
    compile_bkdbg,
    created_since,
    describe,
    load_text,
    machine_summary,
    make_parser,
    median,
    prune_records,
    ratio_text,
    require_engine,
    selected_tools,
    settle,
    summarize_cpu,
    summarize_peaks,
    warn_if_busy,
)

# a destination no other build on the shared engine uses, so cleanup finds only our records
DEST = "/bkdbg-bench-ctx"
DOCKERFILE = f"FROM scratch\nCOPY . {DEST}\n"
FILES_PER_DIR = 100
SMALL_FILE_MAX = 2048  # bytes; small files are 1..2048 bytes, about 20 MB for 20,000
CHUNK = 1 << 20  # bytes written per call for the large file
BUILD_TIMEOUT = 600.0  # seconds for one build before the round is abandoned
DEFAULT_ROUNDS = 3
DESCRIPTION = "Time the upload of a large build context by bkdbg build and docker buildx build."


@dataclass(frozen=True)
class ContextSize:
    """How many small files and how large a single file a generated context has."""

    small_files: int
    large_file_bytes: int

    def label(self) -> str:
        return f"{self.small_files:,} files + {self.large_file_bytes // MB} MB"


FULL_SIZE = ContextSize(20_000, 200 * MB)
TENTH_SIZE = ContextSize(2_000, 20 * MB)


@dataclass
class Sample:
    """One timed build: wall time, and peak RSS in KiB and CPU seconds per process label."""

    seconds: float
    peaks_kib: dict[str, int]
    cpu_seconds: dict[str, float]


# ---------------------------------------------------------------- contexts


def write_context(directory: Path, size: ContextSize) -> int:
    """Write a context of `size` with random content into new `directory`; returns its bytes."""
    directory.mkdir()
    (directory / "Dockerfile").write_text(DOCKERFILE)
    total = len(DOCKERFILE.encode())
    total += _write_small_files(directory, size.small_files)
    total += _write_large_file(directory / "large.bin", size.large_file_bytes)
    return total


def _write_small_files(directory: Path, count: int) -> int:
    total = 0
    for index in range(count):
        subdir = directory / f"d{index // FILES_PER_DIR:04d}"
        if index % FILES_PER_DIR == 0:
            subdir.mkdir()
        # random sizes make each context's total size, which cleanup matches, differ
        data = os.urandom(random.randint(1, SMALL_FILE_MAX))
        (subdir / f"f{index:05d}.txt").write_bytes(data)
        total += len(data)
    return total


def _write_large_file(path: Path, size: int) -> int:
    with open(path, "wb") as file:
        for offset in range(0, size, CHUNK):
            file.write(os.urandom(min(CHUNK, size - offset)))
    return size


# ---------------------------------------------------------------- one build


def bkdbg_argv(root: BkdbgRoot, context: Path) -> list[str]:
    return root.argv("build", "--progress", "quiet", str(context))


def buildx_argv(context: Path) -> list[str]:
    return [
        "docker",
        "buildx",
        "build",
        "--progress",
        "quiet",
        "--output",
        "type=cacheonly",
        str(context),
    ]


def timed_build(argv: list[str], env: dict[str, str], marker: str) -> Sample:
    """Run one build, sampling the peak RSS of its process tree; raises if it fails."""
    started = time.perf_counter()
    process = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    monitor = PeakRssMonitor(process.pid, marker.encode())
    monitor.start()
    try:
        _, stderr = process.communicate(timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    finally:
        usage_by_pid = monitor.stop()
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {process.returncode}: "
            f"{stderr.decode(errors='replace')[-800:].strip()}"
        )
    return Sample(elapsed, summarize_peaks(usage_by_pid), summarize_cpu(usage_by_pid))


def build_once(tool: str, context: Path, root: BkdbgRoot, engine: Engine) -> Sample:
    """Build `context` with `tool` ("bkdbg" or "buildx") and check that nothing stays running."""
    if tool == "bkdbg":
        sample = timed_build(bkdbg_argv(root, context), root.env(), str(root.path))
        leftover = root.wait_servers_gone()
        if leftover:
            print(f"  note: bkdbg servers still running after the build: {leftover}")
        return sample
    # the docker CLI runs buildx as a child process, which the monitor finds as a descendant
    return timed_build(buildx_argv(context), engine.docker_env(), str(context))


# ---------------------------------------------------------------- rounds


class Scratch:
    """The directory where contexts are written, and the byte sizes of all written so far.

    BuildKit reports a local source's size as the sum of its file sizes, so the sizes
    identify this run's uploads among the engine's cache records.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.sizes: set[int] = set()

    def fresh_contexts(self, name: str, size: ContextSize, tools: list[str]) -> dict[str, Path]:
        """Write one new context per tool and flush them to disk; returns {tool: context}."""
        contexts = {}
        for tool in tools:
            contexts[tool] = self.directory / f"{name}-{tool}"
            self.sizes.add(write_context(contexts[tool], size))
        # neither build should pay for writing back the other's dirty pages
        os.sync()
        return contexts


def run_rounds(
    rounds: int, scratch: Scratch, root: BkdbgRoot, engine: Engine, results: dict[str, list[Sample]]
) -> None:
    """Run the timed rounds at FULL_SIZE for the tools in `results`."""
    for round_index in range(rounds):
        contexts = scratch.fresh_contexts(f"round{round_index}", FULL_SIZE, list(results))
        # alternate which tool goes first, so neither always meets a busier engine
        order = list(results) if round_index % 2 == 0 else list(reversed(results))
        for tool in order:
            settle()
            sample = build_once(tool, contexts[tool], root, engine)
            results[tool].append(sample)
            print(
                f"  round {round_index + 1} {tool}: {sample.seconds:.2f} s, "
                f"peak RSS {_peaks_text(sample.peaks_kib)}; CPU {_cpu_text(sample.cpu_seconds)}"
            )
        for context in contexts.values():
            shutil.rmtree(context)


def run_tenth_size(
    tools: list[str], scratch: Scratch, root: BkdbgRoot, engine: Engine
) -> dict[str, Sample]:
    """Build one context of TENTH_SIZE with each tool, for the peak RSS comparison."""
    contexts = scratch.fresh_contexts("tenth", TENTH_SIZE, tools)
    samples = {tool: build_once(tool, contexts[tool], root, engine) for tool in tools}
    for context in contexts.values():
        shutil.rmtree(context)
    return samples


def _cpu_text(cpu_seconds: dict[str, float]) -> str:
    parts = [f"{label} {seconds:.1f} s" for label, seconds in sorted(cpu_seconds.items())]
    return ", ".join(parts) or "not sampled"


def _peaks_text(peaks_kib: dict[str, int]) -> str:
    parts = [f"{label} {kib / 1024:.0f} MiB" for label, kib in sorted(peaks_kib.items())]
    return ", ".join(parts) or "not sampled"


# ---------------------------------------------------------------- report and cleanup


def report(results: dict[str, list[Sample]], tenth: dict[str, Sample]) -> None:
    # the small files are random in size, so this is FULL_SIZE's expected total
    total = FULL_SIZE.small_files * (1 + SMALL_FILE_MAX) // 2 + FULL_SIZE.large_file_bytes
    bkdbg_times = [sample.seconds for sample in results.get("bkdbg", [])]
    buildx_times = [sample.seconds for sample in results.get("buildx", [])]
    print(
        f"\ncontext: {FULL_SIZE.label()} ({total / MB:.0f} MB in all), "
        f"Dockerfile FROM scratch + COPY"
    )
    print(f"bkdbg build:        {describe(bkdbg_times, 's')}")
    print(f"docker buildx build: {describe(buildx_times, 's')}")
    print(f"ratio bkdbg/buildx (medians): {ratio_text(bkdbg_times, buildx_times)} (target <= 1.0)")
    rates = [
        f"{tool} {total / MB / median([s.seconds for s in samples]):.0f} MB/s"
        for tool, samples in results.items()
        if samples
    ]
    print(f"upload rate (context bytes / median time): {', '.join(rates)}")
    print("CPU time per build (median over the rounds, user + system):")
    for tool, samples in results.items():
        print(f"  {tool}: {_cpu_text(_median_cpu(samples))}")
    print("\npeak RSS (VmHWM, highest of each process over the rounds):")
    for tool in results:
        full = _max_peaks(results[tool])
        print(f"  {tool} at {FULL_SIZE.label()}: {_peaks_text(full)}")
        if tool in tenth:
            print(f"  {tool} at {TENTH_SIZE.label()}: {_peaks_text(tenth[tool].peaks_kib)}")


def _median_cpu(samples: list[Sample]) -> dict[str, float]:
    labels = {label for sample in samples for label in sample.cpu_seconds}
    return {
        label: median([sample.cpu_seconds.get(label, 0.0) for sample in samples])
        for label in labels
    }


def _max_peaks(samples: list[Sample]) -> dict[str, int]:
    peaks: dict[str, int] = {}
    for sample in samples:
        for label, kib in sample.peaks_kib.items():
            peaks[label] = max(peaks.get(label, 0), kib)
    return peaks


def prune_benchmark_cache(engine: Engine, started: float, context_sizes: set[int]) -> None:
    """Remove the cache records that this run's builds created since Unix time `started`.

    Those are the COPY results, whose description names DEST, and the uploaded contexts:
    local sources whose size is one of `context_sizes`.
    """
    ours = []
    for record in cache_records(engine):
        if not created_since(record, started):
            continue
        described = DEST in str(record.get("Description", ""))
        uploaded = (
            record.get("Type") == "source.local"
            and int(str(record.get("Size", 0))) in context_sizes
        )
        if described or uploaded:
            ours.append(str(record["ID"]))
    pruned = prune_records(engine, ours)
    print(f"\npruned {pruned} of {len(ours)} build cache records made by this run")


def main() -> int:
    args = make_parser(DESCRIPTION, DEFAULT_ROUNDS).parse_args()
    tools = selected_tools(args)
    engine = Engine(args.docker_host)
    version = require_engine(engine)
    compile_bkdbg()
    print(f"machine: {machine_summary(version)}")
    warn_if_busy()
    started = time.time()
    results: dict[str, list[Sample]] = {tool: [] for tool in tools}
    tenth: dict[str, Sample] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bkdbg-bench-ctx-") as scratch_dir,
        BkdbgRoot(engine) as root,
    ):
        scratch = Scratch(Path(scratch_dir))
        try:
            run_rounds(args.rounds, scratch, root, engine, results)
            tenth = run_tenth_size(tools, scratch, root, engine)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"bench: error: {exc}", file=sys.stderr)
        finally:
            if "bkdbg" in tools:
                print(f"bkdbg list at the end: {root.sessions_listed() or '(empty)'}")
            prune_benchmark_cache(engine, started, scratch.sizes)
    report(results, tenth)
    print(f"load average at the end: {load_text()}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

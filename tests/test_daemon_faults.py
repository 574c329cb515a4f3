"""Long-running fault tests of a detached server against the real BuildKit.

They print what they measure (run pytest with -s to see it) and take minutes, so they
are marked `slow` and `faults`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bkdbg.daemon.client import DaemonClient
from bkdbg.daemon.messages import BuildDone, Output
from bkdbg.options import BuildOptions, InvokeConfig
from tests.helpers.buildkit import running_build_containers
from tests.helpers.context import TEST_IMAGE, MakeContext

pytestmark = [
    pytest.mark.slow,
    pytest.mark.faults,
    pytest.mark.usefixtures("no_leaked_containers"),
]

CYCLES = 100
OUTPUT_BYTES = 1_000_000_000


def server_usage(pid: int) -> dict[str, int]:
    """Return open fds, threads and resident memory (KiB) of process `pid`."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(status["Threads"]),
        "rss_kib": int(status["VmRSS"].split()[0]),
    }


@pytest.fixture
def server(buildkit_addr: str, make_context: MakeContext) -> Iterator[DaemonClient]:
    if not (Path(__file__).parent.parent / "bkdbg" / "cli.py").exists():
        pytest.skip("bkdbg/cli.py with its __server command is missing")
    client = DaemonClient.launch(Path(os.environ["BKDBG_ROOT"]))
    context = make_context(f"FROM {TEST_IMAGE}\nRUN echo built > /built\n")
    options = BuildOptions(context=str(context), addr=buildkit_addr,
                           invoke=InvokeConfig(entrypoint=["sh"], args=[], tty=False))
    done = list(client.build(options))[-1]
    assert isinstance(done, BuildDone)
    assert done.process_id, done.error
    yield client
    client.shutdown()
    client.close()


def process_state(client: DaemonClient, process_id: str) -> str:
    return {p.id: p.state for p in client.list_processes()}[process_id]


def echo_in_shell(client: DaemonClient) -> None:
    stream = client.attach()
    stream.send_stdin(b"cat /built\n")
    for message in stream:
        if isinstance(message, Output) and b"built" in message.data:
            break
    stream.close()


@pytest.mark.timeout(600)
def test_reload_rollback_cycles_do_not_grow(server: DaemonClient) -> None:
    for warmup in range(4):
        _cycle(server, warmup)
    before = server_usage(server.server_pid)
    containers_before = len(running_build_containers())
    started = time.monotonic()
    for index in range(CYCLES):
        _cycle(server, index)
    after = server_usage(server.server_pid)
    containers_after = len(running_build_containers())
    print(f"\n{CYCLES} reload/rollback cycles in {time.monotonic() - started:.0f} s: "
          f"before {before}, after {after}; build containers {containers_before} -> "
          f"{containers_after}")
    assert after["fds"] <= before["fds"] + 4
    assert after["threads"] <= before["threads"] + 4
    assert after["rss_kib"] <= before["rss_kib"] + 32 * 1024
    assert containers_after <= containers_before


def _cycle(client: DaemonClient, index: int) -> None:
    if index % 2:
        done = list(client.reload())[-1]
        assert isinstance(done, BuildDone)
        assert done.process_id, done.error
    else:
        client.rollback()
    echo_in_shell(client)


@pytest.mark.timeout(600)
def test_large_output_while_detached(server: DaemonClient) -> None:
    before = server_usage(server.server_pid)
    process_id = server.exec(["sh", "-c", f"head -c {OUTPUT_BYTES} /dev/zero; echo THE-END"])
    peak = before["rss_kib"]
    started = time.monotonic()
    while process_state(server, process_id) == "running":
        peak = max(peak, server_usage(server.server_pid)["rss_kib"])
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    stream = server.attach(process_id)
    received, tail = 0, b""
    for message in stream:
        if isinstance(message, Output):
            received += len(message.data)
            tail = (tail + message.data)[-64:]
    print(f"\n{OUTPUT_BYTES} bytes while detached in {elapsed:.0f} s: server RSS "
          f"{before['rss_kib']} KiB -> peak {peak} KiB; replayed {received} bytes")
    assert tail.endswith(b"THE-END\n")
    assert received <= 256 * 1024
    assert peak <= before["rss_kib"] + 64 * 1024

"""Faults that a debugging session must survive, through the real `bkdbg` command and the
real local BuildKit.

The faults are killed clients and servers, many reloads and rollbacks in one server, 1 GB
of output with no client attached, two clients on one process, a client that vanishes
mid-stream, and stdin closed early.

Every test ends by checking that no server and no build container is left. The measuring
tests print what they measured (run pytest with -s to see it).

BuildKit restarting under a session is in test_buildkit_restart.py: it stops the local
engine itself, which only a run that owns the engine may do. A second Docker Engine on the
same host is no substitute, because it is not isolated from the first: Docker 26.1.5
started with --bridge=none deletes the docker0 bridge that the first engine's containers
need.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.buildkit import running_build_containers
from tests.helpers.context import TEST_IMAGE, MakeContext
from tests.helpers.faults import (
    BKDBG_SHELL,
    BUILD_TIMEOUT,
    MONITOR_PROMPT,
    SHELL_PROMPT,
    Usage,
    assert_no_servers,
    client_pid,
    describe,
    expect_in_shell,
    expect_match,
    kill_client,
    listed_ids,
    only_instance,
    outer_shell,
    pid_running,
    process_usage,
    run_bkdbg,
    server_log,
    server_pid,
    spawn_bkdbg,
    stop_servers,
    to_monitor,
    wait_for,
)
from tests.helpers.pty import PtySession

pytestmark = [pytest.mark.faults, pytest.mark.pty, pytest.mark.slow]

NOTICE_WAIT = 2.0  # seconds within which a client must report a dead server or a take-over
DETACHED_OUTPUT_DELAY = 2  # seconds after the kill at which the shell prints a line

ROLLBACK_CYCLES = 100
# 100 exec+reload cycles of a cached build took 62 s, and 100 exec+rollback cycles 72 s,
# on the machine these tests were written on
RELOAD_CYCLES = 100
FD_TOLERANCE = 4
THREAD_TOLERANCE = 4
RSS_TOLERANCE_KIB = 24 * 1024

LARGE_OUTPUT = 1 << 30  # bytes, written by `head -c` with no client attached
MAX_SERVER_RSS_KIB = 200 * 1024
MAX_REPLAY = 1 << 20  # bytes, well above the 256 KiB of output the server keeps per process


@pytest.fixture
def root(no_leaked_containers: None) -> Iterator[Path]:
    """The BKDBG_ROOT of this test.

    Servers that a failed test left are stopped before `no_leaked_containers` looks.
    """
    path = Path(os.environ["BKDBG_ROOT"])
    yield path
    stop_servers(path)


def shell_dockerfile(*steps: str) -> str:
    """Return a Dockerfile for busybox with the shell prompt SHELL_PROMPT and `steps`."""
    return "\n".join([f"FROM {TEST_IMAGE}", f'ENV PS1="{SHELL_PROMPT}"', *steps, ""])


@pytest.fixture
def context(make_context: MakeContext) -> Path:
    return make_context(shell_dockerfile("RUN echo built > /built"))


def build_args(addr: str, context: Path, *flags: str) -> list[str]:
    return ["--addr", addr, "build", "--progress", "plain", *flags, "--invoke", "sh", str(context)]


def end_session(term: PtySession) -> None:
    """Leave the container for the monitor and end the session with `exit`."""
    to_monitor(term)
    term.sendline("exit")
    assert term.close() == 0


# ---------------------------------------------------------------- kill -9 of the client


def kill_client_during_build(
    addr: str, make_context: MakeContext, root: Path
) -> tuple[str, int, str]:
    """Start a build with a 3 s step and kill -9 the client in that step.

    Returns the server's id and pid, and the text that the step wrote to /marker.
    """
    marker = f"built-{time.time_ns()}"  # a new RUN line, which BuildKit cannot take from cache
    context = make_context(shell_dockerfile(f"RUN echo {marker} > /marker && sleep 3"))
    with spawn_bkdbg(*build_args(addr, context), root=root) as term:
        term.expect_exact("sleep 3", timeout=BUILD_TIMEOUT)
        instance_id = only_instance(root)
        pid = server_pid(root, instance_id)
        kill_client(term)
    assert listed_ids(root) == [instance_id]
    assert pid_running(pid)
    return instance_id, pid, marker


def build_state(instance_id: str) -> str:
    """Return the BUILD column of `bkdbg list` for one server."""
    lines = run_bkdbg("list").stdout.splitlines()
    header = next(line for line in lines if line.startswith("ID "))
    column = header.index("BUILD")
    for line in lines:
        if line.startswith(instance_id):
            return line[column:].split()[0]
    raise AssertionError(f"bkdbg list has no row for {instance_id}: {lines}")


def test_client_killed_during_build(buildkit_addr, make_context, root):
    instance_id, pid, marker = kill_client_during_build(buildkit_addr, make_context, root)
    wait_for(lambda: build_state(instance_id) != "building", BUILD_TIMEOUT, "the build to end")

    with spawn_bkdbg("attach", instance_id, root=root) as term:
        # the shell started while no client was attached: its banner is replayed
        term.expect_exact("built-in shell")
        term.expect_exact(SHELL_PROMPT)
        expect_in_shell(term, "cat /marker", marker)
        end_session(term)
    assert_no_servers(root, [pid])


def test_attach_while_build_runs(buildkit_addr, make_context, root):
    instance_id, pid, marker = kill_client_during_build(buildkit_addr, make_context, root)
    assert build_state(instance_id) == "building"

    with spawn_bkdbg("attach", instance_id, root=root) as term:
        # attaching during the build follows it to the shell that --invoke starts
        term.expect_exact(SHELL_PROMPT, timeout=BUILD_TIMEOUT)
        expect_in_shell(term, "cat /marker", marker)
        end_session(term)
    assert_no_servers(root, [pid])


def test_client_killed_in_shell(buildkit_addr, context, root):
    with spawn_bkdbg(*build_args(buildkit_addr, context), root=root) as term:
        term.expect_exact(SHELL_PROMPT, timeout=BUILD_TIMEOUT)
        instance_id = only_instance(root)
        pid = server_pid(root, instance_id)
        # The file contains kept-42 and the typed line does not, so the replayed echo of
        # this line cannot satisfy the check after the attach. Each line ends by printing
        # a computed marker: a prompt could be a redraw of an earlier one, and the kill
        # would then lose a line that the shell had not read yet.
        expect_in_shell(term, "echo kept-$((40+2)) > /kept; echo wrote-$((5*5))", "wrote-25")
        expect_in_shell(
            term,
            f"(sleep {DETACHED_OUTPUT_DELAY}; echo while-detached-$((6*7))) & echo bg-$((3*3))",
            "bg-9",
        )
        kill_client(term)

    assert listed_ids(root) == [instance_id]
    time.sleep(DETACHED_OUTPUT_DELAY + 1)
    with spawn_bkdbg("attach", instance_id, root=root) as term:
        term.expect_exact("while-detached-42")
        expect_in_shell(term, "cat /kept", "kept-42")
        end_session(term)
    assert_no_servers(root, [pid])


def test_client_killed_at_monitor(buildkit_addr, context, root):
    with spawn_bkdbg(*build_args(buildkit_addr, context), root=root) as term:
        term.expect_exact(SHELL_PROMPT, timeout=BUILD_TIMEOUT)
        instance_id = only_instance(root)
        pid = server_pid(root, instance_id)
        expect_in_shell(term, "echo kept-$((40+2)) > /kept; echo wrote-$((5*5))", "wrote-25")
        to_monitor(term)
        kill_client(term)

    assert listed_ids(root) == [instance_id]
    with spawn_bkdbg("attach", instance_id, root=root) as term:
        # the shell still runs, so attach returns to it rather than to the monitor
        expect_in_shell(term, "cat /kept", "kept-42")
        end_session(term)
    assert_no_servers(root, [pid])


# ---------------------------------------------------------------- kill -9 of the server


def test_killed_server_reported_by_clients(buildkit_addr, context, root):
    with outer_shell(root) as first, outer_shell(root) as second:
        settings = first.stty(), second.stty()
        first.start(f"{BKDBG_SHELL} {' '.join(build_args(buildkit_addr, context))}")
        first.term.expect_exact(SHELL_PROMPT, timeout=BUILD_TIMEOUT)
        instance_id = only_instance(root)
        pid = server_pid(root, instance_id)

        # the second client takes the shell, and the first one drops to its monitor
        second.start(f"{BKDBG_SHELL} attach {instance_id}")
        first.term.expect_exact("took over")
        first.term.expect_exact(MONITOR_PROMPT)
        expect_in_shell(second.term, "echo second-$((6*7))", "second-42")

        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        for client in (second, first):
            remaining = max(0.1, NOTICE_WAIT - (time.monotonic() - killed))
            client.term.expect_exact(instance_id, timeout=remaining)
        reported = time.monotonic() - killed
        print(f"\nboth clients reported the dead server {reported:.2f} s after kill -9")

        statuses = first.exit_status(), second.exit_status()
        assert statuses[0] != 0
        assert statuses[1] != 0
        assert (first.stty(), second.stty()) == settings
        for client in (first, second):
            assert "Traceback" not in client.term.output
            lines = [line for line in client.term.output.splitlines() if "not running" in line]
            assert len(lines) == 1, client.term.output[-2000:]

    run_bkdbg("list")  # removes the dead server's directory unless a client already did
    assert_no_servers(root, [pid])


def test_list_prunes_dead_server(buildkit_addr, context, root, tmp_path):
    run_script(
        [f"build --progress quiet --invoke sh {context}", "detach"], tmp_path, addr=buildkit_addr
    )
    instance_id = only_instance(root)
    pid = server_pid(root, instance_id)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_running(pid), 5, f"server {pid} to die")

    first, second = run_bkdbg("list"), run_bkdbg("list")
    assert first.returncode == 0, describe(first)
    # reported once, by the list that removes it
    assert instance_id in first.stdout + first.stderr
    assert instance_id not in second.stdout + second.stderr
    assert_no_servers(root, [pid])


# ---------------------------------------------------------------- many cycles in one server


def run_script(lines: list[str], tmp_path: Path, *, addr: str = "", attach: str = "") -> float:
    """Run `lines` with `bkdbg run-script` and return the seconds it took.

    With `attach`, the script runs against that existing server.
    """
    script = tmp_path / f"script-{time.monotonic_ns()}.txt"
    script.write_text("\n".join(lines) + "\n")
    args = ["--addr", addr] if addr else []
    args += ["run-script", *(["--attach", attach] if attach else []), str(script)]
    started = time.monotonic()
    result = run_bkdbg(*args, timeout=300)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, describe(result)
    return elapsed


def server_containers(root: Path, instance_id: str) -> int:
    """Count the running build containers that this server created, by the ids it logged."""
    created = set(re.findall(r"created container (\S+)", server_log(root, instance_id)))
    return len(created & set(running_build_containers()))


def measure(root: Path, instance_id: str, pid: int) -> tuple[Usage, int]:
    return process_usage(pid), server_containers(root, instance_id)


def assert_no_growth(label: str, before: tuple[Usage, int], after: tuple[Usage, int]) -> None:
    (usage_before, containers_before), (usage_after, containers_after) = before, after
    assert usage_after.fds <= usage_before.fds + FD_TOLERANCE, label
    assert usage_after.threads <= usage_before.threads + THREAD_TOLERANCE, label
    assert usage_after.rss_kib <= usage_before.rss_kib + RSS_TOLERANCE_KIB, label
    assert containers_after == containers_before, label


@pytest.mark.timeout(420)
def test_rollback_reload_cycles_do_not_grow(buildkit_addr, context, root, tmp_path):
    # each cycle checks that the file the previous exec made is gone, then makes it again
    dirty = "exec sh -c 'test ! -e /dirty && touch /dirty'"
    warmup = [f"build --progress quiet --invoke sh {context}"]
    warmup += [dirty, "rollback", dirty, "reload"] * 5 + ["exec cat /built", "detach"]
    run_script(warmup, tmp_path, addr=buildkit_addr)
    instance_id = only_instance(root)
    pid = server_pid(root, instance_id)

    start = measure(root, instance_id, pid)
    assert start[1] == 1, "the server's container is not among the running ones"
    rollbacks = [dirty, "rollback"] * ROLLBACK_CYCLES + ["exec cat /built"]
    seconds = run_script(rollbacks, tmp_path, attach=instance_id)
    after_rollbacks = measure(root, instance_id, pid)
    print(
        f"\n{ROLLBACK_CYCLES} exec+rollback cycles in {seconds:.0f} s: "
        f"{start[0]}, {start[1]} container -> {after_rollbacks[0]}, {after_rollbacks[1]}"
    )

    reloads = [dirty, "reload"] * RELOAD_CYCLES + ["exec cat /built"]
    seconds = run_script(reloads, tmp_path, attach=instance_id)
    after_reloads = measure(root, instance_id, pid)
    print(
        f"{RELOAD_CYCLES} exec+reload cycles in {seconds:.0f} s: "
        f"{after_rollbacks[0]}, {after_rollbacks[1]} container -> "
        f"{after_reloads[0]}, {after_reloads[1]}"
    )

    assert_no_growth("rollback cycles", start, after_rollbacks)
    assert_no_growth("reload cycles", after_rollbacks, after_reloads)
    assert instance_id in run_bkdbg("kill", instance_id).stdout
    assert_no_servers(root, [pid])


# ---------------------------------------------------------------- 1 GB with no client


@pytest.mark.timeout(600)
def test_large_output_while_detached(buildkit_addr, make_context, root, tmp_path):
    writer = (
        f"head -c {LARGE_OUTPUT} /dev/zero\necho THE-END\ntouch /done\n"
        'read line\necho "read: $line"\n'
    )
    context = make_context(shell_dockerfile("COPY writer.sh /writer.sh"), {"writer.sh": writer})
    # no tty: the output goes through pipes, and stdin can be closed by the piped attach
    invoke = "entrypoint=sh,args=/writer.sh,tty=false"
    run_script(
        [f"build --progress quiet --invoke {invoke} {context}", "detach"],
        tmp_path,
        addr=buildkit_addr,
    )
    instance_id = only_instance(root)
    pid = server_pid(root, instance_id)
    before = process_usage(pid)

    # sample the server while the process writes, until /done exists in its container
    peak = before.rss_kib
    started = time.monotonic()
    done_check = tmp_path / "done.txt"
    done_check.write_text("exec test -e /done\n")
    next_check = started
    while True:
        peak = max(peak, process_usage(pid).rss_kib)
        if time.monotonic() >= next_check:
            result = run_bkdbg("run-script", "--attach", instance_id, str(done_check))
            if result.returncode == 0:
                break
            next_check = time.monotonic() + 2
        time.sleep(0.2)
    elapsed = time.monotonic() - started

    result = run_bkdbg("attach", instance_id, stdin="go\n")
    print(
        f"\n{LARGE_OUTPUT} bytes with no client in {elapsed:.0f} s; server {before} -> "
        f"peak RSS {peak / 1024:.1f} MiB; attach replayed {len(result.stdout)} characters"
    )
    assert result.returncode == 0, describe(result)
    assert result.stdout.endswith("THE-END\nread: go\n"), result.stdout[-200:]
    assert len(result.stdout) <= MAX_REPLAY
    assert peak < MAX_SERVER_RSS_KIB
    assert_no_servers(root, [pid])


# ---------------------------------------------------------------- two clients, one process


def test_second_client_takes_over_and_back(buildkit_addr, context, root):
    with spawn_bkdbg(*build_args(buildkit_addr, context), root=root) as first:
        first.expect_exact(SHELL_PROMPT, timeout=BUILD_TIMEOUT)
        instance_id = only_instance(root)
        pid = server_pid(root, instance_id)

        with spawn_bkdbg("attach", instance_id, root=root) as second:
            first.expect_exact("another client took over", timeout=NOTICE_WAIT)
            first.expect_exact(MONITOR_PROMPT)
            expect_in_shell(second, "echo second-$((6*7))", "second-42")
            # the first client's monitor still works, and its keys reach no process
            first.sendline("ps")
            first.expect_exact("running")
            assert "second-42" not in first.output

            # `attach` at the first client's monitor takes the process back
            first.sendline("attach")
            second.expect_exact("another client took over", timeout=NOTICE_WAIT)
            second.expect_exact(MONITOR_PROMPT)
            expect_in_shell(first, "echo first-$((6*7))", "first-42")
            assert "first-42" not in second.output
            took_over = [line for line in second.output.splitlines() if "took over" in line]
            assert len(took_over) == 1

            # the first exit leaves the server to the other client, the second ends it
            end_session(first)
            assert listed_ids(root) == [instance_id]
            second.sendline("exit")
            assert second.close() == 0
    assert_no_servers(root, [pid])


# ---------------------------------------------------------------- a client gone mid-stream


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGHUP], ids=["kill-9", "hangup"])
def test_client_gone_mid_stream(signum, buildkit_addr, context, root):
    with spawn_bkdbg(*build_args(buildkit_addr, context), root=root) as term:
        term.expect_exact(SHELL_PROMPT, timeout=BUILD_TIMEOUT)
        instance_id = only_instance(root)
        pid = server_pid(root, instance_id)
        term.sendline("i=0; while :; do i=$((i+1)); echo tick-$i; done")
        expect_match(term, r"tick-(\d+)\r\n")
        seen_before = int(expect_match(term, r"tick-(\d+)\r\n").group(1))
        os.kill(client_pid(term), signum)
        wait_for(lambda: not term.child.isalive(), 5, "the client to exit")

    peak = process_usage(pid).rss_kib
    for _ in range(10):  # the loop keeps writing with no client for a second
        peak = max(peak, process_usage(pid).rss_kib)
        time.sleep(0.1)
    assert listed_ids(root) == [instance_id]

    with spawn_bkdbg("attach", instance_id, root=root) as term:
        # the first line may be the replayed tail, the second is written after the attach
        expect_match(term, r"tick-(\d+)\r\n")
        assert int(expect_match(term, r"tick-(\d+)\r\n").group(1)) > seen_before
        term.sendcontrol("c")  # stops the loop; the shell survives
        expect_in_shell(term, "echo stopped-$((1+1))", "stopped-2", timeout=20)
        end_session(term)
    print(f"\nserver peak RSS with output and no client: {peak / 1024:.1f} MiB")
    assert peak < MAX_SERVER_RSS_KIB
    assert_no_servers(root, [pid])


# ---------------------------------------------------------------- stdin closed early


@pytest.mark.parametrize(
    ("invoke", "output"),
    [("cat", ""), ('sh -c "cat; echo after-eof"', "after-eof\n")],
    ids=["cat", "command-after-eof"],
)
def test_stdin_closed_early(invoke, output, buildkit_addr, context, root):
    result = run_bkdbg(
        "--addr", buildkit_addr, "build", "--progress", "quiet", "--invoke", invoke, str(context)
    )
    assert result.returncode == 0, describe(result)
    assert result.stdout == output
    assert "Traceback" not in result.stderr
    assert_no_servers(root)

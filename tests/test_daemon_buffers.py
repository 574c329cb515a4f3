"""Tests for the replay ring, the per-client send queue, and a process's output fan-out."""

from __future__ import annotations

import threading

from bkdbg.daemon.buffers import COALESCE_BYTES, RingBuffer, SendQueue
from bkdbg.daemon.messages import Attached, Closed, Exited, Output, TakenOver
from bkdbg.daemon.processes import ManagedProcess


def test_ring_keeps_last_bytes() -> None:
    ring = RingBuffer(capacity=10)
    ring.append(1, b"abcdef")
    ring.append(2, b"ghijkl")
    assert len(ring) == 10
    assert ring.snapshot() == [(1, b"cdef"), (2, b"ghijkl")]
    assert ring.dropped == 2


def test_ring_chunk_larger_than_capacity() -> None:
    ring = RingBuffer(capacity=4)
    ring.append(1, b"0123456789")
    assert ring.snapshot() == [(1, b"6789")]
    assert ring.dropped == 6


def test_ring_default_capacity_256k() -> None:
    ring = RingBuffer()
    for _ in range(100):
        ring.append(1, b"x" * 10_000)
    assert len(ring) == 256 * 1024


def test_queue_fifo_and_close() -> None:
    queue = SendQueue()
    queue.put(Output(1, b"a"))
    queue.put(Output(2, b"b"))
    queue.close()
    assert queue.get() == Output(1, b"a")
    assert queue.get() == Output(2, b"b")
    assert queue.get() is None


def test_queue_drops_oldest_output_and_counts() -> None:
    queue = SendQueue(max_bytes=10)
    queue.put(Attached("p1", ["sh"], False))
    for index in range(5):
        queue.put(Output(1, str(index).encode() * 4))
    assert queue.output_bytes <= 10
    assert queue.get() == Attached("p1", ["sh"], False)
    first = queue.get()
    assert first == Output(1, b"3333", dropped_bytes=12)
    assert queue.get() == Output(1, b"4444")


def test_queue_keeps_newest_oversized_chunk() -> None:
    queue = SendQueue(max_bytes=4)
    queue.put(Output(1, b"old"))
    queue.put(Output(1, b"much too big"))
    assert queue.get() == Output(1, b"much too big", dropped_bytes=3)


def test_queue_never_drops_control_messages() -> None:
    queue = SendQueue(max_bytes=2)
    queue.put(Output(1, b"aa"))
    queue.put(Output(1, b"bb"))
    queue.put(Exited(0))
    assert queue.get() == Output(1, b"bb", dropped_bytes=2)
    assert queue.get() == Exited(0)
    assert queue.get() is None


def test_queue_terminal_message_closes() -> None:
    queue = SendQueue()
    assert queue.put(TakenOver("c2"))
    assert not queue.put(Output(1, b"late"))
    assert queue.get() == TakenOver("c2")
    assert queue.get() is None


def test_queue_get_times_out() -> None:
    assert SendQueue().get(timeout=0.01) is None


def test_queue_abort_wakes_reader() -> None:
    queue = SendQueue()
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(queue.get()))
    reader.start()
    queue.abort()
    reader.join(2)
    assert result == [None]


def test_queue_memory_bounded_under_flood() -> None:
    queue = SendQueue(max_bytes=64 * 1024)
    for _ in range(10_000):
        queue.put(Output(1, b"z" * 1000))
    assert queue.output_bytes <= 64 * 1024
    assert queue.total_dropped >= 10_000 * 1000 - 64 * 1024


# ---------------------------------------------------------------- fan-out in a process


def new_process() -> ManagedProcess:
    return ManagedProcess("p1", ["sh"], False, on_exit=lambda process: None)


def drain(queue: SendQueue) -> list[object]:
    items = []
    while (item := queue.get(timeout=0)) is not None:
        items.append(item)
    return items


def test_output_while_detached_is_replayed() -> None:
    process = new_process()
    process.sink(1, b"while away\n")
    attachment = process.attach("c1", read_only=False, replay=True)
    assert drain(attachment.queue) == [
        Attached("p1", ["sh"], False, replayed_bytes=11),
        Output(1, b"while away\n"),
    ]
    assert len(process.ring) == 0


def test_output_while_attached_is_not_kept() -> None:
    process = new_process()
    attachment = process.attach("c1", read_only=False, replay=True)
    process.sink(1, b"seen live")
    process.detach(attachment)
    again = process.attach("c1", read_only=False, replay=True)
    assert drain(again.queue) == [Attached("p1", ["sh"], False, replayed_bytes=0)]


def test_replay_false_skips_kept_output() -> None:
    process = new_process()
    process.sink(2, b"old")
    attachment = process.attach("c1", read_only=False, replay=False)
    assert drain(attachment.queue) == [Attached("p1", ["sh"], False)]


def test_read_only_watcher_keeps_ring() -> None:
    process = new_process()
    process.sink(1, b"kept")
    watcher = process.attach("c2", read_only=True, replay=True)
    assert Output(1, b"kept") in drain(watcher.queue)
    process.sink(1, b"more")
    assert drain(watcher.queue) == [Output(1, b"more")]
    assert process.ring.snapshot() == [(1, b"kept"), (1, b"more")]


def test_takeover_ends_previous_input_stream() -> None:
    process = new_process()
    first = process.attach("c1", read_only=False, replay=False)
    second = process.attach("c2", read_only=False, replay=False)
    assert drain(first.queue)[-1] == TakenOver("c2")
    assert first.queue.closed
    process.sink(1, b"x")
    assert drain(second.queue)[-1] == Output(1, b"x")
    assert process.owner_client() == "c2"


def test_exit_reaches_every_attachment() -> None:
    process = new_process()
    owner = process.attach("c1", read_only=False, replay=False)
    watcher = process.attach("c2", read_only=True, replay=False)
    process.finish(4, "done")
    assert drain(owner.queue)[-1] == Exited(4, "done")
    assert drain(watcher.queue)[-1] == Exited(4, "done")


def test_attach_after_exit_gets_output_and_status() -> None:
    process = new_process()
    process.sink(1, b"last words")
    process.finish(0)
    attachment = process.attach("c1", read_only=False, replay=True)
    assert drain(attachment.queue) == [
        Attached("p1", ["sh"], False, replayed_bytes=10),
        Output(1, b"last words"),
        Exited(0),
    ]


def test_close_client_ends_only_its_streams() -> None:
    process = new_process()
    mine = process.attach("c1", read_only=False, replay=False)
    other = process.attach("c2", read_only=True, replay=False)
    process.close_client("c1", Closed("bye"))
    assert drain(mine.queue)[-1] == Closed("bye")
    assert not other.queue.closed
    assert process.owner_client() == ""


def test_get_joined_joins_one_fd() -> None:
    queue = SendQueue()
    for data in (b"a", b"b", b"c"):
        queue.put(Output(1, data))
    queue.put(Output(2, b"err"))
    queue.put(Output(1, b"d"))
    queue.put(Exited(0))
    assert queue.get_joined() == Output(1, b"abc")
    assert queue.get_joined() == Output(2, b"err")
    assert queue.get_joined() == Output(1, b"d")
    assert queue.get_joined() == Exited(0)
    assert queue.output_bytes == 0


def test_get_joined_stops_at_limit() -> None:
    chunk = b"x" * (COALESCE_BYTES // 2)
    queue = SendQueue(max_bytes=4 * COALESCE_BYTES)
    for _ in range(3):
        queue.put(Output(1, chunk))
    first = queue.get_joined()
    assert isinstance(first, Output)
    assert len(first.data) == COALESCE_BYTES
    assert queue.get_joined() == Output(1, chunk)


def test_get_joined_keeps_drop_count() -> None:
    queue = SendQueue(max_bytes=4)
    for data in (b"aa", b"bb", b"cc"):
        queue.put(Output(1, data))
    assert queue.get_joined() == Output(1, b"bbcc", dropped_bytes=2)

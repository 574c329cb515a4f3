"""Bounded output storage: a process's replay ring and a client's send queue.

Both are written from the thread that receives a process's output. The ring and the
queues of read-only watchers drop their oldest output instead of waiting for space, so
that nobody who merely watches can stall the process. The queue of the client that holds
the process's input is lossless: the receiving thread waits for room in it, and so
BuildKit's flow control holds the process back, as a slow terminal or pipe would.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from bkdbg.daemon.messages import TERMINAL_MESSAGES, AttachMessage, Output

RING_BYTES = 256 * 1024
# per attached client: room for bursts of terminal output, and the most memory that one
# slow client can cost the server per attachment
QUEUE_BYTES = 1024 * 1024
# max bytes that `get_joined` joins into one Output. BuildKit sends 4-32 KiB chunks, and
# grpcio does the same Python work per message whatever its size, in the server and in
# the client. So joining what queued while the client was busy lets a slow client catch up.
COALESCE_BYTES = 1024 * 1024


class RingBuffer:
    """The last `capacity` bytes of a process's output, kept as (fd, bytes) chunks."""

    def __init__(self, capacity: int = RING_BYTES) -> None:
        self.capacity = capacity
        self._chunks: deque[tuple[int, bytes]] = deque()
        self._size = 0
        self.dropped = 0

    def __len__(self) -> int:
        return self._size

    def append(self, fd: int, data: bytes) -> None:
        if len(data) > self.capacity:
            self.dropped += len(data) - self.capacity
            data = data[-self.capacity :]
        self._chunks.append((fd, data))
        self._size += len(data)
        self._trim()

    def _trim(self) -> None:
        while self._size > self.capacity:
            fd, oldest = self._chunks.popleft()
            excess = self._size - self.capacity
            if excess < len(oldest):
                # keep the newest part of a chunk that only partly overflows
                self._chunks.appendleft((fd, oldest[excess:]))
                self._size -= excess
                self.dropped += excess
            else:
                self._size -= len(oldest)
                self.dropped += len(oldest)

    def snapshot(self) -> list[tuple[int, bytes]]:
        return list(self._chunks)

    def clear(self) -> None:
        self._chunks.clear()
        self._size = 0


class SendQueue:
    """Messages waiting to be sent to one attached client, bounded in output bytes.

    When the output queued exceeds `max_bytes`, a lossy queue drops the oldest output
    chunks (never the newest one, and never a control message), so a slow watcher sees the
    latest output and the count of bytes it missed. A lossless queue keeps everything and
    its writer calls `wait_for_room`. After `close()`, `get` returns None once the messages
    already queued are taken; `abort()` discards them as well.
    """

    def __init__(self, max_bytes: int = QUEUE_BYTES, lossless: bool = False) -> None:
        self.max_bytes = max_bytes
        self.lossless = lossless
        self._items: deque[AttachMessage] = deque()
        self._output_bytes = 0
        self._output_count = 0
        self._dropped = 0
        self._closed = False
        self._cond = threading.Condition()
        self.total_dropped = 0

    def put(self, message: AttachMessage) -> bool:
        """Queue `message` without waiting for space; return False when the queue is closed."""
        with self._cond:
            if self._closed:
                return False
            self._items.append(message)
            if isinstance(message, Output):
                self._output_bytes += len(message.data)
                self._output_count += 1
                if not self.lossless:
                    self._drop_oldest_output()
            if isinstance(message, TERMINAL_MESSAGES):
                self._closed = True
            self._cond.notify()
            return True

    def wait_for_room(self) -> None:
        """Wait until the output queued fits in `max_bytes`, or the queue is closed."""
        with self._cond:
            while self._output_bytes > self.max_bytes and not self._closed:
                self._cond.wait()

    def _drop_oldest_output(self) -> None:
        # the newest chunk always stays, even when it alone exceeds max_bytes
        while self._output_bytes > self.max_bytes and self._output_count > 1:
            index = self._oldest_output_index()
            dropped = self._items[index]
            assert isinstance(dropped, Output)
            del self._items[index]
            self._output_bytes -= len(dropped.data)
            self._output_count -= 1
            self._dropped += len(dropped.data)
            self.total_dropped += len(dropped.data)

    def _oldest_output_index(self) -> int:
        # control messages sit only at the ends (Attached first, a terminal one last), so
        # this scan stops at index 0 or 1
        for index, item in enumerate(self._items):
            if isinstance(item, Output):
                return index
        raise AssertionError("no output queued")

    def get(self, timeout: float | None = None) -> AttachMessage | None:
        """Return the next message, or None when closed and empty or after `timeout` s."""
        return self._get(timeout, 0)

    def get_joined(self, timeout: float | None = None) -> AttachMessage | None:
        """Return the next message like `get`, with queued output of the same fd joined.

        Only output that is already queued is joined, up to COALESCE_BYTES, so a single
        pending chunk (a keystroke's echo) is returned at once.
        """
        return self._get(timeout, COALESCE_BYTES)

    def _get(self, timeout: float | None, join_bytes: int) -> AttachMessage | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self._closed:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._take(join_bytes)

    def _take(self, join_bytes: int = 0) -> AttachMessage:
        message = self._items.popleft()
        if isinstance(message, Output):
            self._output_bytes -= len(message.data)
            self._output_count -= 1
            data = self._join_following(message, join_bytes) if join_bytes else message.data
            if self._dropped or data is not message.data:
                message = Output(message.fd, data, self._dropped)
                self._dropped = 0
            # wakes a writer in wait_for_room as well as other readers
            self._cond.notify_all()
        return message

    def _join_following(self, first: Output, join_bytes: int) -> bytes:
        """Return `first.data` joined with the output of the same fd queued right after it.

        The result has at most `join_bytes` bytes unless `first` alone is larger. Output is
        dropped only at the front of the queue, so `_dropped` still counts the bytes lost
        before `first`.
        """
        items = self._items
        size = len(first.data)
        parts = [first.data]
        while items:
            following = items[0]
            if not isinstance(following, Output) or following.fd != first.fd:
                break
            if size + len(following.data) > join_bytes:
                break
            items.popleft()
            parts.append(following.data)
            size += len(following.data)
            self._output_bytes -= len(following.data)
            self._output_count -= 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._closed = True
            self._items.clear()
            self._output_bytes = 0
            self._output_count = 0
            self._cond.notify_all()

    @property
    def output_bytes(self) -> int:
        with self._cond:
            return self._output_bytes

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

"""HTTP/2 framing (RFC 7540) for the session's server: constants, frames and the outbox."""

from __future__ import annotations

import struct
import threading

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

SETTING_INITIAL_WINDOW_SIZE = 4
SETTING_MAX_FRAME_SIZE = 5
NO_ERROR, PROTOCOL_ERROR, COMPRESSION_ERROR = 0x0, 0x1, 0x9
DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
MAX_WINDOW = (1 << 31) - 1


class ProtocolError(Exception):
    """The peer broke HTTP/2 or gRPC framing; the connection cannot go on."""


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """Return one HTTP/2 frame."""
    return pack_header(len(payload), kind, flags, stream_id) + payload


# a frame header: the 24-bit length and the type share the first four bytes
FRAME_HEADER = struct.Struct(">IBI")


def pack_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return FRAME_HEADER.pack(length << 8 | kind, flags, stream_id)


class Outbox:
    """Bytes for the peer, in order; `take` hands them out in large batches."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._cond = threading.Condition(threading.Lock())
        self._closed = False

    def put(self, data: bytes) -> None:
        with self._cond:
            if self._closed:
                return
            self._chunks.append(data)
            if len(self._chunks) == 1:
                self._cond.notify()

    def put_urgent(self, data: bytes) -> None:
        """Queue a control frame ahead of queued data (every chunk is whole frames)."""
        with self._cond:
            if self._closed:
                return
            self._chunks.insert(0, data)
            if len(self._chunks) == 1:
                self._cond.notify()

    def take(self, max_bytes: int) -> bytes | None:
        """Wait for data; return up to about `max_bytes` of it, or None once closed."""
        with self._cond:
            while not self._chunks and not self._closed:
                self._cond.wait()
            if not self._chunks:
                return None
            size = 0
            count = 0
            for chunk in self._chunks:
                if count and size + len(chunk) > max_bytes:
                    break
                size += len(chunk)
                count += 1
            batch = self._chunks[:count]
            del self._chunks[:count]
        return b"".join(batch)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def strip_padding(flags: int, payload: bytes) -> bytes:
    if not flags & FLAG_PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise ProtocolError("invalid padding")
    return payload[1 : len(payload) - payload[0]]

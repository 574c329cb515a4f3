"""FileSync.DiffCopy: the sender side of fsutil's transfer, which uploads build contexts.

BuildKit calls DiffCopy on the client's session once per local source it needs (the
Dockerfile dir, the .dockerignore, the context, named contexts). The request metadata
names the local dir and carries the filters; the client filters (fswalk), then:

1. sends one STAT packet per entry in walk order, then a STAT packet with no stat;
2. responds to each REQ{ID} (ID = index of the entry in the STAT sequence) with DATA
   packets streamed from the file and an empty DATA packet at its end, even while
   stats are still being sent, so REQs are read between the packets it sends;
3. answers the receiver's FIN with a FIN and ends the stream. An ERR packet from either
   side aborts the transfer.
"""

from __future__ import annotations

import collections
import logging
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import grpc

from bkdbg.buildkit_proto import fsutil_types_pb2
from bkdbg.errors import UsageError
from bkdbg.gateway.fswalk import FilteredWalk, WalkedEntry
from bkdbg.gateway.h2call import RequestStream, ResponseBatch

logger = logging.getLogger(__name__)

Packet = fsutil_types_pb2.Packet

# fsutil sends 32 KiB chunks; 64 KiB halves the per-message cost and stays far below
# grpc's 4 MiB default limit on the daemon's side
CHUNK_SIZE = 64 * 1024
# Packets go to the session's server in batches of about BATCH_BYTES. A context of
# 20,000 small files makes some 60,000 packets, and each batch costs one wakeup of the
# connection's writer instead of one per packet. A batch also goes out when a packet
# arrives BATCH_AGE seconds after its first one, and before the sender waits for the
# receiver.
BATCH_BYTES = 256 * 1024
BATCH_AGE = 0.01
PACKET_OVERHEAD = 64  # bytes counted for a packet besides its data, an estimate

KEY_DIR_NAME = "dir-name"
KEY_INCLUDE_PATTERNS = "include-patterns"
KEY_EXCLUDE_PATTERNS = "exclude-patterns"
KEY_FOLLOW_PATHS = "followpaths"
ENCODED_SUFFIX = "-encoded"
GO_TRUE = ("1", "t", "T", "TRUE", "true", "True")  # Go's strconv.ParseBool


@dataclass(frozen=True)
class LocalDir:
    """A local directory the session may send, under the name BuildKit requests it by.

    `excludes` are applied after the patterns BuildKit sends, so no `!` pattern from a
    .dockerignore can re-include what they exclude.
    """

    path: str
    excludes: tuple[str, ...] = ()


def decode_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> dict[str, list[str]]:
    """Group request metadata by key and undo BuildKit's escaping of non-ASCII values.

    BuildKit query-escapes every value of a key when one is not ASCII and then adds
    `<key>-encoded: 1` (session/filesync encodeOpts).
    """
    grouped: dict[str, list[str]] = collections.defaultdict(list)
    for key, value in metadata:
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        grouped[key].append(text)
    decoded: dict[str, list[str]] = {}
    for key, values in grouped.items():
        flag = grouped.get(key + ENCODED_SUFFIX)
        if flag and flag[0] in GO_TRUE:
            values = [urllib.parse.unquote_plus(value) for value in values]
        decoded[key] = values
    return decoded


class TransferAborted(Exception):
    """The receiver sent ERR or an invalid request, or the stream ended early."""


class FileSyncService:
    """Serves the session's local dirs to BuildKit (service moby.filesync.v1.FileSync)."""

    SERVICE = "moby.filesync.v1.FileSync"
    # TarStream is served (as UNIMPLEMENTED) but not announced: BuildKit only uses DiffCopy
    METHODS = ("/moby.filesync.v1.FileSync/DiffCopy",)

    def __init__(self, dirs: Mapping[str, LocalDir]) -> None:
        self._dirs = dict(dirs)

    def start(self) -> None:
        """Nothing to prepare: each DiffCopy reads its dir when BuildKit calls it."""

    def close(self) -> None:
        """Nothing to release: DiffCopy streams end with the session's server."""

    def handler(self) -> grpc.GenericRpcHandler:
        """Return the gRPC handler for DiffCopy and TarStream.

        DiffCopy reads a RequestStream and yields ResponseBatches, so only the session's
        H2Server can serve it.
        """
        methods = {
            name: grpc.stream_stream_rpc_method_handler(
                method,
                request_deserializer=Packet.FromString,
                response_serializer=Packet.SerializeToString,
            )
            for name, method in (("DiffCopy", self.diff_copy), ("TarStream", self.tar_stream))
        }
        return grpc.method_handlers_generic_handler(self.SERVICE, methods)

    def diff_copy(
        self, request_iterator: RequestStream, context: grpc.ServicerContext
    ) -> Iterator[ResponseBatch | Packet]:
        options = decode_metadata(context.invocation_metadata())
        name = (options.get(KEY_DIR_NAME) or [""])[0]
        local = self._dirs.get(name)
        if local is None:
            logger.warning("BuildKit requested unknown local dir %r", name)
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"local dir not found: {name!r}: the session serves {sorted(self._dirs)}",
            )
        assert local is not None
        try:
            walk = make_walk(local, options)
        except UsageError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except OSError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, f"failed to read {local.path}: {exc}")
        return DiffCopySender(name, walk, request_iterator, context).run()

    def tar_stream(
        self, request_iterator: Iterator[Packet], context: grpc.ServicerContext
    ) -> Iterator[Packet]:
        # BuildKit only uses DiffCopy (the only protocol in filesync's supportedProtocols)
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "TarStream is not supported: use DiffCopy")
        return iter(())


def make_walk(local: LocalDir, options: Mapping[str, Sequence[str]]) -> FilteredWalk:
    """Build the filtered walk for one DiffCopy request."""
    excludes = options.get(KEY_EXCLUDE_PATTERNS)
    if local.excludes:
        excludes = [*(excludes or []), *local.excludes]
    return FilteredWalk(
        local.path,
        include_patterns=options.get(KEY_INCLUDE_PATTERNS),
        exclude_patterns=excludes,
        follow_paths=options.get(KEY_FOLLOW_PATHS),
    )


class DiffCopySender:
    """One DiffCopy stream: stats from the walk, file data on request, then FIN.

    The receiver's packets are read between the packets sent, from `requests` (the
    session server's RequestStream), so the transfer needs no thread of its own.
    """

    def __init__(
        self,
        name: str,
        walk: Iterable[WalkedEntry],
        requests: RequestStream,
        context: grpc.ServicerContext,
    ) -> None:
        self.name = name
        self._walk = walk
        self._requests = requests
        self._context = context
        self._files: dict[int, str] = {}  # requestable entry ID -> local path
        self._pending: collections.deque[int] = collections.deque()
        self._fin = False
        self._ended = False
        self._error: str | None = None
        self.entries = 0
        self.files_sent = 0
        self.bytes_sent = 0

    def run(self) -> Iterator[ResponseBatch | Packet]:
        """Yield the packets to send, mostly in batches (see BATCH_BYTES)."""
        started = time.monotonic()
        try:
            yield from batched(self._transfer())
        except OSError as exc:
            message = f"failed to send {exc.filename or self.name}: {exc.strerror or exc}"
            logger.warning("context transfer %r failed: %s", self.name, message)
            yield Packet(type=Packet.PACKET_ERR, data=message.encode())
            self._context.abort(grpc.StatusCode.UNKNOWN, message)
        except UsageError as exc:
            # a pattern whose regexp fails to compile fails when first matched, as in fsutil
            logger.warning("context transfer %r failed: %s", self.name, exc)
            yield Packet(type=Packet.PACKET_ERR, data=str(exc).encode())
            self._context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except TransferAborted as exc:
            logger.warning("context transfer %r aborted: %s", self.name, exc)
            self._context.abort(grpc.StatusCode.UNKNOWN, str(exc))
        logger.info(
            "sent dir %r: %d entries, %d files, %d bytes in %.3f s",
            self.name,
            self.entries,
            self.files_sent,
            self.bytes_sent,
            time.monotonic() - started,
        )

    def _transfer(self) -> Iterator[Packet | None]:
        """Yield every packet of the transfer, and None where a batch must go out now."""
        yield from self._send_stats()
        yield from self._serve_requests()

    def _send_stats(self) -> Iterator[Packet]:
        for entry in self._walk:
            if entry.requestable:
                self._files[self.entries] = entry.abs_path
            self.entries += 1
            yield Packet(type=Packet.PACKET_STAT, stat=entry.stat)
            # files requested while stats are still being sent are sent in between
            self._read_requests(wait=False)
            while self._pending:
                yield from self._send_file(self._pending.popleft())
            self._check_aborted()
        yield Packet(type=Packet.PACKET_STAT)

    def _serve_requests(self) -> Iterator[Packet | None]:
        while True:
            self._read_requests(wait=False)
            self._check_aborted()
            if self._pending:
                yield from self._send_file(self._pending.popleft())
            elif self._fin:
                yield Packet(type=Packet.PACKET_FIN)
                return
            elif self._ended:
                raise TransferAborted("the receiver closed the stream before FIN")
            else:
                yield None  # the receiver may wait for what is gathered
                self._read_requests(wait=True)

    def _send_file(self, file_id: int) -> Iterator[Packet]:
        path = self._files.pop(file_id, None)
        if path is None:
            raise TransferAborted(f"invalid file id {file_id}")
        try:
            file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed below, across yields)
        except OSError as exc:
            # NOTE: fsutil sends an unreadable file as empty, and so do we, to match
            # what buildx uploads; the warning is the only trace of it.
            logger.warning("sending %s as an empty file: %s", path, exc.strerror)
            file = None
        if file is not None:
            with file:
                while chunk := file.read(CHUNK_SIZE):
                    self.bytes_sent += len(chunk)
                    yield Packet(type=Packet.PACKET_DATA, ID=file_id, data=chunk)
        self.files_sent += 1
        yield Packet(type=Packet.PACKET_DATA, ID=file_id)

    def _check_aborted(self) -> None:
        if self._error is not None:
            raise TransferAborted(f"error from receiver: {self._error}")

    def _read_requests(self, wait: bool) -> None:
        """Queue the REQs that have arrived and note FIN, ERR or the end of the stream.

        With `wait`, wait for at least one packet (or the end) first.
        """
        while not (self._ended or self._error) and (wait or self._requests.ready()):
            wait = False
            packet = next(self._requests, None)
            if packet is None:
                self._ended = True
            elif packet.type == Packet.PACKET_REQ:
                self._pending.append(packet.ID)
            elif packet.type == Packet.PACKET_FIN:
                self._fin = True
            elif packet.type == Packet.PACKET_ERR:
                self._error = packet.data.decode("utf-8", "replace")


def batched(packets: Iterable[Packet | None]) -> Iterator[ResponseBatch]:
    """Group packets into batches of about BATCH_BYTES; a None sends the batch at once.

    When `packets` raises, the batch gathered so far is sent before the exception goes on.
    """
    batch = ResponseBatch()
    size = 0
    first = 0.0
    try:
        for packet in packets:
            if packet is not None:
                now = time.monotonic()
                if not batch:
                    first = now
                batch.append(packet)
                size += len(packet.data) + PACKET_OVERHEAD
                if size < BATCH_BYTES and now - first < BATCH_AGE:
                    continue
            if batch:
                yield batch
                batch = ResponseBatch()
                size = 0
    except Exception:
        if batch:
            yield batch
        raise
    if batch:
        yield batch

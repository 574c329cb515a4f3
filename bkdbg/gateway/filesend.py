"""FileSend.DiffCopy: where BuildKit's exporters send their files back to the client.

The metadata key `buildkit-attachable-exporter-id` is the index of the exporter in the
solve request, which picks the destination:
- a directory (the `local` exporter): although the method is declared with
  BytesMessage, the messages are fsutil Packets, with BuildKit as the sender. The
  receiver here writes each entry under the directory, requests every regular file,
  sends FIN when all have arrived and then reads until BuildKit ends the stream;
- a stream (`tar`, `oci`, `docker`): genuine BytesMessage chunks of one archive,
  appended in order until BuildKit closes its side.
Both handlers work on raw bytes, so each decodes the messages itself.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat as statmod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

import grpc

from bkdbg.buildkit_proto import filesync_pb2, fsutil_types_pb2
from bkdbg.gateway.filesync import decode_metadata
from bkdbg.gateway.fswalk import (
    MODE_CHAR_DEVICE,
    MODE_DEVICE,
    MODE_DIR,
    MODE_NAMED_PIPE,
    MODE_SETGID,
    MODE_SETUID,
    MODE_STICKY,
    MODE_SYMLINK,
    is_requestable,
)
from bkdbg.gateway.gopattern import go_clean

logger = logging.getLogger(__name__)

Packet = fsutil_types_pb2.Packet
KEY_EXPORTER_ID = "buildkit-attachable-exporter-id"
TEMP_PREFIX = ".tmp.bkdbg."


class ExportDestination(Protocol):
    """The destination of exporter number `index`: a `directory` or a `stream`."""

    @property
    def index(self) -> int: ...

    @property
    def directory(self) -> str | None: ...

    @property
    def stream(self) -> BinaryIO | None: ...


class ReceiveError(Exception):
    """The sender broke the protocol, sent an unsafe path, or a write failed."""


class FileSendService:
    """Receives exporter output (service moby.filesync.v1.FileSend)."""

    SERVICE = "moby.filesync.v1.FileSend"
    METHODS = ("/moby.filesync.v1.FileSend/DiffCopy",)

    def __init__(self, destinations: Sequence[ExportDestination]) -> None:
        self._destinations = {destination.index: destination for destination in destinations}

    def start(self) -> None:
        """Nothing to prepare: destinations are opened when BuildKit sends to them."""

    def close(self) -> None:
        """Nothing to release: each transfer closes what it opened."""

    def handler(self) -> grpc.GenericRpcHandler:
        """Return the raw-bytes handler for DiffCopy."""
        method: grpc.RpcMethodHandler[bytes, bytes] = grpc.stream_stream_rpc_method_handler(
            self.diff_copy
        )
        return grpc.method_handlers_generic_handler(self.SERVICE, {"DiffCopy": method})

    def diff_copy(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        destination = self._destination(context)
        if destination.directory is not None:
            return self._receive_tree(destination.directory, request_iterator, context)
        assert destination.stream is not None
        return self._receive_archive(destination.stream, request_iterator, context)

    def _destination(self, context: grpc.ServicerContext) -> ExportDestination:
        values = decode_metadata(context.invocation_metadata()).get(KEY_EXPORTER_ID)
        try:
            index = int(values[0]) if values else 0
        except (TypeError, ValueError):
            index = 0  # BuildKit's own client falls back to exporter 0 as well
        destination = self._destinations.get(index)
        if destination is None or (destination.directory is None and destination.stream is None):
            logger.warning(
                "BuildKit sent the output of exporter %d, which has no destination", index
            )
            context.abort(grpc.StatusCode.NOT_FOUND, f"exporter {index} not found")
        assert destination is not None
        return destination

    def _receive_tree(
        self, directory: str, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        receiver = TreeReceiver(directory)
        try:
            for raw in requests:
                yield from receiver.handle(Packet.FromString(raw))
        except (ReceiveError, OSError) as exc:
            message = f"failed to write the export to {directory}: {exc}"
            logger.warning("%s", message)
            yield Packet(type=Packet.PACKET_ERR, data=message.encode()).SerializeToString()
            context.abort(grpc.StatusCode.UNKNOWN, message)
        finally:
            receiver.close()
        if not receiver.finished:
            logger.warning("export to %s: the stream ended before FIN", directory)
            context.abort(grpc.StatusCode.UNKNOWN, "the export stream ended before FIN")
        logger.info(
            "export to %s: %d entries, %d bytes",
            directory,
            receiver.entries,
            receiver.bytes_written,
        )

    def _receive_archive(
        self, stream: BinaryIO, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        total = 0
        try:
            for raw in requests:
                data = filesync_pb2.BytesMessage.FromString(raw).data
                stream.write(data)
                total += len(data)
            stream.flush()
        except OSError as exc:
            context.abort(grpc.StatusCode.UNKNOWN, f"failed to write the export: {exc}")
        logger.info("export archive: %d bytes", total)
        return iter(())


@dataclass
class PendingFile:
    path: str
    mode: int
    mtime_ns: int
    file: BinaryIO | None = None


@dataclass
class TreeReceiver:
    """The receiving side of fsutil's transfer, writing into `root` (merge mode)."""

    root: str
    entries: int = 0
    bytes_written: int = 0
    finished: bool = False
    _stats_done: bool = False
    _fin_sent: bool = False
    _files: dict[int, PendingFile] = field(default_factory=dict)
    _dir_times: list[tuple[str, int]] = field(default_factory=list)
    _real_root: str = ""

    def __post_init__(self) -> None:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self._real_root = os.path.realpath(self.root)

    def handle(self, packet: fsutil_types_pb2.Packet) -> Iterator[bytes]:
        """Apply one packet; yield the packets to send back (serialized)."""
        if packet.type == Packet.PACKET_STAT:
            yield from self._on_stat(packet)
        elif packet.type == Packet.PACKET_DATA:
            self._on_data(packet)
        elif packet.type == Packet.PACKET_FIN:
            self.finished = True
            return
        elif packet.type == Packet.PACKET_ERR:
            raise ReceiveError(f"error from sender: {packet.data.decode('utf-8', 'replace')}")
        else:
            raise ReceiveError(f"unexpected packet type {packet.type}")
        if self._stats_done and not self._files and not self._fin_sent:
            self._fin_sent = True
            self._set_dir_times()
            yield Packet(type=Packet.PACKET_FIN).SerializeToString()

    def _on_stat(self, packet: fsutil_types_pb2.Packet) -> Iterator[bytes]:
        if not packet.HasField("stat"):
            self._stats_done = True
            return
        entry_id = self.entries
        self.entries += 1
        stat = packet.stat
        path = self._local_path(stat.path)
        if is_requestable(stat.mode) and not stat.linkname:
            self._files[entry_id] = PendingFile(path, stat.mode, stat.modTime)
            self._create(path, stat)
            yield Packet(type=Packet.PACKET_REQ, ID=entry_id).SerializeToString()
        else:
            self._create(path, stat)

    def _on_data(self, packet: fsutil_types_pb2.Packet) -> None:
        pending = self._files.get(packet.ID)
        if pending is None:
            raise ReceiveError(f"invalid file request {packet.ID}")
        if pending.file is None:
            pending.file = open(pending.path, "wb", buffering=0)  # noqa: SIM115 (closed at end)
        if packet.data:
            pending.file.write(packet.data)
            self.bytes_written += len(packet.data)
            return
        pending.file.close()
        del self._files[packet.ID]
        _set_metadata(pending.path, pending.mode, pending.mtime_ns)

    def _local_path(self, wire_path: str) -> str:
        """Map a path from the sender to a path under root, refusing escapes."""
        cleaned = go_clean(wire_path)
        if cleaned != wire_path or cleaned in (".", "") or cleaned.startswith(("/", "../")):
            raise ReceiveError(f"invalid path from sender: {wire_path!r}")
        if cleaned == ".." or "\x00" in cleaned:
            raise ReceiveError(f"invalid path from sender: {wire_path!r}")
        local = os.path.join(self.root, cleaned)
        parent = os.path.realpath(os.path.dirname(local))
        if parent != self._real_root and not parent.startswith(self._real_root + os.sep):
            raise ReceiveError(f"path from sender leaves the export dir: {wire_path!r}")
        return local

    def _create(self, path: str, stat: fsutil_types_pb2.Stat) -> None:
        mode = stat.mode
        existing = _lstat_or_none(path)
        if mode & MODE_DIR:
            if existing is not None and statmod.S_ISDIR(existing.st_mode):
                os.chmod(path, _posix_permissions(mode))
            else:
                _remove(path, existing)
                os.mkdir(path, 0o700)
                os.chmod(path, _posix_permissions(mode))
            self._dir_times.append((path, stat.modTime))
            return
        temp = os.path.join(os.path.dirname(path), TEMP_PREFIX + str(self.entries))
        link_target = ""
        if stat.linkname and not mode & MODE_SYMLINK:
            link_target = self._local_path(stat.linkname)  # a hard link stays inside root
        _create_non_dir(temp, link_target, stat)
        if existing is not None and statmod.S_ISDIR(existing.st_mode):
            shutil.rmtree(path)
        os.replace(temp, path)

    def _set_dir_times(self) -> None:
        # last, deepest first: writing into a directory changes its mtime
        for path, mtime_ns in sorted(self._dir_times, reverse=True):
            os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    def close(self) -> None:
        for pending in self._files.values():
            if pending.file is not None:
                pending.file.close()


def _create_non_dir(temp: str, link_target: str, stat: fsutil_types_pb2.Stat) -> None:
    """Create a file, symlink, hard link, FIFO or device at `temp` with its metadata."""
    mode = stat.mode
    if mode & MODE_SYMLINK:
        os.symlink(stat.linkname, temp)
    elif mode & MODE_DEVICE:
        kind = statmod.S_IFCHR if mode & MODE_CHAR_DEVICE else statmod.S_IFBLK
        os.mknod(temp, kind | _posix_permissions(mode), os.makedev(stat.devmajor, stat.devminor))
    elif mode & MODE_NAMED_PIPE:
        os.mkfifo(temp, _posix_permissions(mode))
    elif stat.linkname:
        # a hard link shares the metadata of the file it links to
        os.link(link_target, temp, follow_symlinks=False)
        return
    else:
        # created writable for us; the final mode and mtime are set once the data is in
        os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    _set_xattrs(temp, stat)
    if is_requestable(mode):
        return
    _set_metadata(temp, mode, stat.modTime)


def _set_xattrs(path: str, stat: fsutil_types_pb2.Stat) -> None:
    for name, value in stat.xattrs.items():
        try:
            os.setxattr(path, name, value, follow_symlinks=False)
        except OSError:
            pass  # fsutil ignores xattrs that the file system or our privileges reject


def _set_metadata(path: str, mode: int, mtime_ns: int) -> None:
    if not mode & MODE_SYMLINK:
        os.chmod(path, _posix_permissions(mode))
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def _posix_permissions(mode: int) -> int:
    """Convert Go FileMode permission and special bits to POSIX ones."""
    result = mode & 0o777
    if mode & MODE_SETUID:
        result |= statmod.S_ISUID
    if mode & MODE_SETGID:
        result |= statmod.S_ISGID
    if mode & MODE_STICKY:
        result |= statmod.S_ISVTX
    return result


def _lstat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _remove(path: str, existing: os.stat_result | None) -> None:
    if existing is None:
        return
    if statmod.S_ISDIR(existing.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)

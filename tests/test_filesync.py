"""Tests of the context upload (walk order, filters, DiffCopy sender) and the export receiver."""

import os
import queue
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from bkdbg.buildkit_proto import fsutil_types_pb2
from bkdbg.gateway.filesend import ReceiveError, TreeReceiver
from bkdbg.gateway.filesync import (
    BATCH_BYTES,
    FileSyncService,
    LocalDir,
    batched,
    decode_metadata,
    make_walk,
)
from bkdbg.gateway.fswalk import (
    MODE_DIR,
    MODE_NAMED_PIPE,
    MODE_SETUID,
    MODE_SYMLINK,
    FilteredWalk,
    dedupe_paths,
    follow_links,
)
from tests.test_session import H2TestServer

Packet = fsutil_types_pb2.Packet
DIFF_COPY = "/moby.filesync.v1.FileSync/DiffCopy"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A tree with every kind of entry the sender handles."""
    root = tmp_path / "src"
    (root / "a.dir").mkdir(parents=True)
    (root / "a.dir" / "z").write_text("z\n")
    (root / "Dockerfile").write_text("FROM scratch\n")
    (root / ".dockerignore").write_text("")
    (root / "b").write_text("bee\n")
    (root / "empty").mkdir()
    os.link(root / "b", root / "hl")
    (root / "link").symlink_to("b")
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "deeper" / "y.txt").write_text("y\n")
    (root / "sub" / "x.txt").write_text("x\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o4755)
    (root / "ünï").mkdir()
    (root / "ünï" / "cödé.txt").write_text("unicode\n")
    os.mkfifo(root / "fifo")
    os.utime(root / "b", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    return root


def walk_paths(root: Path, **filters: Any) -> list[str]:
    return [entry.stat.path for entry in FilteredWalk(str(root), **filters)]


def test_walk_order_is_go_walkdir_order(source: Path) -> None:
    assert walk_paths(source) == [
        ".dockerignore",
        "Dockerfile",
        "a.dir",
        "a.dir/z",
        "b",
        "empty",
        "fifo",
        "hl",
        "link",
        "run.sh",
        "sub",
        "sub/deeper",
        "sub/deeper/y.txt",
        "sub/x.txt",
        "ünï",
        "ünï/cödé.txt",
    ]


def test_walk_stats(source: Path) -> None:
    stats = {entry.stat.path: entry for entry in FilteredWalk(str(source))}
    directory = stats["a.dir"].stat
    assert directory.mode == MODE_DIR | 0o755
    assert directory.size == 0
    assert stats["a.dir"].requestable is False

    regular = stats["b"].stat
    assert regular.mode == 0o644
    assert regular.size == 4
    assert regular.modTime == 1_600_000_000_123_456_789
    assert (regular.uid, regular.gid) == (0, 0)
    assert regular.linkname == ""
    assert stats["b"].requestable is True

    hardlink = stats["hl"].stat
    assert hardlink.linkname == "b"
    assert hardlink.size == 4  # fsutil keeps the size on later links

    symlink = stats["link"].stat
    assert symlink.mode == MODE_SYMLINK | 0o777
    assert symlink.linkname == "b"
    assert symlink.size == 1
    assert stats["link"].requestable is False

    assert stats["run.sh"].stat.mode == MODE_SETUID | 0o755
    assert stats["fifo"].stat.mode & MODE_NAMED_PIPE
    assert stats["fifo"].requestable is False


def test_walk_excluded_dir_sent_before_reincluded_file(source: Path) -> None:
    paths = walk_paths(source, exclude_patterns=["sub", "!sub/x.txt", "a.dir", "ünï/*.txt"])
    assert "sub/deeper" not in paths
    assert paths[paths.index("run.sh") + 1 :] == ["sub", "sub/x.txt", "ünï"]
    assert "a.dir" not in paths


def test_walk_wildcard_reinclude_walks_excluded_dirs(source: Path) -> None:
    paths = walk_paths(source, exclude_patterns=["**", "!**/*.txt"])
    assert paths == ["sub", "sub/deeper", "sub/deeper/y.txt", "sub/x.txt", "ünï", "ünï/cödé.txt"]


def test_walk_include_patterns(source: Path) -> None:
    assert walk_paths(source, include_patterns=["sub/deeper"]) == [
        "sub",
        "sub/deeper",
        "sub/deeper/y.txt",
    ]
    assert walk_paths(source, include_patterns=["*.txt"]) == []
    assert walk_paths(source, include_patterns=["**/*.txt"]) == [
        "sub",
        "sub/deeper",
        "sub/deeper/y.txt",
        "sub/x.txt",
        "ünï",
        "ünï/cödé.txt",
    ]


def test_walk_follow_paths_like_dockerfile_load(source: Path) -> None:
    follow = ["Dockerfile", "Dockerfile.dockerignore", "dockerfile"]
    assert walk_paths(source, follow_paths=follow) == ["Dockerfile"]
    assert walk_paths(source, follow_paths=[".dockerignore"]) == [".dockerignore"]


def test_walk_follow_paths_through_symlinks(source: Path) -> None:
    (source / "df").symlink_to("sub/x.txt")
    (source / "linkdir").symlink_to("sub/deeper")
    assert walk_paths(source, follow_paths=["df"]) == ["df", "sub", "sub/x.txt"]
    assert walk_paths(source, follow_paths=["linkdir/y.txt"]) == [
        "linkdir",
        "sub",
        "sub/deeper",
        "sub/deeper/y.txt",
    ]
    # a wildcard follows every symlink it matches: link -> b, linkdir -> sub/deeper
    assert follow_links(str(source), ["l*"]) == ["b", "l*", "sub/deeper"]


def test_walk_follow_root_means_everything(source: Path) -> None:
    assert follow_links(str(source), ["."]) is None
    assert len(walk_paths(source, follow_paths=["."])) == 16


def test_dedupe_paths() -> None:
    assert dedupe_paths(["a", "a/b", "ab", "c/d", "c/d/e"]) == ["a", "ab", "c/d"]
    assert dedupe_paths(["/x", "a"]) == ["a"]
    assert dedupe_paths(["a", "."]) is None


def test_walk_hardlink_to_excluded_file_is_sent_whole(source: Path) -> None:
    entries = {e.stat.path: e.stat for e in FilteredWalk(str(source), exclude_patterns=["b"])}
    assert entries["hl"].linkname == ""
    assert entries["hl"].size == 4


def test_walk_extra_excludes_win(source: Path) -> None:
    local = LocalDir(str(source), excludes=("sub",))
    walk = make_walk(local, {"exclude-patterns": ["!sub/x.txt"]})
    paths = [entry.stat.path for entry in walk]
    assert not any(path.startswith("sub") for path in paths)


def test_decode_metadata_unescapes_encoded_keys() -> None:
    decoded = decode_metadata(
        [
            ("dir-name", "context"),
            ("exclude-patterns", "%C3%BCn%C3%AF"),
            ("exclude-patterns", "a+b"),
            ("exclude-patterns-encoded", "1"),
            ("followpaths", "a+b"),
        ]
    )
    assert decoded["exclude-patterns"] == ["ünï", "a b"]
    assert decoded["followpaths"] == ["a+b"]
    assert decoded["dir-name"] == ["context"]


# --- the DiffCopy sender, through the session's HTTP/2 server ---------------------------


@pytest.fixture
def context_server(source: Path, tmp_path: Path) -> Iterator[H2TestServer]:
    """Serve `source` as the local dir "context"."""
    server = H2TestServer([FileSyncService({"context": LocalDir(str(source))}).handler()], tmp_path)
    yield server
    server.close()


def receive_all(
    channel: grpc.Channel, metadata: list[tuple[str, str]], request_ids: bool = True
) -> tuple[list[Any], dict[int, bytes]]:
    """Act as BuildKit's receiver: request every regular file, then FIN."""
    outgoing: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def requests() -> Iterator[Any]:
        while (packet := outgoing.get()) is not None:
            yield packet

    call = channel.stream_stream(
        DIFF_COPY,
        request_serializer=Packet.SerializeToString,
        response_deserializer=Packet.FromString,
    )
    stats: list[Any] = []
    data: dict[int, bytes] = {}
    pending: set[int] = set()
    stats_done = False
    for packet in call(requests(), metadata=metadata, timeout=60):
        if packet.type == Packet.PACKET_STAT and packet.HasField("stat"):
            regular = packet.stat.mode >> 19 == 0 and not packet.stat.linkname
            if request_ids and regular:
                pending.add(len(stats))
                outgoing.put(Packet(type=Packet.PACKET_REQ, ID=len(stats)))
            stats.append(packet.stat)
        elif packet.type == Packet.PACKET_STAT:
            stats_done = True
        elif packet.type == Packet.PACKET_DATA:
            if packet.data:
                data[packet.ID] = data.get(packet.ID, b"") + packet.data
            else:
                data.setdefault(packet.ID, b"")
                pending.discard(packet.ID)
        elif packet.type == Packet.PACKET_FIN:
            outgoing.put(None)
            continue
        if stats_done and not pending:
            outgoing.put(Packet(type=Packet.PACKET_FIN))
            stats_done = False
    return stats, data


def test_diffcopy_sends_stats_then_requested_data(
    context_server: H2TestServer, source: Path
) -> None:
    big = os.urandom(300_000)
    (source / "big.bin").write_bytes(big)
    with context_server.channel() as channel:
        stats, data = receive_all(channel, [("dir-name", "context")])
    paths = [s.path for s in stats]
    assert paths[:6] == [".dockerignore", "Dockerfile", "a.dir", "a.dir/z", "b", "big.bin"]
    assert data[paths.index("big.bin")] == big
    assert data[paths.index("b")] == b"bee\n"
    assert data[paths.index("ünï/cödé.txt")] == b"unicode\n"
    assert paths.index("hl") not in data


def test_diffcopy_many_files_span_batches(context_server: H2TestServer, source: Path) -> None:
    # far more than one batch of stats and data, plus a file larger than a batch
    many = source / "many"
    many.mkdir()
    contents = {f"many/f{index:04d}": os.urandom(index % 700) for index in range(1500)}
    for name, content in contents.items():
        (source / name).write_bytes(content)
    large = os.urandom(3 * BATCH_BYTES + 12345)
    (source / "many" / "large").write_bytes(large)
    with context_server.channel() as channel:
        stats, data = receive_all(channel, [("dir-name", "context")])
    paths = [s.path for s in stats]
    assert paths == walk_paths(source)
    for name, content in contents.items():
        assert data[paths.index(name)] == content
    assert data[paths.index("many/large")] == large


def test_diffcopy_receiver_error_aborts(context_server: H2TestServer) -> None:
    call = context_server.channel().stream_stream(
        DIFF_COPY,
        request_serializer=Packet.SerializeToString,
        response_deserializer=Packet.FromString,
    )
    requests = iter([Packet(type=Packet.PACKET_ERR, data=b"disk full")])
    with pytest.raises(grpc.RpcError) as caught:
        list(call(requests, metadata=[("dir-name", "context")], timeout=30))
    assert caught.value.code() == grpc.StatusCode.UNKNOWN
    assert caught.value.details() == "error from receiver: disk full"


def test_diffcopy_receiver_closing_before_fin_aborts(context_server: H2TestServer) -> None:
    call = context_server.channel().stream_stream(
        DIFF_COPY,
        request_serializer=Packet.SerializeToString,
        response_deserializer=Packet.FromString,
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(call(iter([]), metadata=[("dir-name", "context")], timeout=30))
    assert caught.value.code() == grpc.StatusCode.UNKNOWN
    assert caught.value.details() == "the receiver closed the stream before FIN"


def stat_packet(path: str) -> Any:
    return Packet(type=Packet.PACKET_STAT, stat=fsutil_types_pb2.Stat(path=path))


def test_batched_groups_until_size() -> None:
    chunk = b"x" * (BATCH_BYTES // 2)
    packets = [Packet(type=Packet.PACKET_DATA, ID=1, data=chunk) for _ in range(5)]
    batches = list(batched(iter(packets)))
    assert [len(batch) for batch in batches] == [2, 2, 1]
    assert [packet for batch in batches for packet in batch] == packets


def test_batched_sends_at_none() -> None:
    packets = [stat_packet("a"), None, None, stat_packet("b"), stat_packet("c")]
    batches = list(batched(iter(packets)))
    assert [[p.stat.path for p in batch] for batch in batches] == [["a"], ["b", "c"]]


def test_batched_sends_gathered_packets_before_error() -> None:
    def packets() -> Iterator[Any]:
        yield stat_packet("a")
        yield stat_packet("b")
        raise OSError("unreadable")

    gathered = []
    with pytest.raises(OSError, match="unreadable"):
        for batch in batched(packets()):
            gathered.extend(p.stat.path for p in batch)
    assert gathered == ["a", "b"]


def test_diffcopy_applies_request_filters(context_server: H2TestServer) -> None:
    metadata = [
        ("dir-name", "context"),
        ("exclude-patterns", "sub"),
        ("exclude-patterns", "!sub/x.txt"),
        ("exclude-patterns", "*.dir"),
    ]
    with context_server.channel() as channel:
        stats, _ = receive_all(channel, metadata, request_ids=False)
    assert [s.path for s in stats if s.path.startswith(("sub", "a."))] == ["sub", "sub/x.txt"]


def test_diffcopy_unknown_dir_not_found(context_server: H2TestServer) -> None:
    with context_server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        receive_all(channel, [("dir-name", "secret-dir")])
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "secret-dir" in caught.value.details()


def test_diffcopy_invalid_request_aborts(context_server: H2TestServer) -> None:
    call = context_server.channel().stream_stream(
        DIFF_COPY,
        request_serializer=Packet.SerializeToString,
        response_deserializer=Packet.FromString,
    )
    requests = iter([Packet(type=Packet.PACKET_REQ, ID=2)])  # a.dir: a directory
    with pytest.raises(grpc.RpcError) as caught:
        list(call(requests, metadata=[("dir-name", "context")], timeout=30))
    assert "invalid file id 2" in caught.value.details()


# --- the export receiver ----------------------------------------------------------------


def send_tree(source: Path, receiver: TreeReceiver) -> None:
    """Drive a receiver the way BuildKit's fsutil sender does, from a local walk."""
    entries = list(FilteredWalk(str(source)))
    requests: list[int] = []
    for entry in entries:
        for reply in receiver.handle(Packet(type=Packet.PACKET_STAT, stat=entry.stat)):
            requests.append(Packet.FromString(reply).ID)
    replies = list(receiver.handle(Packet(type=Packet.PACKET_STAT)))
    for file_id in requests:
        content = Path(entries[file_id].abs_path).read_bytes()
        if content:  # an empty DATA packet ends the file
            list(receiver.handle(Packet(type=Packet.PACKET_DATA, ID=file_id, data=content)))
        replies += receiver.handle(Packet(type=Packet.PACKET_DATA, ID=file_id))
    assert [Packet.FromString(reply).type for reply in replies] == [Packet.PACKET_FIN]


def test_receiver_recreates_tree(source: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    receiver = TreeReceiver(str(dest))
    send_tree(source, receiver)
    receiver.close()

    for path in source.rglob("*"):
        copy = dest / path.relative_to(source)
        original, copied = path.lstat(), copy.lstat()
        assert stat.S_IFMT(copied.st_mode) == stat.S_IFMT(original.st_mode), path
        assert stat.S_IMODE(copied.st_mode) == stat.S_IMODE(original.st_mode), path
        assert copied.st_mtime_ns == original.st_mtime_ns, path
        if path.is_symlink():
            assert os.readlink(copy) == os.readlink(path)
        elif path.is_file():
            assert copy.read_bytes() == path.read_bytes()
    assert (dest / "hl").stat().st_ino == (dest / "b").stat().st_ino


def test_receiver_merges_into_existing_dir(source: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / "b").mkdir(parents=True)  # a directory where the export has a file
    (dest / "kept.txt").parent.mkdir(exist_ok=True)
    (dest / "kept.txt").write_text("mine\n")
    send_tree(source, TreeReceiver(str(dest)))
    assert (dest / "b").read_text() == "bee\n"
    assert (dest / "kept.txt").read_text() == "mine\n"


@pytest.mark.parametrize("path", ["../escape", "/abs", "a/../../b", "a//b", "."])
def test_receiver_rejects_unsafe_paths(tmp_path: Path, path: str) -> None:
    receiver = TreeReceiver(str(tmp_path / "dest"))
    packet = Packet(type=Packet.PACKET_STAT, stat=fsutil_types_pb2.Stat(path=path, mode=0o644))
    with pytest.raises(ReceiveError, match="path from sender"):
        list(receiver.handle(packet))


def test_receiver_rejects_writes_through_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    receiver = TreeReceiver(str(tmp_path / "dest"))
    link = fsutil_types_pb2.Stat(path="evil", mode=MODE_SYMLINK | 0o777, linkname=str(outside))
    list(receiver.handle(Packet(type=Packet.PACKET_STAT, stat=link)))
    target = fsutil_types_pb2.Stat(path="evil/passwd", mode=0o644)
    with pytest.raises(ReceiveError, match="leaves the export dir"):
        list(receiver.handle(Packet(type=Packet.PACKET_STAT, stat=target)))
    assert list(outside.iterdir()) == []


def test_receiver_rejects_hardlink_outside(tmp_path: Path) -> None:
    receiver = TreeReceiver(str(tmp_path / "dest"))
    link = fsutil_types_pb2.Stat(path="hl", mode=0o644, linkname="../../etc/passwd")
    with pytest.raises(ReceiveError, match="invalid path"):
        list(receiver.handle(Packet(type=Packet.PACKET_STAT, stat=link)))


def test_diffcopy_bad_pattern_sends_err(context_server: H2TestServer) -> None:
    metadata = [("dir-name", "context"), ("exclude-patterns", "[Local-Only]")]
    with context_server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        receive_all(channel, metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid character class range" in caught.value.details()

"""Walk a local directory the way BuildKit's client sends it (tonistiigi/fsutil).

`FilteredWalk` yields one fsutil Stat per entry in the order the receiver requires:
Go's filepath.WalkDir order (names sorted by bytes, a directory before its children),
filtered by include patterns, exclude patterns and follow paths with fsutil's rules:
- an excluded directory is still walked when a `!` pattern could re-include something
  below it, and is then sent just before the first entry below it that is kept;
- the same holds for directories that no include pattern matches;
- follow paths become include patterns, and symlinks among them (or their parents) add
  their targets, as fsutil's FollowLinks resolves them.
Stats carry Go os.FileMode bits, uid = gid = 0 (as BuildKit's client resets them),
modification times in nanoseconds, symlink targets, xattrs, and for the second and
later paths of a hard-linked file the first path as `linkname`.
"""

from __future__ import annotations

import enum
import logging
import os
import stat as statmod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from bkdbg.buildkit_proto import fsutil_types_pb2
from bkdbg.gateway.dockerignore import NO_MATCH_INFO, MatchInfo, Pattern, PatternMatcher
from bkdbg.gateway.gopattern import BadPattern, go_clean, go_join, go_match

logger = logging.getLogger(__name__)

# Go os.FileMode type bits (io/fs), the mode encoding on the fsutil wire
MODE_DIR = 1 << 31
MODE_SYMLINK = 1 << 27
MODE_DEVICE = 1 << 26
MODE_NAMED_PIPE = 1 << 25
MODE_SOCKET = 1 << 24
MODE_SETUID = 1 << 23
MODE_SETGID = 1 << 22
MODE_CHAR_DEVICE = 1 << 21
MODE_STICKY = 1 << 20
MODE_IRREGULAR = 1 << 19
MODE_TYPE = (
    MODE_DIR
    | MODE_SYMLINK
    | MODE_NAMED_PIPE
    | MODE_SOCKET
    | MODE_DEVICE
    | MODE_CHAR_DEVICE
    | MODE_IRREGULAR
)
MODE_PERM = 0o777

# characters that make fsutil walk into every directory instead of only into those
# that are a prefix of some pattern
PATTERN_CHARS = "*[]?^\\"
XATTR_SKIPPED_PREFIX = "com.apple."


def go_file_mode(st_mode: int) -> int:
    """Convert a POSIX st_mode into Go's os.FileMode bits (os/stat_linux.go)."""
    mode = st_mode & MODE_PERM
    kind = statmod.S_IFMT(st_mode)
    if kind == statmod.S_IFBLK:
        mode |= MODE_DEVICE
    elif kind == statmod.S_IFCHR:
        mode |= MODE_DEVICE | MODE_CHAR_DEVICE
    elif kind == statmod.S_IFDIR:
        mode |= MODE_DIR
    elif kind == statmod.S_IFIFO:
        mode |= MODE_NAMED_PIPE
    elif kind == statmod.S_IFLNK:
        mode |= MODE_SYMLINK
    elif kind == statmod.S_IFSOCK:
        mode |= MODE_SOCKET
    if st_mode & statmod.S_ISUID:
        mode |= MODE_SETUID
    if st_mode & statmod.S_ISGID:
        mode |= MODE_SETGID
    if st_mode & statmod.S_ISVTX:
        mode |= MODE_STICKY
    return mode


def is_requestable(mode: int) -> bool:
    """Return whether the receiver may request the content of an entry (fsutil rule)."""
    return mode & MODE_TYPE == 0


def go_dev_major(device: int) -> int:
    return (device >> 8) & 0xFFF


def go_dev_minor(device: int) -> int:
    return (device & 0xFF) | ((device >> 12) & 0xFFF00)


def make_stat(
    rel_path: str, abs_path: str, st: os.stat_result, inodes: dict[tuple[int, int], str]
) -> fsutil_types_pb2.Stat:
    """Build the fsutil Stat of one entry, as fsutil's mkstat does with uid/gid reset.

    `inodes` maps (device, inode) of multiply linked files to the first path sent.
    """
    # fsutil clears the socket bit because archive/tar cannot store sockets, which leaves
    # a socket looking like a regular file
    mode = go_file_mode(st.st_mode) & ~MODE_SOCKET
    result = fsutil_types_pb2.Stat(path=rel_path, mode=mode, modTime=st.st_mtime_ns)
    if not statmod.S_ISDIR(st.st_mode):
        if statmod.S_ISBLK(st.st_mode) or statmod.S_ISCHR(st.st_mode):
            result.devmajor = go_dev_major(st.st_rdev)
            result.devminor = go_dev_minor(st.st_rdev)
        if st.st_nlink > 1:
            # fsutil keys by inode alone; the device is added so that bind mounts inside
            # a context cannot pair unrelated files
            key = (st.st_dev, st.st_ino)
            first = inodes.setdefault(key, rel_path)
            if first != rel_path:
                result.linkname = first
        result.size = st.st_size
        if statmod.S_ISLNK(st.st_mode):
            result.linkname = os.readlink(abs_path)
    _load_xattrs(abs_path, result)
    return result


def _load_xattrs(abs_path: str, result: fsutil_types_pb2.Stat) -> None:
    try:
        names = os.listxattr(abs_path, follow_symlinks=False)
    except OSError:
        return  # no xattr support on this file system (fsutil ignores ENOTSUP too)
    for name in names:
        if name.startswith(XATTR_SKIPPED_PREFIX):
            continue
        try:
            result.xattrs[name] = os.getxattr(abs_path, name, follow_symlinks=False)
        except OSError:
            continue


class Action(enum.Enum):
    SKIP = "skip"  # leave out, and do not walk into it
    HIDE = "hide"  # leave out, but walk into it (something below may be kept)
    SEND = "send"


@dataclass
class DirRecord:
    """A directory on the current walk path, with its pattern results for its children."""

    prefix: str  # relative path plus "/"
    rel_path: str
    abs_path: str
    include_info: MatchInfo = NO_MATCH_INFO
    exclude_info: MatchInfo = NO_MATCH_INFO
    sent: bool = False


@dataclass
class WalkedEntry:
    """One entry to send: its Stat and where it is on the local disk."""

    stat: fsutil_types_pb2.Stat
    abs_path: str
    requestable: bool


@dataclass
class FilteredWalk:
    """The entries of `root` to send, filtered as BuildKit's FileSync provider filters them.

    Raises UsageError for invalid patterns, and OSError for an unreadable root or a
    directory that is kept but cannot be listed.
    """

    root: str
    include_patterns: Sequence[str] | None = None
    exclude_patterns: Sequence[str] | None = None
    follow_paths: Sequence[str] | None = None
    include: PatternMatcher | None = field(init=False, default=None)
    exclude: PatternMatcher | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.root = os.path.realpath(self.root)
        if not os.path.isdir(self.root):
            raise NotADirectoryError(20, "not a directory", self.root)
        includes = list(self.include_patterns) if self.include_patterns is not None else None
        if self.follow_paths is not None:
            targets = follow_links(self.root, self.follow_paths)
            if targets is not None:
                includes = dedupe_paths([*(includes or []), *targets])
        if includes:
            self.include = PatternMatcher(includes)
        if self.exclude_patterns:
            self.exclude = PatternMatcher(self.exclude_patterns)
        self._only_prefix_includes = self.include is None or not any(
            _has_pattern_chars(p.without_trailing_glob())
            for p in self.include.patterns
            if not p.exclusion
        )
        self._only_prefix_exceptions = self.exclude is None or not any(
            _has_pattern_chars(p.without_trailing_glob())
            for p in self.exclude.patterns
            if p.exclusion
        )

    def __iter__(self) -> Iterator[WalkedEntry]:
        parents: list[DirRecord] = []
        inodes: dict[tuple[int, int], str] = {}
        stack = [("", _sorted_entries(self.root))]
        while stack:
            prefix, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            rel_path = prefix + entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            action, record = self._decide(rel_path, entry.path, is_dir, parents)
            if action is Action.SKIP:
                continue
            if action is Action.SEND:
                yield from self._send(entry.path, rel_path, parents, inodes, record)
            if record is not None:
                parents.append(record)
            if is_dir:
                children = self._children(entry.path, action)
                if children is not None:
                    stack.append((rel_path + "/", children))

    def _send(
        self,
        abs_path: str,
        rel_path: str,
        parents: list[DirRecord],
        inodes: dict[tuple[int, int], str],
        record: DirRecord | None,
    ) -> Iterator[WalkedEntry]:
        try:
            st = os.lstat(abs_path)
        except FileNotFoundError:
            return  # removed while we walk
        for parent in parents:
            if not parent.sent:
                parent.sent = True
                parent_st = os.lstat(parent.abs_path)
                parent_stat = make_stat(parent.rel_path, parent.abs_path, parent_st, inodes)
                yield WalkedEntry(parent_stat, parent.abs_path, False)
        if record is not None:
            record.sent = True
        stat = make_stat(rel_path, abs_path, st, inodes)
        yield WalkedEntry(stat, abs_path, is_requestable(stat.mode))

    def _children(self, abs_path: str, action: Action) -> Iterator[os.DirEntry[str]] | None:
        try:
            return _sorted_entries(abs_path)
        except (FileNotFoundError, NotADirectoryError):
            return None  # removed while we walk
        except PermissionError:
            if action is Action.HIDE:
                return None  # fsutil ignores unreadable directories it does not send
            raise

    def _decide(
        self, rel_path: str, abs_path: str, is_dir: bool, parents: list[DirRecord]
    ) -> tuple[Action, DirRecord | None]:
        """Apply fsutil's include and exclude rules to one entry (filterFS.Walk)."""
        if self.include is None and self.exclude is None:
            return Action.SEND, None
        while parents and not rel_path.startswith(parents[-1].prefix):
            parents.pop()
        parent = parents[-1] if parents else None
        record = DirRecord(rel_path + "/", rel_path, abs_path) if is_dir else None
        hide = False
        if self.include is not None:
            parent_info = parent.include_info if parent else NO_MATCH_INFO
            matched, info = self.include.matches_using_parent_results(rel_path, parent_info)
            if record is not None:
                record.include_info = info
            if not matched:
                if is_dir and self._only_prefix_includes and not self._may_include_below(rel_path):
                    return Action.SKIP, None
                hide = True
        if self.exclude is not None:
            parent_info = parent.exclude_info if parent else NO_MATCH_INFO
            matched, info = self.exclude.matches_using_parent_results(rel_path, parent_info)
            if record is not None:
                record.exclude_info = info
            if matched:
                if (
                    is_dir
                    and self._only_prefix_exceptions
                    and not self._may_reinclude_below(rel_path)
                ):
                    return Action.SKIP, None
                hide = True
        return (Action.HIDE if hide else Action.SEND), record

    def _may_include_below(self, rel_path: str) -> bool:
        assert self.include is not None
        return _prefix_of_any(rel_path, (p for p in self.include.patterns if not p.exclusion))

    def _may_reinclude_below(self, rel_path: str) -> bool:
        assert self.exclude is not None
        if not self.exclude.exclusions:
            return False
        return _prefix_of_any(rel_path, (p for p in self.exclude.patterns if p.exclusion))


def _prefix_of_any(rel_path: str, patterns: Iterable[Pattern]) -> bool:
    dir_prefix = rel_path + "/"
    return any((p.without_trailing_glob() + "/").startswith(dir_prefix) for p in patterns)


def _has_pattern_chars(text: str) -> bool:
    return any(char in PATTERN_CHARS for char in text)


def _sorted_entries(path: str) -> Iterator[os.DirEntry[str]]:
    """Return the entries of a directory in Go's order (names compared as bytes)."""
    with os.scandir(path) as scan:
        entries = list(scan)
    entries.sort(key=lambda entry: os.fsencode(entry.name))
    return iter(entries)


# --- follow paths (fsutil followlinks.go) ------------------------------------------------


def follow_links(root: str, paths: Sequence[str]) -> list[str] | None:
    """Resolve follow paths into include patterns: the paths and their symlink targets.

    Returns None when a path resolves to the root itself (no filtering at all).
    """
    resolved: set[str] = set()
    for path in paths:
        _follow(root, resolved, path)
    return dedupe_paths(sorted(resolved))


def _follow(root: str, resolved: set[str], path: str) -> None:
    path = go_join(".", path) or "."
    current = "."
    while True:
        first, sep, rest = path.partition("/")
        current = go_join(current, first)
        targets = _read_symlink(root, current, allow_wildcard=True)
        path = rest if sep else ""
        if (not path or targets is not None) and current in resolved:
            return
        if targets is not None:
            resolved.add(current)
            for target in targets:
                _follow(root, resolved, go_join(target, path))
            return
        if not path:
            resolved.add(current)
            return


def _read_symlink(root: str, rel_path: str, allow_wildcard: bool) -> list[str] | None:
    """Return the root-relative targets of a symlink (or of symlinks a wildcard names)."""
    directory, _, base = rel_path.rpartition("/")
    directory = directory or "."
    if allow_wildcard and _contains_wildcards(base):
        return _read_wildcard_symlinks(root, directory, base)
    if rel_path in (".", "/"):
        return None
    try:
        st = os.lstat(os.path.join(root, rel_path))
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not statmod.S_ISLNK(st.st_mode):
        return None
    link = go_clean(os.readlink(os.path.join(root, rel_path)))
    if link.startswith("/"):
        return [link]
    return [go_join("/", go_join(directory, link))]


def _read_wildcard_symlinks(root: str, directory: str, base: str) -> list[str] | None:
    try:
        names = sorted(os.listdir(os.path.join(root, directory)), key=os.fsencode)
    except (FileNotFoundError, NotADirectoryError):
        return None
    targets: list[str] = []
    for name in names:
        try:
            matched = go_match(base, name)
        except BadPattern:
            matched = False  # Go ignores the error here too
        if matched:
            targets.extend(_read_symlink(root, go_join(directory, name), False) or [])
    return targets or None


def _contains_wildcards(name: str) -> bool:
    skip = False
    for char in name:
        if skip:
            skip = False
        elif char == "\\":
            skip = True
        elif char in "*?[":
            return True
    return False


def dedupe_paths(paths: Sequence[str]) -> list[str] | None:
    """Drop paths below an earlier kept path; None when "." is among them (fsutil rule).

    Like fsutil's dedupePaths it expects sorted input and, as there, a path that starts
    with "/" is dropped while nothing has been kept yet.
    """
    result: list[str] = []
    last = ""
    for path in paths:
        if path == ".":
            return None
        if path.startswith(last + "/"):
            continue
        result.append(path)
        last = path
    return result

""".dockerignore files and BuildKit's path patterns (moby/patternmatcher semantics).

The rules, as patternmatcher v0.6.1 and its ignorefile package apply them:
- lines starting with `#` are comments, blank lines are skipped, and each pattern is
  trimmed, cleaned like Go's filepath.Clean and loses a leading `/`;
- `*` and `?` match within one path element, `[...]` is a bracket expression, and `**`
  matches any number of elements (zero too);
- a pattern that matches a directory also matches everything below it;
- `!pattern` re-includes what earlier patterns excluded, and the last matching pattern wins.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Iterable, Sequence

from bkdbg.errors import UsageError
from bkdbg.gateway.gopattern import (
    BadPattern,
    check_match_syntax,
    compile_go_regex,
    go_clean,
    go_trim_space,
)

DOCKERIGNORE = ".dockerignore"
UTF8_BOM = b"\xef\xbb\xbf"
# Go's bufio.Scanner, which ignorefile reads lines with, fails on longer lines
MAX_LINE_BYTES = 64 * 1024

# patternmatcher escapes these for its regexp because filepath.Match gives them no meaning
REGEX_ESCAPED = frozenset(".+()|{}$")

# A directory's per-pattern results, handed to its children (patternmatcher.MatchInfo);
# the empty tuple means "no information about the parent".
MatchInfo = tuple[bool, ...]
NO_MATCH_INFO: MatchInfo = ()


class MatchType(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"  # ends in `**`
    SUFFIX = "suffix"  # starts with `**`
    REGEXP = "regexp"


class Pattern:
    """One cleaned pattern; `exclusion` is True for a `!` pattern."""

    def __init__(self, text: str, exclusion: bool) -> None:
        self.text = text
        self.exclusion = exclusion
        self.dirs = text.split("/")
        self.match_type, self.go_regex = _translate(text)
        self._regex: re.Pattern[str] | None = None

    def __repr__(self) -> str:
        return f"Pattern({'!' if self.exclusion else ''}{self.text!r})"

    def match(self, path: str) -> bool:
        """Return whether the slash-separated `path` matches this pattern alone."""
        if self.match_type is MatchType.EXACT:
            return path == self.text
        if self.match_type is MatchType.PREFIX:
            return path.startswith(self.text[:-2])
        if self.match_type is MatchType.SUFFIX:
            suffix = self.text[2:]
            # `**/foo` also matches `foo` itself
            return path.endswith(suffix) or (suffix.startswith("/") and path == suffix[1:])
        if self._regex is None:
            # compiled on first use, as patternmatcher does, so an invalid regexp in a
            # pattern that is never consulted is no error
            self._regex = compile_go_regex(self.go_regex)
        return self._regex.search(path) is not None

    def without_trailing_glob(self) -> str:
        """Return the text without a final `/**` and then a final `/*` (as fsutil does)."""
        return self.text.removesuffix("/**").removesuffix("/*")


def _translate(text: str) -> tuple[MatchType, str]:
    """Return patternmatcher's kind of test for a pattern and, for REGEXP, its RE2 regexp."""
    regex = "^"
    kind = MatchType.EXACT
    pos = 0
    index = 0
    while pos < len(text):
        char = text[pos]
        pos += 1
        if char == "*" and text.startswith("*", pos):
            pos += 1
            if text.startswith("/", pos):
                pos += 1  # `**/` means the same as `**`
            if pos >= len(text):
                if kind is MatchType.EXACT:
                    kind = MatchType.PREFIX
                else:
                    regex += ".*"
                    kind = MatchType.REGEXP
            else:
                regex += "(.*/)?"
                kind = MatchType.REGEXP
            if index == 0:
                kind = MatchType.SUFFIX
        elif char == "*":
            regex += "[^/]*"
            kind = MatchType.REGEXP
        elif char == "?":
            regex += "[^/]"
            kind = MatchType.REGEXP
        elif char in REGEX_ESCAPED:
            regex += "\\" + char
        elif char == "\\":
            if pos < len(text):
                regex += "\\" + text[pos]
                pos += 1
                kind = MatchType.REGEXP
            else:
                regex += "\\"
        elif char in "[]":
            regex += char
            kind = MatchType.REGEXP
        else:
            regex += char
        index += 1
    return kind, regex + "$"


class PatternMatcher:
    """An ordered list of patterns, matched the way BuildKit's file transfers match them."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns: list[Pattern] = []
        self.exclusions = False
        for raw in patterns:
            text = go_trim_space(raw)
            if not text:
                continue
            text = go_clean(text)
            exclusion = text.startswith("!")
            if exclusion:
                if len(text) == 1:
                    raise UsageError('invalid pattern: "!": put a path after the "!"')
                text = text[1:]
                self.exclusions = True
            try:
                check_match_syntax(text)
            except BadPattern as exc:
                raise UsageError(f"invalid pattern: {raw!r}: {exc}: fix the pattern") from exc
            self.patterns.append(Pattern(text, exclusion))

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def matches_or_parent_matches(self, path: str) -> bool:
        """Return whether `path`, or one of its parent dirs, is matched by the patterns."""
        parents = _parent_dirs(path)
        matched = False
        for pattern in self.patterns:
            if pattern.exclusion != matched:
                continue  # only a `!` pattern can undo a match, and only a match needs undoing
            if pattern.match(path) or any(pattern.match(parent) for parent in parents):
                matched = not pattern.exclusion
        return matched

    def matches_using_parent_results(
        self, path: str, parent_info: MatchInfo
    ) -> tuple[bool, MatchInfo]:
        """Match `path` reusing its parent dir's results; return the result and this path's.

        With NO_MATCH_INFO, each pattern is also tried on every parent dir of `path`.
        """
        if parent_info and len(parent_info) != len(self.patterns):
            raise ValueError("wrong number of values in parent match info")
        matched = False
        results = [False] * len(self.patterns)
        for i, pattern in enumerate(self.patterns):
            hit = bool(parent_info) and parent_info[i]
            if not hit:
                if pattern.exclusion != matched:
                    continue
                hit = pattern.match(path)
                if not hit and not parent_info:
                    hit = any(pattern.match(parent) for parent in _parent_dirs(path))
            results[i] = hit
            if hit:
                matched = not pattern.exclusion
        return matched, tuple(results)


def _parent_dirs(path: str) -> list[str]:
    """Return "a", "a/b" for "a/b/c", splitting Go's filepath.Dir of the path."""
    parent = go_clean(path[: path.rfind("/") + 1])
    if parent == ".":
        return []
    parts = parent.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def parse_dockerignore(data: bytes, name: str = DOCKERIGNORE) -> list[str]:
    """Return the patterns in the content of a .dockerignore file, as BuildKit reads them."""
    patterns: list[str] = []
    lines = data.removeprefix(UTF8_BOM).split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    for number, raw in enumerate(lines, 1):
        if len(raw) > MAX_LINE_BYTES:
            raise UsageError(
                f"failed to read {name}: line {number} is longer than 64 KiB: shorten it"
            )
        line = raw.removesuffix(b"\r").decode("utf-8", "surrogateescape")
        if line.startswith("#"):
            continue
        pattern = _normalize_line(line)
        if pattern is not None:
            patterns.append(pattern)
    return patterns


def _normalize_line(line: str) -> str | None:
    pattern = go_trim_space(line)
    if not pattern:
        return None
    invert = pattern.startswith("!")
    if invert:
        pattern = go_trim_space(pattern[1:])
    if pattern:
        pattern = go_clean(pattern)
        if len(pattern) > 1 and pattern.startswith("/"):
            pattern = pattern[1:]
    return "!" + pattern if invert else pattern


def dockerignore_path(context_dir: str, dockerfile_path: str | None) -> str | None:
    """Return the ignore file BuildKit would use, or None when there is none.

    `<Dockerfile>.dockerignore` beside the Dockerfile wins over `.dockerignore` in the
    context, even when it is empty (dockerfile frontend, dockerui/config.go).
    """
    candidates: Sequence[str] = [os.path.join(context_dir, DOCKERIGNORE)]
    if dockerfile_path and dockerfile_path != "-":
        candidates = [dockerfile_path + DOCKERIGNORE, *candidates]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    return None


def read_dockerignore(context_dir: str, dockerfile_path: str | None = None) -> list[str]:
    """Read and check the patterns of the ignore file that applies to a build.

    Raises UsageError when the file cannot be read or contains an invalid pattern.
    """
    path = dockerignore_path(context_dir, dockerfile_path)
    if path is None:
        return []
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise UsageError(f"failed to read {path}: {exc.strerror}: check its permissions") from exc
    patterns = parse_dockerignore(data, path)
    try:
        PatternMatcher(patterns)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from exc
    return patterns

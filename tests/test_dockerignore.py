"""Tests of BuildKit's pattern semantics: matching, .dockerignore parsing and lookup."""

from pathlib import Path

import pytest

from bkdbg.errors import UsageError
from bkdbg.gateway.dockerignore import (
    MatchType,
    PatternMatcher,
    dockerignore_path,
    parse_dockerignore,
    read_dockerignore,
)
from bkdbg.gateway.gopattern import BadPattern, go_clean, go_match, go_regex_to_python

# (pattern, path, expected): one pattern against one path, parents included
SINGLE_PATTERN_CASES = [
    ("**", "file", True),
    ("**", "dir/file", True),
    ("**/", "file", True),
    ("**/**", "dir/file", True),
    ("dir/**", "dir/file", True),
    ("dir/**", "dir/dir2/file", True),
    ("dir/**", "dir", False),
    ("**/dir", "dir", True),
    ("**/dir", "dir/file", True),
    ("**/dir", "a/b/dir/file", True),
    ("**/dir2/*", "dir/dir2/file", True),
    ("**/dir2/**", "dir/dir2/dir3/file", True),
    ("**file", "file", True),
    ("**file", "dir/xfile", True),
    ("**/file", "dir/dir/file", True),
    ("**/file*", "dir/dir/file.txt", True),
    ("**/file*.txt", "dir/dir/file.txt", True),
    ("**/**/*.txt", "dir/dir/file.txt", True),
    ("**/**/*.txt2", "dir/dir/file.txt", False),
    ("**/*.txt", "file.txt", True),
    ("a**/*.txt", "a/dir/dir/file.txt", True),
    ("a/*.txt", "a/dir/file.txt", False),
    ("a/*.txt", "a/file.txt", True),
    ("a/*.txt**", "a/file.txt", True),
    ("*", "any/thing/below", True),
    ("*.go", "pkg/main.go", False),
    ("*/*.go", "pkg/main.go", True),
    ("a[b-d]e", "ace", True),
    ("a[b-d]e", "aae", False),
    ("a[^b-d]e", "aze", True),
    ("a[\\]]e", "a]e", True),
    (".*", ".foo", True),
    (".*", "foo", False),
    ("abc.def", "abcdef", False),
    ("abc?def", "abcZdef", True),
    ("abc?def", "abc/def", False),
    ("a\\*b", "a*b", True),
    ("a\\*b", "axb", False),
    ("a(b)c/def", "a(b)c/def", True),
    ("a.|)$(}+{bc", "a.|)$(}+{bc", True),
    ("abc/**", "abc", False),
    ("**/.foo", "bar.foo", False),
    ("docs", "docs/README.md", True),
    ("docs/", "docs/README.md", True),
    ("/docs", "docs/README.md", False),  # patterns reach the matcher without the leading "/"
    ("./docs", "docs/README.md", True),
    ("docs/../src", "src/main.go", True),
    ("ünï/cödé", "ünï/cödé/file", True),
    ("[[:digit:]]*", "7up", True),
    ("[[:digit:]]*", "up7", False),
    ("[[:^alpha:]]x", "1x", True),
    ("[*]", "*", False),  # RE2 reads the converted "[[^/]*]" as a class, a star and "]"
    ("[*]", "[]", True),
    ("a\\d", "a5", True),  # an escape passed on to RE2 keeps RE2's meaning
    ("file\\.txt", "file.txt", True),
    ("lin?", "line\n", False),  # RE2's "$" is the end of the text, not before a newline
]

# (patterns, path, expected): later patterns win, `!` re-includes
MULTI_PATTERN_CASES = [
    (["**", "!util/docker/web"], "util/docker/web/foo", False),
    (["**", "!util/docker/web", "util/docker/web/foo"], "util/docker/web/foo", True),
    (["docs", "!docs/README.md"], "docs/README.md", False),
    (["docs/*", "!docs/README.md"], "docs/README.md", False),
    (["docs/*", "!docs/README.md"], "docs/other.md", True),
    (["*.go", "!fileutils.go"], "fileutils.go", False),
    (["!fileutils.go", "*.go"], "fileutils.go", True),
    (["**/*.log", "!keep/*.log"], "keep/a.log", False),
    (["**/*.log", "!keep/*.log"], "other/a.log", True),
    (["**", "!dist/*.whl"], "dist/proxy-2.4.0rc3+g08acad9-py3-none-any.whl", False),
    (["  docs  ", "  !docs/README.md  "], "docs/README.md", False),
]


def chained_match(matcher: PatternMatcher, path: str) -> bool:
    """Match a path the way a walk does: parents first, passing their results down."""
    parts = path.split("/")
    info: tuple[bool, ...] = ()
    for depth in range(1, len(parts)):
        _, info = matcher.matches_using_parent_results("/".join(parts[:depth]), info)
    matched, _ = matcher.matches_using_parent_results(path, info)
    return matched


@pytest.mark.parametrize(("pattern", "path", "expected"), SINGLE_PATTERN_CASES)
def test_single_pattern_match(pattern: str, path: str, expected: bool) -> None:
    matcher = PatternMatcher([pattern])
    assert matcher.matches_or_parent_matches(path) is expected
    assert chained_match(matcher, path) is expected
    assert matcher.matches_using_parent_results(path, ())[0] is expected


@pytest.mark.parametrize(("patterns", "path", "expected"), MULTI_PATTERN_CASES)
def test_multi_pattern_match(patterns: list[str], path: str, expected: bool) -> None:
    matcher = PatternMatcher(patterns)
    assert matcher.matches_or_parent_matches(path) is expected
    assert chained_match(matcher, path) is expected


@pytest.mark.parametrize(
    ("pattern", "kind"),
    [
        ("*", MatchType.REGEXP),
        ("**", MatchType.SUFFIX),
        ("**/**", MatchType.REGEXP),
        ("dir/**", MatchType.PREFIX),
        ("**/dir", MatchType.SUFFIX),
        ("**/dir2/*", MatchType.REGEXP),
        ("abc.def", MatchType.EXACT),
        ("a(b)c/def", MatchType.EXACT),
        ("a[b-d]e", MatchType.REGEXP),
    ],
)
def test_pattern_kind(pattern: str, kind: MatchType) -> None:
    assert PatternMatcher([pattern]).patterns[0].match_type is kind


def test_pattern_regexp_text() -> None:
    pattern = PatternMatcher(["**/**/*.txt"]).patterns[0]
    assert pattern.go_regex == "^(.*/)?(.*/)?[^/]*\\.txt$"


@pytest.mark.parametrize(
    "pattern", ["[", "[^", "[^bc", "a[", "\\", "[]a]", "[-]", "[x-]", "[a-b-c]"]
)
def test_malformed_pattern_rejected(pattern: str) -> None:
    with pytest.raises(UsageError, match="invalid pattern"):
        PatternMatcher([pattern])


def test_lone_exclamation_rejected() -> None:
    with pytest.raises(UsageError, match='"!"'):
        PatternMatcher(["docs", "!"])


def test_invalid_regexp_fails_on_use() -> None:
    # filepath.Match accepts the reversed range l-O, RE2 does not; BuildKit fails at match time
    matcher = PatternMatcher(["[Local-Only]/"])
    with pytest.raises(UsageError, match="invalid character class range"):
        matcher.matches_or_parent_matches("x")


def test_invalid_regexp_unused_is_no_error() -> None:
    matcher = PatternMatcher(["![Local-Only]"])
    assert matcher.matches_or_parent_matches("x") is False


def test_blank_patterns_dropped() -> None:
    matcher = PatternMatcher(["docs", "", "   ", "config"])
    assert [p.text for p in matcher.patterns] == ["docs", "config"]
    assert matcher.exclusions is False


def test_exclusion_flag() -> None:
    matcher = PatternMatcher(["docs", "  !docs/README.md"])
    assert matcher.exclusions is True
    assert matcher.patterns[1].exclusion is True
    assert matcher.patterns[1].text == "docs/README.md"


@pytest.mark.parametrize(
    ("path", "cleaned"),
    [
        ("", "."),
        (".", "."),
        ("a/b/../c", "a/c"),
        ("a//b/./c/", "a/b/c"),
        ("../a", "../a"),
        ("a/../..", ".."),
        ("/../a", "/a"),
        ("//a", "/a"),
        ("!./foo", "!./foo"),
    ],
)
def test_go_clean(path: str, cleaned: str) -> None:
    assert go_clean(path) == cleaned


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("abc", "abc", True),
        ("a*", "ab/c", False),
        ("a*/b", "abc/b", True),
        ("a*b*c*d*e*/f", "axbxcxdxexxx/f", True),
        ("a*b?c*x", "abxbbxdbxebxczzy", False),
        ("ab[^e-g]", "abc", True),
        ("a?b", "a☺b", True),
        ("[a-ζ]*", "α", True),
        ("[\\-x]", "-", True),
        ("*x", "xxx", True),
    ],
)
def test_go_match(pattern: str, name: str, expected: bool) -> None:
    assert go_match(pattern, name) is expected


def test_go_match_checks_whole_pattern() -> None:
    # Go reports a malformed pattern even after the name stopped matching
    with pytest.raises(BadPattern):
        go_match("x[", "a")


def test_regex_translation_escapes_class_members() -> None:
    assert go_regex_to_python("[a-c]") == "[\\U00000061-\\U00000063]"
    assert go_regex_to_python("x$") == "x\\Z"


def test_parse_dockerignore_rules() -> None:
    content = (
        b"\xef\xbb\xbftest1\n/test2\n/a/file/here\n\nlastfile\n# comment\n"
        b"  # not a comment\n! /inverted/abs/path\n!\n! \r\ndir/../other/\r\n/\n"
    )
    assert parse_dockerignore(content) == [
        "test1",
        "test2",
        "a/file/here",
        "lastfile",
        "# not a comment",
        "!inverted/abs/path",
        "!",
        "!",
        "other",
        "/",
    ]


def test_parse_dockerignore_long_line_rejected() -> None:
    with pytest.raises(UsageError, match="longer than 64 KiB"):
        parse_dockerignore(b"a" * (64 * 1024 + 1))


def test_dockerfile_dockerignore_preferred(tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    (context / ".dockerignore").write_text("from-context\n")
    dockerfile = tmp_path / "build" / "app.Dockerfile"
    dockerfile.parent.mkdir()
    dockerfile.write_text("FROM scratch\n")
    assert read_dockerignore(str(context), str(dockerfile)) == ["from-context"]

    (tmp_path / "build" / "app.Dockerfile.dockerignore").write_text("")
    assert dockerignore_path(str(context), str(dockerfile)) == str(dockerfile) + ".dockerignore"
    assert read_dockerignore(str(context), str(dockerfile)) == []


def test_read_dockerignore_missing(tmp_path: Path) -> None:
    assert read_dockerignore(str(tmp_path), None) == []
    assert read_dockerignore(str(tmp_path), "-") == []


def test_read_dockerignore_invalid_pattern(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_text("ok\nbad[\n")
    with pytest.raises(UsageError, match=r"\.dockerignore: invalid pattern: 'bad\['"):
        read_dockerignore(str(tmp_path))

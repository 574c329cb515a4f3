"""Go's path pattern rules, as BuildKit applies them to context paths.

- `go_clean` is Go's `path/filepath.Clean` on a slash-separated path.
- `go_match` is Go's `path/filepath.Match` (used for follow paths with wildcards, and
  by patternmatcher to reject malformed patterns).
- `go_regex_to_python` rewrites the regular expressions that moby/patternmatcher builds
  for Go's RE2 dialect into Python `re` syntax with the same meaning.

All of it follows Go 1.22+ on Linux, where `\\` escapes the next character.
"""

from __future__ import annotations

import re

from bkdbg.errors import UsageError

MAX_RUNE = 0x10FFFF

# Go's unicode.IsSpace, which strings.TrimSpace uses; Python's str.strip also strips
# \x1c-\x1f, which Go keeps.
GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)

# RE2's POSIX classes (regexp/syntax perl_groups.go), as inclusive code point ranges
POSIX_CLASSES: dict[str, list[tuple[int, int]]] = {
    "alnum": [(0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A)],
    "alpha": [(0x41, 0x5A), (0x61, 0x7A)],
    "ascii": [(0x00, 0x7F)],
    "blank": [(0x09, 0x09), (0x20, 0x20)],
    "cntrl": [(0x00, 0x1F), (0x7F, 0x7F)],
    "digit": [(0x30, 0x39)],
    "graph": [(0x21, 0x7E)],
    "lower": [(0x61, 0x7A)],
    "print": [(0x20, 0x7E)],
    "punct": [(0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E)],
    "space": [(0x09, 0x0D), (0x20, 0x20)],
    "upper": [(0x41, 0x5A)],
    "word": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
    "xdigit": [(0x30, 0x39), (0x41, 0x46), (0x61, 0x66)],
}

# RE2's Perl classes \d \s \w are ASCII only, unlike Python's
PERL_CLASSES: dict[str, list[tuple[int, int]]] = {
    "d": [(0x30, 0x39)],
    "s": [(0x09, 0x0A), (0x0C, 0x0D), (0x20, 0x20)],
    "w": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
}

SIMPLE_ESCAPES = {"a": 0x07, "f": 0x0C, "n": 0x0A, "r": 0x0D, "t": 0x09, "v": 0x0B}


class BadPattern(ValueError):
    """A pattern that Go's filepath.Match or regexp would reject."""


def go_trim_space(text: str) -> str:
    return text.strip(GO_SPACE)


def go_clean(path: str) -> str:
    """Return Go's filepath.Clean of a slash-separated path."""
    if not path:
        return "."
    rooted = path.startswith("/")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            continue
        parts.append(part)
    cleaned = "/".join(parts)
    if rooted:
        return "/" + cleaned
    return cleaned or "."


def go_join(*elements: str) -> str:
    """Return Go's filepath.Join: the non-empty elements joined by '/', then cleaned."""
    joined = "/".join(element for element in elements if element)
    return go_clean(joined) if joined else ""


# --- path/filepath.Match -------------------------------------------------------------


def scan_chunk(pattern: str) -> tuple[bool, str, str]:
    """Split off leading stars and the chunk up to the next star outside brackets."""
    star = False
    while pattern.startswith("*"):
        pattern = pattern[1:]
        star = True
    in_range = False
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if i + 1 < len(pattern):
                i += 1
        elif char == "[":
            in_range = True
        elif char == "]":
            in_range = False
        elif char == "*" and not in_range:
            break
        i += 1
    return star, pattern[:i], pattern[i:]


def _class_char(chunk: str, pos: int) -> tuple[str, int]:
    """Read one character of a bracket expression, as Go's getEsc does."""
    if pos >= len(chunk) or chunk[pos] in "-]":
        raise BadPattern("syntax error in pattern")
    if chunk[pos] == "\\":
        pos += 1
        if pos >= len(chunk):
            raise BadPattern("syntax error in pattern")
    char = chunk[pos]
    pos += 1
    if pos >= len(chunk):
        raise BadPattern("syntax error in pattern")
    return char, pos


def _match_class(chunk: str, pos: int, char: str | None) -> tuple[bool, int]:
    """Match `char` against the bracket expression at chunk[pos] (just after '[')."""
    negated = pos < len(chunk) and chunk[pos] == "^"
    if negated:
        pos += 1
    matched = False
    count = 0
    while True:
        if pos < len(chunk) and chunk[pos] == "]" and count > 0:
            pos += 1
            break
        low, pos = _class_char(chunk, pos)
        high = low
        if chunk[pos] == "-":
            high, pos = _class_char(chunk, pos + 1)
        if char is not None and low <= char <= high:
            matched = True
        count += 1
    return matched != negated, pos


def match_chunk(chunk: str, name: str) -> str | None:
    """Match `chunk` at the start of `name`; return the rest of name, or None.

    Like Go's matchChunk, it goes on checking the chunk's syntax after a mismatch.
    """
    failed = False
    pos = 0
    rest = name
    while pos < len(chunk):
        if not failed and not rest:
            failed = True
        char = chunk[pos]
        if char == "[":
            current = None if failed else rest[0]
            if not failed:
                rest = rest[1:]
            ok, pos = _match_class(chunk, pos + 1, current)
            failed = failed or not ok
            continue
        if char == "?":
            if not failed:
                failed = rest[0] == "/"
                rest = rest[1:]
            pos += 1
            continue
        if char == "\\":
            pos += 1
            if pos >= len(chunk):
                raise BadPattern("syntax error in pattern")
        if not failed:
            failed = chunk[pos] != rest[0]
            rest = rest[1:]
        pos += 1
    return None if failed else rest


def go_match(pattern: str, name: str) -> bool:
    """Return Go's filepath.Match(pattern, name); raise BadPattern for a malformed one."""
    while pattern:
        star, chunk, pattern = scan_chunk(pattern)
        if star and not chunk:
            return "/" not in name
        rest = match_chunk(chunk, name)
        if rest is not None and (not rest or pattern):
            name = rest
            continue
        if star:
            rest = _match_after_star(chunk, pattern, name)
            if rest is not None:
                name = rest
                continue
        _check_rest(pattern)
        return False
    return not name


def _match_after_star(chunk: str, pattern: str, name: str) -> str | None:
    """Try the chunk after skipping 1..n non-slash characters of name."""
    for i in range(len(name)):
        if name[i] == "/":
            break
        rest = match_chunk(chunk, name[i + 1 :])
        if rest is not None:
            if not pattern and rest:
                continue
            return rest
    return None


def _check_rest(pattern: str) -> None:
    while pattern:
        _, chunk, pattern = scan_chunk(pattern)
        match_chunk(chunk, "")


def check_match_syntax(pattern: str) -> None:
    """Raise BadPattern when Go's filepath.Match(pattern, ".") would return an error."""
    go_match(pattern, ".")


# --- RE2 regular expressions to Python ------------------------------------------------


def go_regex_to_python(regex: str) -> str:
    """Rewrite an RE2 regex (Perl flags, as Go's regexp.Compile uses) into Python syntax.

    Handles what patternmatcher can produce: literals, escapes, bracket expressions
    with POSIX and Perl classes, groups, `*`, `?`, `^` and `$`.
    """
    out: list[str] = []
    pos = 0
    while pos < len(regex):
        char = regex[pos]
        if char == "\\":
            piece, pos = _escape_outside_class(regex, pos + 1)
        elif char == "[":
            piece, pos = _bracket(regex, pos + 1)
        elif char == "$":
            # RE2 without the multi-line flag: '$' matches only at the end of the text,
            # while Python's '$' also matches before a final newline
            piece, pos = r"\Z", pos + 1
        elif char in "().*?^|+{}":
            piece, pos = char, pos + 1
        else:
            piece, pos = re.escape(char), pos + 1
        out.append(piece)
    return "".join(out)


def _escape_outside_class(regex: str, pos: int) -> tuple[str, int]:
    if pos >= len(regex):
        raise BadPattern("trailing backslash at end of expression")
    char = regex[pos]
    if char == "Q":
        end = regex.find("\\E", pos + 1)
        literal = regex[pos + 1 :] if end < 0 else regex[pos + 1 : end]
        return re.escape(literal), len(regex) if end < 0 else end + 2
    if char in ("A", "b", "B"):
        return "\\" + char, pos + 1
    if char == "z":
        return r"\Z", pos + 1
    if char.lower() in PERL_CLASSES:
        return _class_text(_perl_class(char), False), pos + 1
    code, pos = _escape(regex, pos)
    return _char_text(code), pos


def _escape(regex: str, pos: int) -> tuple[int, int]:
    """Read the escape after a backslash at regex[pos]; return its code point."""
    if pos >= len(regex):
        raise BadPattern("trailing backslash at end of expression")
    char = regex[pos]
    pos += 1
    if ord(char) < 0x80 and not char.isalnum():
        return ord(char), pos
    if "1" <= char <= "7" and (pos >= len(regex) or not "0" <= regex[pos] <= "7"):
        raise BadPattern(f"invalid escape sequence: \\{char}")
    if "0" <= char <= "7":
        value = ord(char) - 0x30
        for _ in range(2):
            if pos >= len(regex) or not "0" <= regex[pos] <= "7":
                break
            value = value * 8 + ord(regex[pos]) - 0x30
            pos += 1
        return value, pos
    if char == "x":
        return _hex_escape(regex, pos)
    if char in SIMPLE_ESCAPES:
        return SIMPLE_ESCAPES[char], pos
    # NOTE: RE2's Unicode classes (\pL, \p{Greek}) are not translated; a pattern that
    # uses them fails here, where BuildKit would accept it.
    raise BadPattern(f"invalid or unsupported escape sequence: \\{char}")


def _hex_escape(regex: str, pos: int) -> tuple[int, int]:
    if regex.startswith("{", pos):
        end = regex.find("}", pos)
        digits = regex[pos + 1 : end] if end > 0 else ""
        pos = end + 1
    else:
        digits = regex[pos : pos + 2]
        pos += 2
    if not digits or len(digits) > 8 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise BadPattern("invalid escape sequence: \\x")
    value = int(digits, 16)
    if value > MAX_RUNE:
        raise BadPattern("invalid escape sequence: \\x")
    return value, pos


def _bracket(regex: str, pos: int) -> tuple[str, int]:
    """Translate the bracket expression that starts just after '[' at regex[pos]."""
    negated = regex.startswith("^", pos)
    if negated:
        pos += 1
    ranges: list[tuple[int, int]] = []
    first = True
    while first or pos >= len(regex) or regex[pos] != "]":
        if pos >= len(regex):
            raise BadPattern("missing closing ]")
        first = False
        named = _named_class(regex, pos)
        if named is not None:
            class_ranges, pos = named
            ranges.extend(class_ranges)
            continue
        if regex[pos] == "\\" and pos + 1 < len(regex) and regex[pos + 1].lower() in "dsw":
            ranges.extend(_perl_class(regex[pos + 1]))
            pos += 2
            continue
        low, pos = _bracket_char(regex, pos)
        high = low
        if regex.startswith("-", pos) and pos + 1 < len(regex) and regex[pos + 1] != "]":
            high, pos = _bracket_char(regex, pos + 1)
            if high < low:
                raise BadPattern("invalid character class range")
        ranges.append((low, high))
    return _class_text(ranges, negated), pos + 1


def _bracket_char(regex: str, pos: int) -> tuple[int, int]:
    if pos >= len(regex):
        raise BadPattern("missing closing ]")
    if regex[pos] == "\\":
        return _escape(regex, pos + 1)
    return ord(regex[pos]), pos + 1


def _named_class(regex: str, pos: int) -> tuple[list[tuple[int, int]], int] | None:
    if not regex.startswith("[:", pos):
        return None
    end = regex.find(":]", pos + 2)
    if end < 0:
        return None
    name = regex[pos + 2 : end]
    negated = name.startswith("^")
    ranges = POSIX_CLASSES.get(name.removeprefix("^"))
    if ranges is None:
        raise BadPattern(f"invalid character class range: [:{name}:]")
    return (_complement(ranges) if negated else ranges), end + 2


def _perl_class(letter: str) -> list[tuple[int, int]]:
    ranges = PERL_CLASSES[letter.lower()]
    return _complement(ranges) if letter.isupper() else ranges


def _complement(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    result: list[tuple[int, int]] = []
    next_low = 0
    for low, high in sorted(ranges):
        if low > next_low:
            result.append((next_low, low - 1))
        next_low = max(next_low, high + 1)
    if next_low <= MAX_RUNE:
        result.append((next_low, MAX_RUNE))
    return result


def _char_text(code: int) -> str:
    return f"\\U{code:08x}"


def _class_text(ranges: list[tuple[int, int]], negated: bool) -> str:
    """Write a Python bracket expression with every character escaped."""
    if negated:
        ranges = _complement(ranges)
    if not ranges:
        return "(?!)"  # an empty class never matches
    parts = [
        _char_text(low) if low == high else f"{_char_text(low)}-{_char_text(high)}"
        for low, high in sorted(ranges)
    ]
    return "[" + "".join(parts) + "]"


def compile_go_regex(regex: str) -> re.Pattern[str]:
    """Compile an RE2 regex with Go's meaning; raise UsageError when it is invalid."""
    try:
        return re.compile(go_regex_to_python(regex), re.ASCII)
    except (BadPattern, re.error) as exc:
        raise UsageError(f"invalid pattern: regex {regex!r}: {exc}: fix the pattern") from exc

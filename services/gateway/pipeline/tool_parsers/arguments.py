"""A call's arguments as the model writes them, for streaming them incrementally: where a call's
`{"name": ..., "arguments": {` header ends, and the arguments object re-serialised piece by piece.

The pieces join to json.dumps(arguments, ensure_ascii=False) of a complete object, however the
model text is split: whitespace between tokens dropped, ", " and ": " as separators, strings and
numbers re-encoded once they are whole (a number, an escape sequence is held until it is)."""

from __future__ import annotations

import json
import re

_NUMBER_CHARS = frozenset("0123456789+-.eE")
_UNICODE_ESCAPE = re.compile(r"\\u[0-9a-fA-F]{4}")
_WHITESPACE = " \t\r\n"

MORE, NO, YES = "more", "no", "yes"


def match_call_header(text: str, at: int, argument_keys: tuple[str, ...]) -> tuple[str, str, int]:
    """Whether text[at:] opens `{"name": "<name>", "<argument key>": {`: YES with the name and the
    index of the arguments' `{`; NO; or MORE when the text so far could still become one."""
    at = _skip_whitespace(text, at)
    if at == len(text):
        return MORE, "", at
    if text[at] != "{":
        return NO, "", at
    status, key, at = _string(text, _skip_whitespace(text, at + 1))
    if status != YES or key != "name":
        return status if status != YES else NO, "", at
    status, at = _expect(text, at, ":")
    if status != YES:
        return status, "", at
    status, name, at = _string(text, _skip_whitespace(text, at))
    if status != YES or not name:
        return status if status != YES else NO, "", at
    status, at = _expect(text, at, ",")
    if status != YES:
        return status, "", at
    status, key, at = _string(text, _skip_whitespace(text, at))
    if status != YES:
        return status, "", at
    if key not in argument_keys:
        return NO, "", at
    status, at = _expect(text, at, ":")
    if status != YES:
        return status, "", at
    status, at = _expect(text, at, "{")
    return status, name if status == YES else "", at - 1


def _skip_whitespace(text: str, at: int) -> int:
    while at < len(text) and text[at] in _WHITESPACE:
        at += 1
    return at


def _expect(text: str, at: int, char: str) -> tuple[str, int]:
    at = _skip_whitespace(text, at)
    if at == len(text):
        return MORE, at
    return (YES, at + 1) if text[at] == char else (NO, at)


def _string(text: str, at: int) -> tuple[str, str, int]:
    """A JSON string at text[at:]: (YES, its value, the index after it), NO or MORE."""
    if at == len(text):
        return MORE, "", at
    if text[at] != '"':
        return NO, "", at
    end = at + 1
    while end < len(text):
        if text[end] == "\\":
            end += 2
        elif text[end] == '"':
            try:
                return YES, json.loads(text[at : end + 1]), end + 1
            except ValueError:
                return NO, "", at
        else:
            end += 1
    return MORE, "", at


class ArgumentsWriter:
    """Re-serialises one arguments object fed in pieces, and finds where it closes."""

    def __init__(self):
        self.depth = 0
        self.in_string = False
        self.closed = False
        self._pending = ""  # a number, or a string's escape sequence, not whole yet

    def feed(self, text: str) -> tuple[str, int | None]:
        """The re-serialised piece of `text`, and the index in it just after the object's closing
        brace (None while it is open: all of `text` was taken)."""
        out: list[str] = []
        for i, char in enumerate(text):
            self._take(char, out)
            if self.closed:
                return "".join(out), i + 1
        return "".join(out), None

    def flush(self) -> str:
        """What is held at the end of a cut-off object, as written."""
        pending, self._pending = self._pending, ""
        return pending

    def _take(self, char: str, out: list[str]) -> None:
        if self.in_string:
            self._take_in_string(char, out)
            return
        if self._pending:  # a number
            if char in _NUMBER_CHARS:
                self._pending += char
                return
            out.append(_number(self.flush()))
        if char in _WHITESPACE:
            return
        if char == '"':
            self.in_string = True
            out.append(char)
        elif char in _NUMBER_CHARS:
            self._pending = char
        elif char == ":":
            out.append(": ")
        elif char == ",":
            out.append(", ")
        else:
            if char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                self.closed = self.depth == 0
            out.append(char)

    def _take_in_string(self, char: str, out: list[str]) -> None:
        if not self._pending:
            if char == "\\":
                self._pending = char
            elif char == '"':
                self.in_string = False
                out.append(char)
            else:
                out.append(_reencoded(char))
            return
        escape = self._pending = self._pending + char
        if escape[1] != "u" or len(escape) == 6 and not _high_surrogate(escape):
            out.append(_reencoded(self.flush()))
        elif len(escape) == 12 and _UNICODE_ESCAPE.fullmatch(escape[6:]):
            out.append(_reencoded(self.flush()))
        elif len(escape) > 6 and not _low_escape_prefix(escape[6:]):
            # A high surrogate alone: written as it is, and what followed it taken again.
            self._pending = ""
            out.append(_reencoded(escape[:6]))
            for rest in escape[6:]:
                self._take(rest, out)


def _high_surrogate(escape: str) -> bool:
    return bool(_UNICODE_ESCAPE.fullmatch(escape)) and 0xD800 <= int(escape[2:], 16) < 0xDC00


def _low_escape_prefix(text: str) -> bool:
    """Whether text could be the beginning of a \\uXXXX escape."""
    return "\\u".startswith(text[:2]) and all(c in "0123456789abcdefABCDEF" for c in text[2:])


def _reencoded(written: str) -> str:
    """A piece of a string's body as json.dumps(ensure_ascii=False) writes it (as written when it
    is not valid JSON, e.g. a raw control character or a bad escape)."""
    try:
        return json.dumps(json.loads(f'"{written}"'), ensure_ascii=False)[1:-1]
    except ValueError:
        return written


def _number(written: str) -> str:
    try:
        return json.dumps(json.loads(written))
    except ValueError:
        return written

"""Where fail2ban reads a jail's keys in one file, line by line, by the rules of its parser.

fail2ban reads its .conf/.local files with the standard library's ConfigParser (configparserinc.py:
`inline_comment_prefixes=";"`, comments `#` and `;`, keys `=` or `:`, empty lines kept in values), opening
each file with universal newlines. This walks a file's lines the same way (Python 3.11's and 3.13's
`RawConfigParser._read`) and says which lines set which key of which section, so the guard comments out
exactly those lines and keeps every other byte, CRLF line ends included.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

# one line with its end, as a file opened with universal newlines (\n, \r\n, a lone \r) yields them
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")
_SECTION = re.compile(r"\[(?P<header>.+)\]")  # configparser's SECTCRE ("very permissive": up to the last ])
_OPTION = re.compile(r"(?P<option>.*?)\s*(?P<vi>=|:)\s*(?P<value>.*)$")  # its OPTCRE
_NONSPACE = re.compile(r"\S")
_COMMENT_PREFIXES = ("#", ";")
_INLINE_COMMENT_PREFIXES = (";",)


@dataclass(frozen=True)
class Assignment:
    section: str
    key: str  # as configparser's optionxform leaves it: lower case
    value: str  # continued lines joined with "\n", as fail2ban gets it
    line: int  # 1-based: the key's line
    continued: tuple[int, ...] = ()  # 1-based: the value's further lines (blank ones not among them)


def split_lines(text: str) -> list[str]:
    """The file's lines, each with its own line end (the last may have none)."""
    return _LINE.findall(text)


def _without_comment(line: str) -> tuple[str, bool]:
    """The line's content without an inline or full-line comment, and whether it had one."""
    start = sys.maxsize
    for prefix in _INLINE_COMMENT_PREFIXES:
        index = line.find(prefix)
        while index != -1:
            if index == 0 or line[index - 1].isspace():
                start = min(start, index)
                break
            index = line.find(prefix, index + 1)
    if line.strip().startswith(_COMMENT_PREFIXES):
        start = 0
    if start == sys.maxsize:
        return line.strip(), False
    return line[:start].strip(), True


def assignments(text: str) -> list[Assignment]:
    """Every key set in the file, in order, with the lines it was read from. A file fail2ban's parser
    refuses (a key before any section, a line that is no key) gives what it read up to there."""
    found: list[Assignment] = []
    section: str | None = None
    current: tuple[str, str, int] | None = None  # section, key, line of the value being read
    values: list[str] = []
    continued: list[int] = []
    indent = sys.maxsize

    def close() -> None:
        if current is not None:
            found.append(Assignment(current[0], current[1], "\n".join(values).rstrip(), current[2], tuple(continued)))

    for number, line in enumerate(split_lines(text), start=1):
        value, commented = _without_comment(line)
        if not value:
            if current is not None and not commented:
                values.append("")  # empty lines stay in a value (configparser's empty_lines_in_values)
            continue
        match = _NONSPACE.search(line)
        level = match.start() if match else 0
        if current is not None and level > indent:
            values.append(value)
            continued.append(number)
            continue
        indent = level
        header = _SECTION.match(value)
        if header:
            close()
            section, current = header.group("header"), None
            continue
        option = _OPTION.match(value)
        if section is None or option is None or not option.group("option").rstrip():
            break  # fail2ban refuses the file: nothing after this is read
        close()
        current = (section, option.group("option").rstrip().lower(), number)
        values, continued = [option.group("value").strip()], []
    close()
    return found

"""Terminal text: colour only on a TTY (and never with NO_COLOR), lines trimmed to the width with "…",
and moments shown as "06:25, 5s ago" (a date when not today, "just now" rather than "0s ago")."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

ELLIPSIS = "…"
RED, YELLOW, GREEN, BOLD = "31", "33", "32", "1"
JUST_NOW = 2.0  # seconds under which "3s ago" is noise


@dataclass(frozen=True)
class Terminal:
    """What the output is: whether it takes colour, and how wide a line may be (None: no limit)."""

    colour: bool = False
    width: int | None = None

    @classmethod
    def of(cls, stream: TextIO, *, full: bool = False) -> Terminal:
        """A TTY gets colour (unless NO_COLOR or TERM=dumb) and lines trimmed to its width (unless --full);
        a pipe or file gets every character and no escape codes, as systemctl does."""
        try:
            tty = stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        if not tty:
            return cls()
        colour = not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        width = None if full else shutil.get_terminal_size((80, 24)).columns
        return cls(colour=colour, width=width)

    def paint(self, text: str, code: str | None) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour and code and text else text

    def fit(self, text: str, indent: int = 0) -> str:
        """text trimmed to the width, less indent columns already used."""
        return trim(text, None if self.width is None else self.width - indent)


def trim(text: str, width: int | None) -> str:
    """text on one line of at most width characters, its end replaced by "…" when cut."""
    text = " ".join(text.splitlines())
    if width is None or len(text) <= width:
        return text
    if width <= 0:
        return ""
    return text[: width - 1].rstrip() + ELLIPSIS


def columns(rows: Sequence[Sequence[str]], terminal: Terminal, paints: Sequence[str | None] = ()) -> list[str]:
    """Rows laid out in columns two spaces apart; the last column takes what is left of the width and is
    trimmed to it. paints[i] colours row i's second column (the status), after the padding is measured."""
    count = len(rows[0])
    widths = [max(len(r[i]) for r in rows) for i in range(count - 1)]
    lines = []
    for index, row in enumerate(rows):
        cells = [f"{cell:<{widths[i]}}" for i, cell in enumerate(row[:-1])]
        paint = paints[index] if index < len(paints) else None
        if paint and len(cells) > 1:
            cells[1] = terminal.paint(row[1], paint) + " " * (widths[1] - len(row[1]))
        used = sum(widths) + 2 * (count - 1)
        lines.append(("  ".join([*cells, terminal.fit(row[-1], used)])).rstrip())
    return lines


def ago(stamp: float | None, now: float | None = None) -> str:
    """How long ago: "just now", "5s ago", "3m ago", "2h ago", "4d ago" ("-" for never)."""
    if not stamp:
        return "-"
    seconds = (time.time() if now is None else now) - stamp
    if seconds < JUST_NOW:
        return "just now"
    whole = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            return f"{whole // size}{unit} ago"
    return f"{whole}s ago"


def clock(stamp: float, now: float | None = None, *, seconds: bool = False) -> str:
    """Local wall-clock time, with the date when it is not today: "06:25" or "Dec 03 06:25"."""
    local = time.localtime(stamp)
    today = time.localtime(time.time() if now is None else now)
    text = time.strftime("%H:%M:%S" if seconds else "%H:%M", local)
    if (local.tm_year, local.tm_yday) != (today.tm_year, today.tm_yday):
        text = time.strftime("%b %d ", local) + text
        if local.tm_year != today.tm_year:
            text = f"{local.tm_year} " + text
    return text


def since(stamp: float | None, now: float | None = None) -> str:
    """A past moment both ways: "06:25, 5s ago", "Dec 03 06:25, 1d ago", "06:25, just now"; "-" for never."""
    if not stamp:
        return "-"
    return f"{clock(stamp, now)}, {ago(stamp, now)}"


def until(stamp: float, now: float | None = None) -> str:
    """A future moment: local time to the second, with the date when it is not today."""
    return clock(stamp, now, seconds=True)

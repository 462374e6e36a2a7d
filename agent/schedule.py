"""When the next upgrade is due: `daily HH:MM`, `weekly <day> HH:MM`, or a systemd OnCalendar expression.

The two simple forms are computed here, in the machine's local time (what an admin means by "03:30"),
so the scheduler can be tested with a fake clock. Any other expression is handed to systemd itself
(`systemd-analyze calendar`), the same parser a timer unit's OnCalendar= uses: the agent never
re-implements systemd's calendar grammar, so an expression means here exactly what it means there.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass

from agent.system.run import run

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# the two simple forms as an admin may write them (any case, "3:30" or "03:30"); the config keeps them as
# str(SimpleForm): "daily 03:30", "weekly sun 04:00"
_SIMPLE = re.compile(r"(?i)(?:(daily)|weekly\s+(mon|tue|wed|thu|fri|sat|sun))\s+([0-9]{1,2}):([0-9]{2})")
_ELAPSE_UTC = re.compile(r"^\s*(?:\(in UTC\)|Next elapse):\s+\w{3}\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC\s*$", re.M)
_WINDOW = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)\s*-\s*([01]?\d|2[0-3]):([0-5]\d)")


class ScheduleError(ValueError):
    pass


@dataclass(frozen=True)
class SimpleForm:
    """`daily HH:MM` (weekday None) or `weekly <day> HH:MM` (weekday 0 = Monday), in local time."""

    weekday: int | None
    hour: int
    minute: int

    def __str__(self) -> str:
        clock = f"{self.hour:02d}:{self.minute:02d}"
        return f"daily {clock}" if self.weekday is None else f"weekly {DAYS[self.weekday]} {clock}"


def simple_form(text: str) -> SimpleForm | None:
    """The simple form `text` spells, or None: another expression, or a time no clock shows (24:00, 9:75)."""
    match = _SIMPLE.fullmatch(text)
    if match is None or int(match[3]) > 23 or int(match[4]) > 59:
        return None
    return SimpleForm(None if match[1] else DAYS.index(match[2].lower()), int(match[3]), int(match[4]))


def check_calendar(expression: str) -> str | None:
    """systemd's own verdict on an OnCalendar expression: None (valid, or no systemd-analyze here to
    ask) or its error message."""
    result = run(["systemd-analyze", "calendar", expression], timeout=10)
    if result.returncode == 127 or result.ok:
        return None
    return result.error_text().strip().splitlines()[-1] if result.error_text().strip() else "rejected"


@dataclass(frozen=True)
class Schedule:
    text: str  # as the config normalised it

    @property
    def simple(self) -> bool:
        return simple_form(self.text) is not None

    def next_after(self, after: float) -> float:
        """The first scheduled moment strictly after `after` (a Unix time)."""
        form = simple_form(self.text)
        if form is None:
            return _calendar_next(self.text, after)
        weekday, hour, minute = form.weekday, form.hour, form.minute
        start = datetime.datetime.fromtimestamp(after).astimezone()  # local time, with its UTC offset
        day = start.date()
        for offset in range(0, 9):
            candidate_day = day + datetime.timedelta(days=offset)
            if weekday is not None and candidate_day.weekday() != weekday:
                continue
            moment = _local(candidate_day, hour, minute)
            if moment > after:
                return moment
        raise ScheduleError(f"no time found for {self.text!r}")  # unreachable: a week always has the day


def _local(day: datetime.date, hour: int, minute: int) -> float:
    """The Unix time of a local wall-clock time; a time a DST change skips is taken an hour later."""
    naive = datetime.datetime(day.year, day.month, day.day, hour, minute)
    moment = naive.astimezone()  # the local zone's offset for that date
    if moment.replace(tzinfo=None) != naive and moment.hour != hour:
        moment = (naive + datetime.timedelta(hours=1)).astimezone()
    return moment.timestamp()


def _calendar_next(expression: str, after: float) -> float:
    """systemd's next elapse of an OnCalendar expression; it counts from now, so `after` must not be
    much in the future (the scheduler only asks about now)."""
    result = run(["systemd-analyze", "calendar", expression], timeout=10)
    if result.returncode == 127:
        raise ScheduleError(f"schedule {expression!r} needs systemd-analyze, which is not installed")
    if not result.ok:
        raise ScheduleError(f"systemd-analyze rejects the schedule {expression!r}: {result.error_text().strip()}")
    found = _ELAPSE_UTC.findall(result.stdout)
    if not found:
        raise ScheduleError(f"schedule {expression!r} never elapses again (systemd-analyze: {result.stdout.strip()})")
    moment = datetime.datetime.strptime(found[-1], "%Y-%m-%d %H:%M:%S").replace(tzinfo=datetime.UTC).timestamp()
    return max(moment, after + 1)


@dataclass(frozen=True)
class Window:
    """A daily local-time window, e.g. 03:00-05:00; it may wrap midnight (23:00-01:00)."""

    start: int  # minutes after midnight
    end: int

    @classmethod
    def parse(cls, text: str) -> Window:
        match = _WINDOW.fullmatch(text.strip())
        if not match:
            raise ScheduleError(f"expected a time window HH:MM-HH:MM, got {text!r}")
        start, end = int(match[1]) * 60 + int(match[2]), int(match[3]) * 60 + int(match[4])
        if start == end:
            raise ScheduleError(f"the window {text!r} is empty")
        return cls(start, end)

    def contains(self, moment: float) -> bool:
        local = datetime.datetime.fromtimestamp(moment).astimezone()
        minute = local.hour * 60 + local.minute
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def next_opening(self, after: float) -> float:
        """When the window next opens after `after` (now, if it is open)."""
        if self.contains(after):
            return after
        day = datetime.datetime.fromtimestamp(after).astimezone().date()
        for offset in range(0, 3):
            moment = _local(day + datetime.timedelta(days=offset), self.start // 60, self.start % 60)
            if moment > after:
                return moment
        raise ScheduleError("no opening found")  # unreachable

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"

"""What vps-agentctl shows a person: lines trimmed to the width, times a clock reads, colour only on a
terminal, the verdict line, one line per event."""

from __future__ import annotations

import datetime
import io
import os
import pty
import time
from typing import Any

import pytest

from agent.console.events import event_lines, event_time, summary
from agent.console.status import render_check, render_status, render_table, verdict
from agent.console.text import Terminal, ago, clock, since, trim, until

NOW = time.mktime((2026, 12, 4, 12, 0, 0, 0, 0, -1))  # noon local time: an hour either way is still today


def test_trim_keeps_what_fits_and_marks_a_cut_with_an_ellipsis() -> None:
    assert trim("short", 10) == "short"
    assert trim("exactly 10", 10) == "exactly 10"
    assert trim("one two three four", 10) == "one two t…"
    assert trim("one two   three", 10) == "one two…"  # no blanks before the ellipsis
    assert len(trim("x" * 200, 80)) == 80 and trim("x" * 200, 80).endswith("…")
    assert trim("first\nsecond", None) == "first second"
    assert trim("anything", 0) == ""


def test_ago_says_just_now_rather_than_0s_ago() -> None:
    assert ago(NOW, NOW) == "just now"
    assert ago(NOW - 1.5, NOW) == "just now"
    assert ago(NOW - 5, NOW) == "5s ago"
    assert ago(NOW - 125, NOW) == "2m ago"
    assert ago(NOW - 3 * 3600, NOW) == "3h ago"
    assert ago(NOW - 2 * 86400, NOW) == "2d ago"
    assert ago(None, NOW) == "-"


def test_since_shows_the_clock_and_how_long_ago_with_a_date_when_not_today() -> None:
    assert since(NOW - 5, NOW) == f"{time.strftime('%H:%M', time.localtime(NOW - 5))}, 5s ago"
    yesterday = NOW - 86400
    assert since(yesterday, NOW) == time.strftime("%b %d %H:%M", time.localtime(yesterday)) + ", 1d ago"
    last_year = NOW - 400 * 86400
    assert clock(last_year, NOW).startswith(time.strftime("%Y %b %d", time.localtime(last_year)))
    assert since(None, NOW) == "-"


def test_a_pause_for_days_ends_at_a_date_and_a_second() -> None:
    later = NOW + 3 * 86400
    assert until(later, NOW) == time.strftime("%b %d %H:%M:%S", time.localtime(later))
    assert until(NOW + 60, NOW) == time.strftime("%H:%M:%S", time.localtime(NOW + 60))


def _tty_terminal(monkeypatch: pytest.MonkeyPatch, **env: str) -> Terminal:
    for name in ("NO_COLOR", "TERM"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("COLUMNS", "80")
    leader, follower = pty.openpty()
    try:
        with os.fdopen(follower, "w") as stream:
            return Terminal.of(stream)
    finally:
        os.close(leader)


def test_colour_and_width_only_on_a_terminal_and_never_with_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Terminal.of(io.StringIO()) == Terminal(colour=False, width=None)
    assert _tty_terminal(monkeypatch) == Terminal(colour=True, width=80)
    assert _tty_terminal(monkeypatch, NO_COLOR="1") == Terminal(colour=False, width=80)
    assert _tty_terminal(monkeypatch, TERM="dumb").colour is False
    assert Terminal(colour=True).paint("blocked", "31") == "\x1b[31mblocked\x1b[0m"
    assert Terminal(colour=False).paint("blocked", "31") == "blocked"


def item(control: str, status: str, **extra: Any) -> dict[str, Any]:
    return {"control": control, "status": status, "since": NOW - 5, "why": "", "facts": {}, **extra}


GUARDS = [
    item("ssh", "pending", why="log in with your key once: a sudo admin's key has not been seen to log in"),
    item("firewall", "healed", last_heal_at=NOW - 5, facts={"ipv4": "4 rules " * 30}),
    item("fail2ban", "compliant", facts={"jail": "sshd", "port": 2222}),
    item("accounts", "compliant", facts={"uid0": "root"}),
]


def test_the_verdict_counts_guards_worst_first_and_says_why_the_worst_is_not_compliant() -> None:
    text, colour = verdict(GUARDS)
    assert text.startswith("4 guards: 1 pending, 1 healed, 2 compliant (ssh: log in with your key once")
    assert colour == "33"
    assert verdict([item("ssh", "compliant")]) == ("1 guard: 1 compliant", "32")
    held = {
        "setting": "PasswordAuthentication no",
        "reason": "no key login yet",
        "unblock": "log in with your key once",
    }
    pending = item("ssh", "pending", why="held back, waits for the admin's proof", held=[held])
    assert (
        verdict([pending, item("firewall", "compliant")])[0]
        == "2 guards: 1 pending, 1 compliant (ssh: log in with your key once)"
    )
    assert verdict([item("ssh", "blocked", why="no way in"), item("firewall", "drifted")])[1] == "31"


@pytest.mark.parametrize("width", [80, 120])
def test_no_table_line_is_wider_than_the_terminal_and_colour_does_not_break_the_columns(width: int) -> None:
    terminal = Terminal(colour=True, width=width)
    table = render_table(GUARDS, terminal)
    plain = [line.replace("\x1b[33m", "").replace("\x1b[32m", "").replace("\x1b[0m", "") for line in table.splitlines()]
    assert all(len(line) <= width for line in plain), plain
    assert plain[1].index("log in") == plain[0].index("DETAIL")
    assert "\x1b[33mpending\x1b[0m" in table and "\x1b[32mhealed\x1b[0m" in table
    # the heal happened when the status began: no "last heal 5s ago" beside "since 5s ago"
    assert "last heal" not in table
    assert "…" in plain[2]
    full = render_table(GUARDS, Terminal())
    assert "4 rules " * 29 in full and "…" not in full


def test_status_shows_output_lines_only_when_something_is_wrong_with_them() -> None:
    metrics: dict[str, Any] = {"path": "/x.prom", "written_at": NOW, "error": None, "note": "no collector"}
    status: dict[str, Any] = {
        "version": "1.0",
        "host": "vps",
        "pid": 1,
        "started_at": NOW - 5,
        "config": {"error": None},
        "controls": GUARDS,
        "outputs": {
            "journald": "native",
            "events_file": "/var/log/vps-agent/events.jsonl",
            "prometheus_textfile": metrics,
        },
    }
    lines = render_status(status, Terminal()).splitlines()
    assert lines[0].startswith("4 guards: ") and lines[1].startswith("vps-agent 1.0 on vps (pid 1), up since")
    assert lines[2].split() == ["CONTROL", "STATUS", "SINCE", "DETAIL"]
    metrics["error"] = "the directory is gone"
    assert "metrics NOT written: the directory is gone" in render_status(status, Terminal()).splitlines()[2]


def test_status_says_when_the_daemon_runs_on_the_defaults_for_want_of_a_config_file() -> None:
    missing = "no /etc/vps-agent/config.yaml: running on the defaults"
    status: dict[str, Any] = {
        "version": "1.0",
        "host": "vps",
        "pid": 1,
        "started_at": NOW - 5,
        "config": {"error": None, "missing": missing},
        "controls": GUARDS,
    }
    assert render_status(status, Terminal()).splitlines()[2] == missing
    status["config"]["missing"] = None
    assert missing not in render_status(status, Terminal())


def test_the_verdict_names_what_the_reporting_firewall_would_cut() -> None:
    note = "report mode, would cut 80/tcp (nginx.service); sudo vps-agentctl enforce"
    text = verdict([item("ssh", "compliant"), item("firewall", "drifted", why=note)])[0]
    assert text == f"2 guards: 1 drifted, 1 compliant (firewall: {note})"


def test_check_has_no_since_column_and_says_a_blocked_reason_once() -> None:
    why = "the agent is in the host's network namespace"
    rows = [{**item("firewall", "blocked", why=why), "blocked": [why]}, {**item("ssh", "compliant"), "blocked": []}]
    text = render_check(rows, Terminal())
    assert text.splitlines()[1].split() == ["CONTROL", "STATUS", "DETAIL"]
    assert text.count(why) == 2  # the verdict and the row: not a third time below
    assert "-  " not in text


EVENT: dict[str, Any] = {
    "@timestamp": "2026-12-04T06:25:22.665943Z",
    "message": "ssh: drift detected: effective: port is '22', expected '2222'",
    "event": {"action": "drift-detected", "outcome": "unknown"},
    "control": "ssh",
    "diff": "--- a sshd -T\n+++ b sshd -T\n-port 22\n+port 2222\n",
}


def test_events_are_one_line_each_in_local_time_with_no_unknown_outcome() -> None:
    lines = event_lines(EVENT, Terminal())
    assert len(lines) == 1
    utc = datetime.datetime(2026, 12, 4, 6, 25, 22, tzinfo=datetime.UTC)
    local = utc.astimezone().strftime("%b %d %H:%M:%S")
    assert lines[0].startswith(f"{local}  ssh      drift-detected      -        drift detected: effective: port")
    assert "unknown" not in lines[0] and ".665" not in lines[0]
    assert event_time(EVENT["@timestamp"], utc=True) == "Dec 04 06:25:22Z"
    assert summary(EVENT) == "drift detected: effective: port is '22', expected '2222'"


def test_the_diff_of_an_event_only_when_asked_and_trimmed_to_the_width() -> None:
    lines = event_lines(EVENT, Terminal(width=60), diff=True)
    assert lines[1:] == ["    --- a sshd -T", "    +++ b sshd -T", "    -port 22", "    +port 2222"]
    assert all(len(line) <= 60 for line in lines) and lines[0].endswith("…")
    success = {**EVENT, "event": {"action": "drift-reverted", "outcome": "success"}}
    assert "\x1b[32msuccess\x1b[0m" in event_lines(success, Terminal(colour=True))[0]

"""vps-agentctl as a person sees it in a terminal: status, check and events run in a real tmux pane of 80
and 120 columns against a real daemon on a fake root. The verdict comes first, no table line wraps, colour
is there on the terminal and gone in a pipe or with NO_COLOR."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_root_and_tools
from tests.integration.harness import REPO, Agent, StartAgent

ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
COLOURED = re.compile(r"\x1b\[(?:[0-9;]*;)?3[123]m")  # red, green or yellow foreground, as tmux re-renders it


@pytest.fixture(autouse=True)
def _needs_tmux() -> None:
    require_root_and_tools("tmux")


@dataclass
class Screen:
    rows: list[str]  # what the pane shows, one screen row each (a wrapped line takes two)
    lines: list[str]  # the same, wrapped lines joined: what the program printed
    painted: str  # the pane with its colour escapes
    exit_code: int


def on_screen(agent: Agent, *args: str, width: int, env: str = "") -> Screen:
    """Run `vps-agentctl --root ROOT ARGS` in a detached tmux pane of `width` columns; what it showed."""
    server = f"vps-agent-test-{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, "-m", "agent.cli", "--root", str(agent.root), *args]
    # the pane's own size, not the test runner's: COLUMNS would override it
    command = f"env -u COLUMNS -u LINES -u NO_COLOR {env} {shlex.join(argv)}; echo EXIT=$?; sleep 600"
    tmux = ["tmux", "-L", server, "-f", "/dev/null"]
    subprocess.run(
        [*tmux, "new-session", "-d", "-x", str(width), "-y", "100", "-c", str(REPO), command],
        check=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TERM": "xterm-256color", "HOME": "/root", "LANG": "C.UTF-8"},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            rows = _capture(tmux)
            done = [row for row in rows if row.startswith("EXIT=")]
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert done, f"{args} did not finish in the pane:\n" + "\n".join(rows)
        lines, painted = _capture(tmux, "-J"), "\n".join(_capture(tmux, "-e"))
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    end = rows.index(done[0])
    return Screen(rows[:end], lines[: lines.index(done[0])], painted, int(done[0].removeprefix("EXIT=")))


def _capture(tmux: list[str], *options: str) -> list[str]:
    shown = subprocess.run([*tmux, "capture-pane", "-p", *options], capture_output=True, text=True, check=True)
    lines = shown.stdout.rstrip("\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def assert_nothing_wraps(screen: Screen, width: int) -> None:
    assert screen.rows == screen.lines, "a line wrapped:\n" + "\n".join(screen.rows)
    assert all(len(row) <= width for row in screen.rows)


@pytest.fixture
def healed_agent(fake_root: Path, start_agent: StartAgent) -> Agent:
    """A daemon that has healed a deleted drop-in: drift-detected and drift-reverted events with diffs."""
    agent = start_agent(fake_root)
    mark = agent.mark()
    (fake_root / "etc/ssh/sshd_config.d/00-vps-agent.conf").unlink()
    agent.wait_event("drift-reverted", mark)
    return agent


@pytest.mark.parametrize("width", [80, 120])
def test_status_on_a_terminal_is_a_verdict_then_a_table_that_fits_in_colour(healed_agent: Agent, width: int) -> None:
    screen = on_screen(healed_agent, "status", width=width)
    assert screen.exit_code == 0
    assert re.fullmatch(r"6 guards: (\d healed, )?\d compliant, 1 disabled", screen.rows[0]), screen.rows
    assert screen.rows[1].startswith("vps-agent ") and "up since " in screen.rows[1]
    assert screen.rows[2].split() == ["CONTROL", "STATUS", "SINCE", "DETAIL"]
    assert_nothing_wraps(screen, width)
    # the firewall's DETAIL is longer than any terminal: cut with an ellipsis, shown whole with -l
    firewall = next(row for row in screen.rows if row.startswith("firewall"))
    assert firewall.endswith("…") and len(firewall) in (width - 1, width)
    assert "0s ago" not in "\n".join(screen.rows) and "metrics" not in "\n".join(screen.rows)
    assert COLOURED.search(screen.painted), screen.painted
    full = on_screen(healed_agent, "status", "--full", width=width)
    assert any(len(line) > width for line in full.lines) and "…" not in "\n".join(full.lines)


def test_status_has_no_colour_in_a_pipe_or_with_no_color_and_the_same_words(healed_agent: Agent) -> None:
    piped = healed_agent.ctl("status")
    assert piped.returncode == 0 and not ESCAPE.search(piped.stdout)
    assert piped.stdout.startswith("6 guards: ") and "…" not in piped.stdout
    plain = on_screen(healed_agent, "status", width=120, env="NO_COLOR=1")
    assert not COLOURED.search(plain.painted), plain.painted
    assert plain.rows[0] == piped.stdout.splitlines()[0]


@pytest.mark.parametrize("width", [80, 120])
def test_check_on_a_terminal_has_no_since_column_and_says_each_finding_once(healed_agent: Agent, width: int) -> None:
    # outside `unshare --net` the firewall is blocked (a fake root must not touch the host's rules): red
    screen = on_screen(healed_agent, "check", width=width)
    assert screen.exit_code == 2
    assert screen.rows[0].startswith("6 guards: 1 blocked, 4 compliant, 1 disabled (firewall: --root ")
    assert screen.rows[1].split() == ["CONTROL", "STATUS", "DETAIL"]
    assert_nothing_wraps(screen, width)
    assert not any("firewall blocked:" in row for row in screen.rows)
    assert re.search(r"\x1b\[(?:[0-9;]*;)?31mblocked", screen.painted), screen.painted


@pytest.mark.parametrize("width", [80, 120])
def test_events_on_a_terminal_are_one_line_each_the_diff_only_when_asked(healed_agent: Agent, width: int) -> None:
    screen = on_screen(healed_agent, "events", "-n", "2", "--control", "ssh", width=width)
    assert screen.exit_code == 0 and len(screen.rows) == 2, screen.rows  # drift-detected, drift-reverted
    assert_nothing_wraps(screen, width)
    detected, reverted = screen.rows
    stamp = r"[A-Z][a-z]{2} \d\d \d\d:\d\d:\d\d"  # local time to the second
    assert re.match(rf"{stamp}  ssh +drift-detected +-  ", detected), detected
    assert re.match(rf"{stamp}  ssh +drift-reverted +success  drift reverted in \d+ ms", reverted), reverted
    diffs = on_screen(healed_agent, "events", "-n", "2", "--control", "ssh", "--diff", width=width)
    assert "    +++ b/etc/ssh/sshd_config.d/00-vps-agent.conf" in diffs.rows
    assert_nothing_wraps(diffs, width)

"""`vps-agentctl events` for people: local time to the second (or UTC), the control, the action, the
outcome ("-" where none applies), a one-line summary; the diff only when asked."""

from __future__ import annotations

import datetime
from typing import Any

from agent.console.text import GREEN, RED, YELLOW, Terminal

# ECS says "unknown" where an event has no success or failure (a drift seen, an agent started): a person
# reads that as "something went wrong we could not tell", so it shows as "-"
_NO_OUTCOME = {"", "unknown", None}
_OUTCOME_COLOURS = {"success": GREEN, "failure": RED}
ACTION_WIDTH = 19  # all but the rarest actions (port-move-state-reset, transaction-recovered) fit
_ATTENTION = {"drift-detected": YELLOW, "remediation-failed": RED, "remediation-blocked": RED, "flapping": YELLOW}


def event_time(stamp: str, *, utc: bool) -> str:
    """An ECS @timestamp ("2026-12-04T06:25:22.665Z") as journalctl shows it: "Dec 04 07:25:22" in local
    time, or "Dec 04 06:25:22Z" in UTC."""
    try:
        moment = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return str(stamp)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    if utc:
        return moment.astimezone(datetime.UTC).strftime("%b %d %H:%M:%SZ")
    return moment.astimezone().strftime("%b %d %H:%M:%S")


def summary(event: dict[str, Any]) -> str:
    """The message without the "control: " it starts with (the control has its own column)."""
    message = str(event.get("message", ""))
    control = event.get("control")
    if control and message.startswith(f"{control}: "):
        message = message[len(control) + 2 :]
    return message


def event_lines(event: dict[str, Any], terminal: Terminal, *, utc: bool = False, diff: bool = False) -> list[str]:
    """One line per event (trimmed to a terminal's width), then its diff when asked and there is one."""
    action = str(event.get("event", {}).get("action", "?"))
    raw_outcome = event.get("event", {}).get("outcome")
    outcome = "-" if raw_outcome in _NO_OUTCOME else str(raw_outcome)
    head = f"{event_time(str(event.get('@timestamp', '')), utc=utc)}  {event.get('control') or '-':<8} "
    used = len(head) + max(ACTION_WIDTH, len(action)) + 1 + max(7, len(outcome)) + 2
    painted_action = terminal.paint(action, _ATTENTION.get(action)) + " " * max(0, ACTION_WIDTH - len(action))
    painted_outcome = terminal.paint(outcome, _OUTCOME_COLOURS.get(outcome)) + " " * max(0, 7 - len(outcome))
    lines = [f"{head}{painted_action} {painted_outcome}  {terminal.fit(summary(event), used)}".rstrip()]
    if diff and event.get("diff"):
        lines += [terminal.fit(f"    {line}") for line in str(event["diff"]).splitlines()]
    return lines

"""The status and check screens: a verdict line first, the daemon's line, problems with the outputs (only
when there are any), the table of guards, and the port move and upgrade lines."""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from typing import Any

from agent.console.text import GREEN, RED, YELLOW, Terminal, columns, since

# worst first: the verdict names them in this order
SEVERITY = {
    "blocked": RED,
    "failed": RED,
    "error": RED,
    "flapping": YELLOW,
    "drifted": YELLOW,
    "pending": YELLOW,
    "waiting": YELLOW,
    "starting": YELLOW,
    "paused": YELLOW,
    "healed": GREEN,
    "compliant": GREEN,
    "disabled": None,
}
HEAL_SAME_MOMENT = 2.0  # seconds: a "last heal" this close to SINCE says nothing more


def _facts_text(facts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in facts.items())


def _detail(item: dict[str, Any], now: float) -> str:
    detail = str(item.get("why") or _facts_text(item.get("facts", {})))
    healed_at, since_at = item.get("last_heal_at"), item.get("since")
    if item["status"] == "healed" and healed_at and (not since_at or abs(healed_at - since_at) > HEAL_SAME_MOMENT):
        detail = f"last heal {since(healed_at, now)}: {detail}"
    return detail


def verdict(controls: Sequence[dict[str, Any]], port_move: dict[str, Any] | None = None) -> tuple[str, str | None]:
    """The first line, and its colour: '4 guards: 3 compliant, 1 pending (ssh: log in with your key once)'."""
    counts = collections.Counter(item["status"] for item in controls)
    order = [s for s in SEVERITY if s in counts] + sorted(s for s in counts if s not in SEVERITY)
    noun = "guard" if len(controls) == 1 else "guards"
    text = f"{len(controls)} {noun}: " + ", ".join(f"{counts[s]} {s}" for s in order)
    colours = [SEVERITY.get(s, YELLOW) for s in order if SEVERITY.get(s, YELLOW)]
    colour = RED if RED in colours else YELLOW if YELLOW in colours else GREEN if colours else None
    worst = next((i for s in order for i in controls if i["status"] == s and SEVERITY.get(s, YELLOW) != GREEN), None)
    # what to do beats what is wrong: a held setting names the command that ends the wait
    todo = (worst.get("held") or [{}])[0].get("unblock") or worst.get("why") if worst is not None else None
    if worst is not None and worst["status"] != "disabled" and todo:
        text += f" ({worst['control']}: {todo})"
    elif worst is not None and worst["status"] == "paused" and worst.get("drift"):
        text += f" ({worst['control']}: paused with drift)"
    if port_move:
        moving = port_move["phase"] == "open"
        text += "; the SSH port move waits for proof" if moving else "; an SSH port move rolled back"
        colour = RED if colour == RED else YELLOW
    return text, colour


def render_table(
    controls: Sequence[dict[str, Any]], terminal: Terminal | None = None, *, with_since: bool = True
) -> str:
    """CONTROL STATUS [SINCE] DETAIL, DETAIL trimmed to the terminal's width; then what is held or drifted."""
    terminal = terminal or Terminal()
    now = time.time()
    header = ("CONTROL", "STATUS", "SINCE", "DETAIL") if with_since else ("CONTROL", "STATUS", "DETAIL")
    rows: list[tuple[str, ...]] = [header]
    for item in controls:
        since_cell = (since(item.get("since"), now),) if with_since else ()
        rows.append((item["control"], item["status"], *since_cell, _detail(item, now)))
    paints = [None, *(SEVERITY.get(item["status"], YELLOW) for item in controls)]
    lines = columns(rows, terminal, paints)
    for item in controls:
        for held in item.get("held") or []:
            text = f"  {item['control']}: {held['setting']} held: {held['reason']}: {held['unblock']}"
            lines.append(terminal.fit(text))
        for drift in item.get("drift") or []:
            if item["status"] not in ("compliant", "healed"):
                lines.append(terminal.fit(f"  {item['control']}: {drift}"))
    return "\n".join(lines)


def output_problems(outputs: dict[str, Any]) -> list[str]:
    """What is failing or being dropped on the way to the journal, syslog and the metrics file: nothing
    when all is well (the events and metrics destinations are in --json and vps-agent(8))."""
    lines = []
    if outputs.get("journald_note"):
        lines.append(f"journal: {outputs['journald_note']}")
    syslog = outputs.get("syslog")
    if syslog and (not syslog["connected"] or syslog["dropped"] or syslog["error"]):
        if syslog["connected"]:
            state = "connected"
        elif syslog["error_since"]:
            state = f"unreachable since {since(syslog['error_since'])}"
        else:
            state = "connecting"
        lines.append(
            f"syslog {syslog['target']}: {state}, {syslog['sent']} sent, {syslog['dropped']} dropped, "
            f"{syslog['buffered']}/{syslog['buffer']} buffered" + (f" ({syslog['error']})" if syslog["error"] else "")
        )
    metrics = outputs.get("prometheus_textfile")
    if metrics and metrics.get("error"):
        lines.append(f"metrics NOT written: {metrics['error']}")
    if outputs.get("output_error"):
        lines.append(f"an output failed: {outputs['output_error']}")
    return lines


def render_status(status: dict[str, Any], terminal: Terminal) -> str:
    """`vps-agentctl status` as a person reads it."""
    text, colour = verdict(status["controls"], status.get("port_move"))
    lines = [terminal.paint(terminal.fit(text), colour)]
    lines.append(
        terminal.fit(
            f"vps-agent {status['version']} on {status['host']} (pid {status['pid']}), "
            f"up since {since(status['started_at'])}"
        )
    )
    problems = []
    if status["config"]["error"]:
        problems.append(f"config REJECTED, running on the previous one: {status['config']['error']}")
    if status.get("events_file_error"):
        problems.append(f"events file not written: {status['events_file_error']}")
    problems += output_problems(status.get("outputs") or {})
    lines += [terminal.paint(terminal.fit(p), RED) for p in problems]
    if status["config"].get("missing"):
        lines.append(terminal.paint(terminal.fit(status["config"]["missing"]), YELLOW))
    lines.append(render_table(status["controls"], terminal))
    if status.get("port_move"):
        lines.append(terminal.paint(terminal.fit(render_port_move(status["port_move"])), YELLOW))
    if status.get("updates"):
        lines += [terminal.fit(line) for line in render_updates(status["updates"]).splitlines()]
    return "\n".join(lines)


def render_check(rows: Sequence[dict[str, Any]], terminal: Terminal) -> str:
    """`vps-agentctl check`: the verdict, the table without SINCE (nothing has a since when observed once),
    and the blocked reasons the DETAIL column does not already give (-l shows a trimmed one in full)."""
    text, colour = verdict(rows)
    lines = [terminal.paint(terminal.fit(text), colour), render_table(rows, terminal, with_since=False)]
    for row in rows:
        for reason in row["blocked"]:
            if reason != row["why"]:
                lines.append(terminal.fit(f"  {row['control']} blocked: {reason}"))
    return "\n".join(lines)


def _when(stamp: float | None) -> str:
    """A future moment as the admin reads it: local time, and how far off."""
    if not stamp:
        return "-"
    left = stamp - time.time()
    local = time.strftime("%a %Y-%m-%d %H:%M %Z", time.localtime(stamp))
    if left <= 0:
        return f"{local} (due now)"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if left >= size:
            return f"{local} (in {int(left // size)}{unit})"
    return f"{local} (in {int(left)}s)"


def render_updates(updates: dict[str, Any]) -> str:
    """The upgrade scheduler's lines of `status`: last run, its outcome, the next run, reboot."""
    lines = []
    if not updates["enabled"]:
        lines.append("updates: disabled in the config")
    elif updates.get("error"):
        lines.append(f"updates: SCHEDULE ERROR: {updates['error']}")
    else:
        catch_up = " (catching up a missed run)" if updates.get("catch_up") else ""
        lines.append(
            f"updates: {updates['mode']}, {updates['schedule']}; next run {_when(updates['next_run'])}{catch_up}"
        )
    if updates.get("running_since"):
        lines.append(f"  running since {since(updates['running_since'])}")
    if updates.get("last_finished"):
        changes = updates.get("last_changes") or []
        text = f"{len(changes)} package(s) changed" if changes else "nothing to upgrade"
        detail = f": {updates['last_detail']}" if updates.get("last_detail") else ""
        lines.append(f"  last run {since(updates['last_finished'])}: {updates['last_outcome']}, {text}{detail}")
    else:
        lines.append("  last run: never")
    if updates.get("reboot_required"):
        by = ", ".join(updates.get("reboot_packages") or []) or "an upgrade"
        window = updates.get("reboot_window")
        plan = f"reboots inside {window}" if window else "reboot by hand (updates.reboot_window is null)"
        lines.append(f"  REBOOT REQUIRED by {by}: {plan}")
    return "\n".join(lines)


def render_port_move(move: dict[str, Any]) -> str:
    """The SSH port move's line of `status`."""
    olds = ", ".join(str(p) for p in move["old"])
    if move["phase"] == "open":
        left = int(move.get("seconds_left") or 0)
        return (
            f"ssh port move {olds} -> {move['new']}: BOTH OPEN; log in on {move['new']} (or run "
            f"`vps-agentctl confirm`) within {left // 60}m{left % 60:02d}s, or it rolls back to {olds}"
        )
    return (
        f"ssh port move to {move['new']} ROLLED BACK: sshd stays on {olds} (not confirmed in time); "
        "change the config and reload to try again"
    )

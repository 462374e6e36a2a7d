"""The fleet report's filters: `vps-agentctl status --json` of every host -> one table and the hosts at fault.

    rows = hostvars | vps_agent.vps_agent.fleet_rows(ansible_play_hosts_all)
    rows | vps_agent.vps_agent.fleet_table   -> the table, one line a guard
    rows | vps_agent.vps_agent.fleet_faults  -> "host: why" for each host blocked, drifted or unreachable
    hostvars | vps_agent.vps_agent.fleet_targets(hosts, 9100)  -> Prometheus file_sd target groups

Plain Python over plain data (no Ansible import), so the unit tests drive it without Ansible.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

DOCUMENTATION = """
name: fleet_rows
short_description: vps-agentctl status --json of each host, as the fleet report's rows
"""

# A guard in one of these makes the report fail: the agent cannot (blocked, failed, error) or may not
# (drifted: report mode, paused) heal it, or it keeps being undone (flapping). pending waits for the
# admin's proof (a key login, the new SSH port's first login) and is shown, not failed.
FAULT_STATUSES = ("blocked", "failed", "error", "drifted", "flapping")
COLUMNS = ("HOST", "GUARD", "STATUS", "SINCE", "HEALS", "LAST HEAL", "PORT MOVE", "LAST UPGRADE", "REBOOT")


def _when(epoch: Any) -> str:
    if not isinstance(epoch, int | float) or isinstance(epoch, bool):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(epoch))


def _status_of(result: Any) -> tuple[dict[str, Any] | None, str]:
    """The parsed status of one host's registered `vps-agentctl status --json`, or why there is none."""
    if not isinstance(result, Mapping):
        return None, "no status gathered"
    if result.get("unreachable"):
        return None, str(result.get("msg", "")).strip()
    try:
        status = json.loads(str(result.get("stdout", "")))
    except ValueError:
        status = None
    if not isinstance(status, dict) or "controls" not in status:
        why = str(result.get("stderr") or result.get("msg") or "no output").strip().splitlines()
        return None, f"vps-agentctl status exit {result.get('rc')}: {why[-1] if why else ''}"
    return status, ""


def _port_move(status: Mapping[str, Any]) -> str:
    move = status.get("port_move")
    if not move:
        return "-"
    return f"{move.get('old')} -> {move.get('new')} {move.get('phase')}"


def _upgrade(status: Mapping[str, Any]) -> tuple[str, str]:
    updates = status.get("updates") or {}
    outcome = updates.get("last_outcome")
    last = f"{_when(updates.get('last_finished'))} {outcome}" if outcome else "never"
    reboot = "required" if updates.get("reboot_required") else "no"
    return last, reboot


def _guard_fault(control: Mapping[str, Any]) -> str:
    status = str(control.get("status"))
    if status in FAULT_STATUSES or (status == "paused" and control.get("drift")):
        return f"{control.get('control')} {status}" + (f" ({control['why']})" if control.get("why") else "")
    return ""


def fleet_rows(
    hostvars: Mapping[str, Any], hosts: Iterable[str], var: str = "vps_agent_status"
) -> list[dict[str, Any]]:
    """One row per host and guard (a host without a status: one row saying why)."""
    rows: list[dict[str, Any]] = []
    for host in hosts:
        status, why = _status_of(hostvars[host].get(var))
        if status is None:
            rows.append({"host": host, "guard": "-", "status": "unreachable", "fault": why})
            continue
        last_upgrade, reboot = _upgrade(status)
        for i, control in enumerate(status["controls"]):
            first = i == 0
            rows.append(
                {
                    "host": host,
                    "guard": control.get("control"),
                    "status": control.get("status"),
                    "since": _when(control.get("since")),
                    "heals": control.get("heals", 0),
                    "last_heal": _when(control.get("last_heal_at")),
                    "port_move": _port_move(status) if first else "",
                    "last_upgrade": last_upgrade if first else "",
                    "reboot": reboot if first else "",
                    "fault": _guard_fault(control),
                }
            )
    return rows


def fleet_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """Aligned columns, one line a guard; a host without a status gets one line: why (unpadded, last)."""
    keys = ("host", "guard", "status", "since", "heals", "last_heal", "port_move", "last_upgrade", "reboot")
    cells: list[list[str]] = [list(COLUMNS)]
    for row in rows:
        if row["status"] == "unreachable":
            cells.append([str(row["host"]), "-", f"unreachable: {row['fault']}"])
        else:
            cells.append([str(row.get(k, "")) for k in keys])
    widths = [max(len(line[i]) for line in cells if len(line) == len(keys)) for i in range(len(keys))]
    # an unreachable host's line is shorter: its reason is the last cell, unpadded
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)).rstrip() for line in cells)


def fleet_faults(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """'host: why' for each guard (or host) the report fails on."""
    return [f"{row['host']}: {row['fault']}" for row in rows if row.get("fault")]


def fleet_targets(hostvars: Mapping[str, Any], hosts: Iterable[str], port: int = 9100) -> list[dict[str, Any]]:
    """Prometheus file_sd target groups: each host's node_exporter, labelled with its inventory name."""
    groups = []
    for host in hosts:
        address = str(hostvars[host].get("ansible_host") or host)
        if ":" in address:  # an IPv6 address
            address = f"[{address}]"
        groups.append({"targets": [f"{address}:{port}"], "labels": {"instance": host}})
    return groups


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "fleet_rows": fleet_rows,
            "fleet_table": fleet_table,
            "fleet_faults": fleet_faults,
            "fleet_targets": fleet_targets,
        }

"""The fleet report's filters (packaging/ansible/plugins/filter/fleet.py): registered results of
`vps-agentctl status --json` -> one table, and the hosts the report fails on. Plain data, no Ansible."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "packaging" / "ansible" / "plugins" / "filter" / "fleet.py"
SINCE = 1796400000.0  # 2026-12-04 16:00:00Z


def load_plugin() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vps_agent_fleet_filter", PLUGIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fleet = load_plugin()


def guard(name: str, status: str = "compliant", **extra: Any) -> dict[str, Any]:
    return {"control": name, "status": status, "since": SINCE, "heals": 0, "last_heal_at": None, "why": "", **extra}


def registered(*controls: dict[str, Any], rc: int = 0, **status: Any) -> dict[str, Any]:
    """What `register:` holds for one host's `vps-agentctl status --json`."""
    body = {"controls": list(controls), "port_move": None, "updates": {}, **status}
    return {"rc": rc, "stdout": json.dumps(body), "stderr": ""}


def report(hostvars: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    rows = fleet.fleet_rows(hostvars, list(hostvars))
    return fleet.fleet_table(rows), fleet.fleet_faults(rows)


def test_a_compliant_fleet_has_one_line_a_guard_and_no_faults() -> None:
    table, faults = report(
        {
            "web1": {"vps_agent_status": registered(guard("ssh"), guard("firewall"))},
            "web2": {"vps_agent_status": registered(guard("ssh", "healed", heals=2, last_heal_at=SINCE + 60))},
        }
    )
    lines = table.splitlines()
    assert lines[0].split() == ["HOST", "GUARD", "STATUS", "SINCE", "HEALS", "LAST", "HEAL", "PORT", "MOVE",
                                "LAST", "UPGRADE", "REBOOT"]  # fmt: skip
    assert len(lines) == 4 and faults == []
    assert "web2  ssh       healed     2026-12-04 16:00:00Z  2      2026-12-04 16:01:00Z" in table, table


def test_a_drifted_or_blocked_guard_is_a_fault_and_pending_is_not() -> None:
    _, faults = report(
        {
            "a": {"vps_agent_status": registered(guard("sysctl", "drifted"), rc=1)},
            "b": {"vps_agent_status": registered(guard("ssh", "blocked", why="no admin can log in"), rc=2)},
            "c": {"vps_agent_status": registered(guard("ssh", "pending"), rc=1)},
            "d": {"vps_agent_status": registered(guard("firewall", "paused", drift=["INPUT policy ACCEPT"]), rc=1)},
        }
    )
    assert faults == ["a: sysctl drifted", "b: ssh blocked (no admin can log in)", "d: firewall paused"]


def test_a_host_without_a_status_is_a_fault_with_its_reason() -> None:
    table, faults = report(
        {
            "down": {"vps_agent_status": {"rc": 3, "stdout": "", "stderr": "vps-agentctl: daemon unreachable"}},
            "gone": {"vps_agent_status": {"unreachable": True, "msg": "Failed to connect to the host via ssh"}},
            "new": {},
            "ok": {"vps_agent_status": registered(guard("ssh"))},
        }
    )
    assert faults == [
        "down: vps-agentctl status exit 3: vps-agentctl: daemon unreachable",
        "gone: Failed to connect to the host via ssh",
        "new: no status gathered",
    ]
    assert "down  -      unreachable: vps-agentctl status exit 3" in table, table


def test_the_port_move_upgrade_and_reboot_show_on_the_hosts_first_line() -> None:
    status = registered(
        guard("ssh", "pending"),
        guard("firewall"),
        port_move={"old": 22, "new": 2222, "phase": "open"},
        updates={"last_finished": SINCE, "last_outcome": "failure", "reboot_required": True},
        rc=1,
    )
    rows = fleet.fleet_rows({"h": {"vps_agent_status": status}}, ["h"])
    assert rows[0]["port_move"] == "22 -> 2222 open"
    assert rows[0]["last_upgrade"] == "2026-12-04 16:00:00Z failure" and rows[0]["reboot"] == "required"
    assert rows[1]["port_move"] == rows[1]["last_upgrade"] == rows[1]["reboot"] == ""


def test_never_upgraded_says_so() -> None:
    rows = fleet.fleet_rows({"h": {"vps_agent_status": registered(guard("ssh"))}}, ["h"])
    assert rows[0]["last_upgrade"] == "never" and rows[0]["reboot"] == "no"


def test_prometheus_targets_are_each_hosts_node_exporter_named_as_in_the_inventory() -> None:
    hostvars = {"web1": {"ansible_host": "203.0.113.5"}, "web2": {}, "v6": {"ansible_host": "2001:db8::5"}}
    assert fleet.fleet_targets(hostvars, ["web1", "web2", "v6"], 9100) == [
        {"targets": ["203.0.113.5:9100"], "labels": {"instance": "web1"}},
        {"targets": ["web2:9100"], "labels": {"instance": "web2"}},
        {"targets": ["[2001:db8::5]:9100"], "labels": {"instance": "v6"}},
    ]

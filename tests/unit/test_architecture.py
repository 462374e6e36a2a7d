"""The boundaries: one door to the outside world (only agent/system/run.py starts processes), the console
wired without the daemon, and agent/config as a package of small modules behind one public name space."""

from __future__ import annotations

import re
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "agent"


def test_only_the_run_door_imports_subprocess() -> None:
    importers = sorted(
        str(p.relative_to(AGENT))
        for p in AGENT.rglob("*.py")
        if re.search(r"^\s*(import subprocess|from subprocess import)", p.read_text(), re.M)
    )
    assert importers == ["system/run.py"]


def test_no_module_names_etc_outside_paths_and_the_sshd_guard() -> None:
    allowed = {"paths.py", "controls/sshd_config.py", "controls/sshd.py", "controls/sshd_lockout.py", "cli.py"}
    allowed.add("system/namespace.py")
    offenders = [
        str(p.relative_to(AGENT))
        for p in AGENT.rglob("*.py")
        if '"/etc/' in p.read_text() and str(p.relative_to(AGENT)) not in allowed
    ]
    assert offenders == []


def imports_of(path: Path) -> set[str]:
    """The agent modules a file imports, dotted ("agent.config.nodes"), however it spells the import."""
    found = set()
    imports = re.findall(r"^\s*from (agent[\w.]*) import (?:\(([^)]*)\)|(.*))", path.read_text(), re.M)
    for module, *spellings in imports:
        names = "".join(spellings)
        found.add(module)
        found.update(f"{module}.{name.split(' as ')[0].strip()}" for name in names.split(",") if name.strip())
    found.update(re.findall(r"^\s*import (agent[\w.]*)", path.read_text(), re.M))
    return found


def test_the_console_gets_its_controls_from_wiring_not_from_the_daemon() -> None:
    console = [AGENT / "cli.py", *(AGENT / "console").glob("*.py")]
    assert not any(name.startswith("agent.daemon") for path in console for name in imports_of(path))
    assert "agent.wiring.build_controls" in imports_of(AGENT / "console" / "local.py")
    assert "agent.wiring.build_controls" in imports_of(AGENT / "daemon.py")
    builders = sorted(
        str(p.relative_to(AGENT))
        for p in AGENT.rglob("*.py")
        if re.search(r"^def build_controls\(", p.read_text(), re.M)
    )
    assert builders == ["wiring.py"]


def test_config_is_a_package_of_small_modules_that_import_no_other_part_of_the_agent() -> None:
    modules = sorted(p.name for p in (AGENT / "config").glob("*.py"))
    assert modules == [
        "__init__.py",
        "durations.py",
        "edit.py",
        "errors.py",
        "fields.py",
        "loader.py",
        "nodes.py",
        "schema.py",
    ]
    assert not (AGENT / "config.py").exists()
    for path in (AGENT / "config").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, path.name
        outside = {name for name in imports_of(path) if not name.startswith(("agent.config", "agent.schedule"))}
        assert outside == set(), path.name


def test_one_regex_reads_the_simple_schedule_forms() -> None:
    spellers = sorted(
        str(p.relative_to(AGENT)) for p in AGENT.rglob("*.py") if re.search(r"re\.compile\(.*daily", p.read_text())
    )
    assert spellers == ["schedule.py"]


def test_the_rest_of_the_agent_imports_config_names_from_agent_config_alone() -> None:
    import agent.config

    users = [p for p in AGENT.rglob("*.py") if p.parent != AGENT / "config"]
    names = set().union(*(imports_of(p) for p in users))
    assert {n for n in names if n.startswith("agent.config.") and n.count(".") > 2} == set()  # no submodule
    used = {n.removeprefix("agent.config.") for n in names if n.startswith("agent.config.")}
    assert used and used <= set(agent.config.__all__)
    assert all(hasattr(agent.config, name) for name in agent.config.__all__)


def test_ipc_is_a_package_whose_client_needs_none_of_the_server() -> None:
    modules = sorted(p.name for p in (AGENT / "ipc").glob("*.py"))
    assert modules == ["__init__.py", "client.py", "connection.py", "server.py", "wire.py"]
    assert not (AGENT / "ipc.py").exists()
    for path in (AGENT / "ipc").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, path.name
    imported = {n.split(".")[2] for n in imports_of(AGENT / "ipc" / "client.py") if n.startswith("agent.")}
    assert imported == {"wire"}  # vps-agentctl loads no server code


def test_the_upgrades_run_every_process_through_the_system_doors() -> None:
    assert not (AGENT / "upgrades.py").exists()
    for path in (AGENT / "updates").glob("*.py"):
        assert "agent.system.run.run" not in imports_of(path), path.name
        assert not re.search(r"\brun\(\[", path.read_text()), path.name  # no argv of its own
        assert len(path.read_text().splitlines()) <= 430, path.name


def control_names() -> set[str]:
    """The guards: the modules (or packages) of agent/controls that define a Control."""
    names = set()
    for path in (AGENT / "controls").rglob("*.py"):
        if re.search(r"^class \w+\(Control\):", path.read_text(), re.M):
            names.add(path.relative_to(AGENT / "controls").parts[0].removesuffix(".py"))
    return names


def test_no_control_imports_another_control() -> None:
    controls = control_names()
    assert {"sshd", "firewall", "fail2ban", "accounts"} <= controls
    for path in (AGENT / "controls").rglob("*.py"):
        own = path.relative_to(AGENT / "controls").parts[0].removesuffix(".py")
        others = {
            name.split(".")[2]
            for name in imports_of(path)
            if name.startswith("agent.controls.") and name.split(".")[2] in controls - {own}
        }
        assert others == set(), f"{path.relative_to(AGENT)} imports the {', '.join(sorted(others))} control"


def test_the_ssh_ports_have_one_source_outside_the_controls() -> None:
    """The firewall keeps them open, fail2ban guards them: both take them from agent/sshd_ports.py, which
    asks sshd (controls/sshd_config.py reads `sshd -T`), not the SSH guard."""
    for control in ("firewall/control.py", "fail2ban/control.py"):
        assert "agent.sshd_ports.ssh_ports" in imports_of(AGENT / "controls" / control), control
    assert not any(n.startswith("agent.controls.sshd.") for n in imports_of(AGENT / "sshd_ports.py"))


def test_no_module_in_agent_is_over_400_lines() -> None:
    """Issue 17: a file over ~400 lines mixes concerns; split it by concern, as controls/sshd.py was."""
    over = {str(p.relative_to(AGENT)) for p in AGENT.rglob("*.py") if len(p.read_text().splitlines()) > 400}
    assert not over, f"over 400 lines: {sorted(over)}"

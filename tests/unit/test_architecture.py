"""The boundaries: one door to the outside world (only agent/system/run.py starts processes), the console
wired without the daemon, and agent/config as a package of small modules behind one public name space."""

from __future__ import annotations

import ast
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
    allowed = {
        "paths.py",
        "controls/ssh/sshd_config.py",
        "controls/ssh/control.py",
        "controls/ssh/lockout.py",
        "cli.py",
    }
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
        if re.search(r"^class \w+\(Control\[", path.read_text(), re.M):
            names.add(path.relative_to(AGENT / "controls").parts[0].removesuffix(".py"))
    return names


def test_every_control_names_its_observed_and_desired_types() -> None:
    """Control is generic over what observe() and desired() return: a bare `Control` would make mypy take
    every step's arguments as Any."""
    for path in (AGENT / "controls").rglob("*.py"):
        bare = re.findall(r"^class (\w+)\(Control\):", path.read_text(), re.M)
        assert not bare, f"{path}: {bare} subclass Control without its types (Control[XObserved, XDesired])"


# What a control may remember between calls: caches of what it reads, and what it learns from the kernel or
# the lockout check that outlives one converge. Nothing that one step sets for another to read (the contract
# hands every step what it needs: observe(desired), reload(changes), facts(observed, desired)).
KEPT_BETWEEN_CALLS = {
    "_backend",  # the netfilter backend, detected once
    "_sshd_defaults",  # sshd -T -f /dev/null, asked once
    "_assessed",  # the sysctl judgement of one observation, for facts/diff/plan of the same converge
    "_refused",  # sysctl values the kernel refused: reported, not retried until the config changes
    "_passwords_held",  # the SSH guard's lockout check, read by fail2ban's jail mode (agent/wiring.py)
}


def test_no_control_keeps_state_from_one_step_for_the_next() -> None:
    for path in (AGENT / "controls").rglob("*.py"):
        tree = ast.parse(path.read_text())
        guards = [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef)
            and any(isinstance(base, ast.Subscript) and ast.unparse(base.value) == "Control" for base in node.bases)
        ]
        for function in (f for guard in guards for f in ast.walk(guard)):
            if not isinstance(function, ast.FunctionDef) or function.name == "__init__":
                continue
            for node in ast.walk(function):
                targets = node.targets if isinstance(node, ast.Assign) else []
                targets += [node.target] if isinstance(node, ast.AnnAssign | ast.AugAssign) else []
                for target in targets:
                    for item in target.elts if isinstance(target, ast.Tuple) else [target]:
                        if isinstance(item, ast.Attribute) and isinstance(item.value, ast.Name):
                            if item.value.id == "self":
                                assert item.attr in KEPT_BETWEEN_CALLS, (
                                    f"{path}:{item.lineno}: {function.name}() sets self.{item.attr} for a later "
                                    "step: pass it through the contract instead (Changes, ReloadOutcome.facts)"
                                )


def test_the_engine_reads_each_guards_policies_from_one_meta_record() -> None:
    """enabled and enforce/report are the engine's (Control.meta -> Meta.of(section)), not each guard's code."""
    for path in set((AGENT / "controls").rglob("*.py")) - {AGENT / "controls/base.py"}:  # (GuardSection's)
        defined = set(re.findall(r"^    def (enabled|remediates)\(", path.read_text(), re.M))
        assert not defined, f"{path}: defines {defined}: return Meta.of(config.<section>) from meta() instead"
    assert not re.search(r"\.(enabled|remediates)\(config\)", "".join(p.read_text() for p in AGENT.rglob("*.py")))


def test_a_controls_events_go_through_the_one_helper() -> None:
    """events.of(control, txid).emit(...) names the control, its transaction and the message prefix one way;
    no call site assembles those fields by hand."""
    for path in AGENT.rglob("*.py"):
        if path.name == "events.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "emit":
                named = {keyword.arg for keyword in node.keywords}
                assert "control" not in named, f"{path}:{node.lineno}: use events.of(control).emit"


def test_no_control_imports_another_control() -> None:
    controls = control_names()
    assert {"ssh", "firewall", "fail2ban", "accounts"} <= controls
    for path in (AGENT / "controls").rglob("*.py"):
        own = path.relative_to(AGENT / "controls").parts[0].removesuffix(".py")
        others = {
            name.split(".")[2]
            for name in imports_of(path)
            if name.startswith("agent.controls.") and name.split(".")[2] in controls - {own}
        }
        assert others == set(), f"{path.relative_to(AGENT)} imports the {', '.join(sorted(others))} control"


def test_ssh_is_one_package_the_guard_its_config_graph_its_ports_and_the_port_move() -> None:
    modules = sorted(p.name for p in (AGENT / "controls" / "ssh").glob("*.py"))
    assert modules == [
        "__init__.py",
        "control.py",  # the guard
        "keylogins.py",  # the proof of a sudo admin's key login
        "lockout.py",  # each setting held while it would take a way in away
        "model.py",  # what it observes and wants, the drop-ins it renders
        "portmove.py",  # the two-phase port move's state
        "ports.py",  # what sshd listens on, and the SSH ports the engine hands out
        "proofs.py",  # the port move's coordinator: what sshd's journal proves, and `confirm`
        "sshd_config.py",  # the config graph as sshd reads it, and sshd -T
        "strict.py",  # profile: strict
    ]
    leftovers = ["sshd_ports.py", "portmove.py", "proofs.py", "keylogins.py"]
    assert not [name for name in leftovers if (AGENT / name).exists()]
    assert not list((AGENT / "controls").glob("ssh*.py"))


def test_the_three_guards_get_their_ssh_ports_from_the_engine() -> None:
    """The engine works the SSH ports out once per converge (the runner asks SshShared.ports_now) and every
    guard's desired() gets them; the firewall and fail2ban read neither sshd nor the port move themselves."""
    import inspect

    from agent.controls.base import Control, SshPorts
    from agent.controls.ssh.control import SshdControl
    from agent.engine import transaction
    from agent.engine.engine import Engine
    from agent.engine.runner import ControlRunner

    for guard in ("firewall", "fail2ban"):
        for path in (AGENT / "controls" / guard).glob("*.py"):
            names = imports_of(path)
            assert not any(n.startswith("agent.controls.ssh") for n in names), path.name
            assert not re.search(r"\b(SshdPorts|PortMoves|ssh_ports)\(", path.read_text()), path.name
    assert list(inspect.signature(Control.desired).parameters) == ["self", "config", "ssh"]
    assert inspect.get_annotations(Control.desired)["ssh"] in (SshPorts, "SshPorts")
    required = inspect.Parameter.empty
    assert inspect.signature(transaction.converge).parameters["ssh"].default is required
    assert inspect.signature(ControlRunner).parameters["ssh_ports"].default is required
    assert inspect.signature(Engine).parameters["ssh_ports"].default is required
    # the shared objects are the daemon's, never a default the guard makes for itself
    for shared in ("moves", "keylogins"):
        assert inspect.signature(SshdControl).parameters[shared].default is required
    callers = sorted(
        str(p.relative_to(AGENT)) for p in AGENT.rglob("*.py") if re.search(r"\bports_now\(", p.read_text())
    )
    assert [c for c in callers if c.startswith(("controls/", "engine/"))] == ["controls/ssh/ports.py"]
    assert "wiring.py" in callers  # SshShared.ports_now: what the daemon hands the engine


def test_no_module_in_agent_is_over_400_lines() -> None:
    """Issue 17: a file over ~400 lines mixes concerns; split it by concern, as controls/ssh/control.py was."""
    over = {str(p.relative_to(AGENT)) for p in AGENT.rglob("*.py") if len(p.read_text().splitlines()) > 400}
    assert not over, f"over 400 lines: {sorted(over)}"

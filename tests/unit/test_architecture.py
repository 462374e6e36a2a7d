"""One door to the outside world: only agent/system/run.py starts processes."""

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
    allowed = {"paths.py", "controls/sshd_config.py", "controls/sshd.py", "cli.py", "system/namespace.py"}
    offenders = [
        str(p.relative_to(AGENT))
        for p in AGENT.rglob("*.py")
        if '"/etc/' in p.read_text() and str(p.relative_to(AGENT)) not in allowed
    ]
    assert offenders == []

"""Crash-safe transactions through the real daemon: a bug mid-heal rolls back byte for byte (the test-only
fault hook, agent/engine/faults.py, raises a TypeError at a named step, as a bug in a control would)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.harness import Agent, effective_sshd, tree_snapshot, wait_for

DROPIN = "etc/ssh/sshd_config.d/00-vps-agent.conf"


@pytest.mark.parametrize("step", ["after-validate", "during-reload"])
def test_a_bug_in_the_ssh_heal_restores_every_file_byte_for_byte(
    fake_root: Path, start_agent: Callable[..., Agent], step: str
) -> None:
    before = tree_snapshot(fake_root / "etc/ssh")
    agent = start_agent(fake_root, ready=False, env={"VPS_AGENT_TEST_FAULT": f"ssh:{step}:raise"})
    failed = agent.wait_event("remediation-failed", timeout=20)
    assert failed["error_type"] == "InjectedFault" and "fix rolled back: InjectedFault" in failed["message"]
    assert f"/{DROPIN}" in failed["restored"]
    assert tree_snapshot(fake_root / "etc/ssh") == before  # the drop-in gone again, sshd_config untouched
    agent.wait_ready()
    status = agent.status()["ssh"]
    assert status["status"] == "error" and "internal error: InjectedFault" in status["why"]
    # the bug fired once; the next converge heals
    assert agent.ctl("converge", "ssh").returncode == 0
    wait_for(lambda: (fake_root / DROPIN).exists(), what="the drop-in")
    assert effective_sshd(fake_root)["permitrootlogin"] == ["no"]


def test_fault_injection_is_refused_on_the_real_root() -> None:
    from agent.engine import faults

    with pytest.raises(faults.FaultSpecError, match="fake root"):
        faults.from_environment(False, {faults.ENV: "ssh:after-write"})
    assert faults.from_environment(False, {}).fault is None

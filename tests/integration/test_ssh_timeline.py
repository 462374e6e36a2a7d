"""Drifts made while the real daemon runs (real sshd -T/-t in its namespace): each returns to the baseline."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.integration.harness import Agent, StartAgent, backup_of, effective_sshd

BASELINE = {"port": ["2222"], "permitrootlogin": ["no"], "passwordauthentication": ["no"]}
DROPIN = "etc/ssh/sshd_config.d/00-vps-agent.conf"


def assert_baseline(root: Path) -> None:
    effective = effective_sshd(root)
    assert {k: effective[k] for k in BASELINE} == BASELINE


def first_directive(text: str) -> str:
    return next(line for line in text.splitlines() if line.strip() and not line.startswith("#"))


def heal_after(agent: Agent, root: Path, tamper: Callable[[], object]) -> dict[str, Any]:
    mark = agent.mark()
    tamper()
    detected = agent.wait_event("drift-detected", mark)
    reverted = agent.wait_event("drift-reverted", mark)
    assert reverted["transaction"]["id"] == detected["transaction"]["id"]
    assert_baseline(root)
    return reverted


def test_start_up_reconcile_applies_the_baseline_to_stock_debian(fake_root: Path, start_agent: StartAgent) -> None:
    assert effective_sshd(fake_root)["permitrootlogin"] == ["without-password"]
    agent = start_agent(fake_root)
    assert_baseline(fake_root)
    detected = agent.wait_event("drift-detected")
    assert detected["reason"] == "start-up reconcile"
    assert agent.ctl("status").returncode == 0


def test_sed_i_of_permitrootlogin_yes_into_sshd_config(fake_root: Path, start_agent: StartAgent) -> None:
    agent = start_agent(fake_root)
    main = fake_root / "etc/ssh/sshd_config"
    reverted = heal_after(
        agent,
        fake_root,
        lambda: subprocess.run(
            ["sed", "-i", "s/^#PermitRootLogin prohibit-password/PermitRootLogin yes/", str(main)], check=True
        ),
    )
    assert reverted["file"]["path"] == "/etc/ssh/sshd_config"
    text = main.read_text()
    assert (
        "\nPermitRootLogin yes" not in text
        and "neutralised, the agent keeps PermitRootLogin no: PermitRootLogin yes" in text
    )
    assert b"\nPermitRootLogin yes\n" in backup_of(fake_root, reverted["transaction"]["id"], "/etc/ssh/sshd_config")


def test_sed_i_inserting_permitrootlogin_yes_above_the_include_wins_over_the_dropin(
    fake_root: Path, start_agent: StartAgent
) -> None:
    agent = start_agent(fake_root)
    main = fake_root / "etc/ssh/sshd_config"
    mark = agent.mark()
    subprocess.run(["sed", "-i", "1i PermitRootLogin yes", str(main)], check=True)
    detected = agent.wait_event("drift-detected", mark)
    assert "-permitrootlogin yes" in detected["diff"]  # it had really won: the effective state drifted
    agent.wait_event("drift-reverted", mark)
    assert_baseline(fake_root)


def test_a_new_00_evil_conf_is_neutralised(fake_root: Path, start_agent: StartAgent) -> None:
    agent = start_agent(fake_root)
    evil = fake_root / "etc/ssh/sshd_config.d/00-evil.conf"
    reverted = heal_after(
        agent, fake_root, lambda: evil.write_text("PasswordAuthentication yes\nPermitRootLogin yes\n")
    )
    assert all(line.startswith("# [vps-agent ") for line in evil.read_text().splitlines())
    assert backup_of(fake_root, reverted["transaction"]["id"], "/etc/ssh/sshd_config.d/00-evil.conf") == (
        b"PasswordAuthentication yes\nPermitRootLogin yes\n"
    )


def test_the_include_line_deleted(fake_root: Path, start_agent: StartAgent) -> None:
    agent = start_agent(fake_root)
    main = fake_root / "etc/ssh/sshd_config"
    reverted = heal_after(
        agent, fake_root, lambda: subprocess.run(["sed", "-i", "/^Include /d", str(main)], check=True)
    )
    assert first_directive(main.read_text()) == "Include /etc/ssh/sshd_config.d/*.conf"
    backup = backup_of(fake_root, reverted["transaction"]["id"], "/etc/ssh/sshd_config").decode()
    assert "\nInclude " not in backup and "#PermitRootLogin prohibit-password" in backup


def test_the_agents_dropin_deleted(fake_root: Path, start_agent: StartAgent) -> None:
    agent = start_agent(fake_root)
    dropin = fake_root / DROPIN
    heal_after(agent, fake_root, dropin.unlink)
    assert dropin.read_text().splitlines()[-3:] == ["Port 2222", "PermitRootLogin no", "PasswordAuthentication no"]


def test_sshd_config_replaced_by_rename(fake_root: Path, start_agent: StartAgent) -> None:
    agent = start_agent(fake_root)
    main = fake_root / "etc/ssh/sshd_config"
    replacement = fake_root / "etc/ssh/sshd_config.new"

    def ansible_style_replace() -> None:
        replacement.write_text(
            "PermitRootLogin yes\nPasswordAuthentication yes\nSubsystem sftp /usr/lib/openssh/sftp-server\n"
        )
        os.rename(replacement, main)

    reverted = heal_after(agent, fake_root, ansible_style_replace)
    assert first_directive(main.read_text()) == "Include /etc/ssh/sshd_config.d/*.conf"
    assert backup_of(fake_root, reverted["transaction"]["id"], "/etc/ssh/sshd_config").startswith(
        b"PermitRootLogin yes\n"
    )


def test_port_22_added(fake_root: Path, start_agent: StartAgent) -> None:
    agent = start_agent(fake_root)
    main = fake_root / "etc/ssh/sshd_config"
    mark = agent.mark()
    with main.open("a") as handle:
        handle.write("Port 22\n")
    detected = agent.wait_event("drift-detected", mark)
    assert "-port 22" in detected["diff"]
    agent.wait_event("drift-reverted", mark)
    assert effective_sshd(fake_root)["port"] == ["2222"]


def test_drift_made_while_the_agent_was_down_is_healed_at_start(fake_root: Path, start_agent: StartAgent) -> None:
    agent = start_agent(fake_root)
    assert agent.stop() == 0
    (fake_root / DROPIN).unlink()
    (fake_root / "etc/ssh/sshd_config.d/00-cloud-init.conf").write_text("PasswordAuthentication yes\n")
    start_agent(fake_root)
    assert_baseline(fake_root)


def test_its_own_writes_do_not_trigger_another_transaction(fake_root: Path, start_agent: StartAgent) -> None:
    agent = start_agent(fake_root)
    mark = agent.mark()
    (fake_root / DROPIN).unlink()
    agent.wait_event("drift-reverted", mark)
    time.sleep(0.5)
    actions = [e["event"]["action"] for e in agent.events()[mark:]]
    assert actions == ["drift-detected", "drift-reverted"]

"""The guide's admin, in the real daemon against a fake root with the real sshd -T: what is safe applies at
once, passwords wait for proof of a key login (here `vps-agentctl confirm`; the booted-VPS e2e proves it
with a real login), and the proof outlives a restart."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from tests.fakeroot import client_key, make_root
from tests.integration.harness import Agent, StartAgent, effective_sshd, wait_for

CONFIG = 'ssh: {port: 2222, permit_root_login: "no"}\n'


def ssh_row(agent: Agent) -> dict[str, Any]:
    return agent.status()["ssh"]


def test_a_password_only_admin_gets_root_login_off_at_once_and_keeps_passwords(
    tmp_path: Path, start_agent: StartAgent
) -> None:
    root = make_root(tmp_path / "root", admin_key=False, config=CONFIG)
    agent = start_agent(root)
    effective = effective_sshd(root)
    assert effective["permitrootlogin"] == ["no"] and effective["passwordauthentication"] == ["yes"]
    assert effective["port"] == ["2222"]
    status = agent.ctl("status")
    assert status.returncode == 1, status.stdout
    assert any(line.split()[:2] == ["ssh", "pending"] for line in status.stdout.splitlines() if line.strip())
    assert "passwords stay on until admin logs in with a key: ssh-copy-id -p 2222 admin@" in status.stdout
    [held] = ssh_row(agent)["held"]
    assert held["setting"] == "PasswordAuthentication no" and held["needs"] == "proof"
    pending = agent.wait_event("remediation-pending")
    assert pending["held"] == ["PasswordAuthentication no"]
    # an unchanged pending state re-checked says nothing new
    agent.ctl("converge", "ssh")
    agent.ctl("converge", "ssh")
    actions = [e["event"]["action"] for e in agent.events() if e.get("control") == "ssh"]
    assert actions.count("remediation-pending") == 1 and "remediation-blocked" not in actions
    # confirm without a key: nothing to vouch for, passwords stay on
    confirm = agent.ctl("confirm")
    assert confirm.returncode == 1 and "has no key sshd accepts yet" in confirm.stderr
    assert effective_sshd(root)["passwordauthentication"] == ["yes"]


def test_a_key_alone_changes_nothing_confirm_turns_passwords_off_and_a_restart_keeps_it(
    tmp_path: Path, start_agent: StartAgent
) -> None:
    root = make_root(tmp_path / "root", admin_key=False, config=CONFIG)
    agent = start_agent(root)
    mark = agent.mark()
    keys = root / "home/admin/.ssh/authorized_keys"
    keys.parent.mkdir(mode=0o700)
    keys.write_bytes(client_key())
    keys.chmod(0o600)
    time.sleep(1.0)  # the guard sees the key (its ~/.ssh is watched) and keeps waiting for a login with it
    assert effective_sshd(root)["passwordauthentication"] == ["yes"]
    assert ssh_row(agent)["status"] == "pending"
    assert "log in once with that key" in agent.ctl("status").stdout
    confirm = agent.ctl("confirm")
    assert confirm.returncode == 0, confirm.stdout + confirm.stderr
    assert "key login of admin: password logins go off" in confirm.stdout
    wait_for(lambda: effective_sshd(root)["passwordauthentication"] == ["no"], 10, "passwords off")
    assert agent.wait_event("key-login-proven", mark)["user"]["name"] == "admin"
    assert agent.ctl("status").returncode == 0
    proof = json.loads((root / "var/lib/vps-agent/key-logins.json").read_text())
    assert proof["admin"]["how"] == "vps-agentctl confirm"
    assert agent.stop() == 0
    again = start_agent(root)
    assert again.ctl("status").returncode == 0 and effective_sshd(root)["passwordauthentication"] == ["no"]


def test_a_planted_password_yes_is_not_healed_once_the_proven_key_is_gone(
    tmp_path: Path, start_agent: StartAgent
) -> None:
    root = make_root(tmp_path / "root", config=CONFIG)  # the admin's key login is proven
    agent = start_agent(root)
    assert effective_sshd(root)["passwordauthentication"] == ["no"]
    mark = agent.mark()
    shutil.rmtree(root / "home/admin/.ssh")
    (root / "etc/ssh/sshd_config.d/00-aaa.conf").write_text("PasswordAuthentication yes\n")
    agent.wait_event("key-login-forgotten", mark)
    wait_for(lambda: ssh_row(agent)["status"] == "pending", 10, "ssh pending")
    # the agent's drop-in sorts first: it keeps passwords on now that no key is proven, and neutralises nothing
    assert effective_sshd(root)["passwordauthentication"] == ["yes"]
    assert effective_sshd(root)["permitrootlogin"] == ["no"]

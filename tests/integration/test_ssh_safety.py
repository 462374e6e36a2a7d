"""Never lock the admin out, never write what sshd -t rejects, lose nothing on bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from tests.fakeroot import client_key, make_root
from tests.integration.harness import StartAgent, effective_sshd, tree_snapshot, wait_for
from tests.integration.test_accounts import let_accounts_through

STOCK = {"port": ["22"], "permitrootlogin": ["without-password"], "passwordauthentication": ["yes"]}


def effective_core(root: Path) -> dict[str, list[str]]:
    effective = effective_sshd(root)
    return {k: effective[k] for k in STOCK}


def test_no_sudo_user_blocks_the_guard_and_root_keeps_its_way_in(tmp_path: Path, start_agent: StartAgent) -> None:
    root = make_root(tmp_path / "root", admin=None)
    before = tree_snapshot(root / "etc/ssh")
    agent = start_agent(root)
    blocked = agent.wait_event("remediation-blocked")
    assert "no way to get root over SSH" in blocked["message"]
    assert any("no non-root account with sudo rights" in r for r in blocked["reasons"])
    assert blocked["held"] == ["PasswordAuthentication no", "PermitRootLogin no"]
    status = agent.ctl("status")
    assert status.returncode == 2 and "blocked" in status.stdout and "no way to get root" in status.stdout
    assert "ssh: PermitRootLogin no held:" in status.stdout and "adduser" in status.stdout
    # only the agent's own drop-in, pinning what is already in force; sshd_config and root's way in untouched
    after = tree_snapshot(root / "etc/ssh")
    dropin = str(root / "etc/ssh/sshd_config.d/00-vps-agent.conf")
    assert {k: v for k, v in after.items() if k != dropin} == before
    assert b"PermitRootLogin" not in after[dropin][0] and b"PasswordAuthentication yes" in after[dropin][0]
    assert effective_core(root) == {**STOCK, "port": ["2222"]}  # the port needs no admin (no move: sshd is not running)
    check = agent.ctl("check", "--json")
    assert check.returncode == 2 and json.loads(check.stdout)["controls"][0]["status"] == "blocked"
    time.sleep(1.5)
    agent.ctl("converge", "ssh")
    assert sum(e["event"]["action"] == "remediation-blocked" for e in agent.events()) == 1  # once, not per re-check


def test_blocked_guard_heals_once_an_admin_with_a_key_appears(tmp_path: Path, start_agent: StartAgent) -> None:
    root = make_root(tmp_path / "root", admin=None)
    agent = start_agent(root)
    agent.wait_event("remediation-blocked")
    mark = agent.mark()
    with (root / "etc/passwd").open("a") as handle:
        handle.write("ops:x:1001:1001::/home/ops:/bin/bash\n")
    with (root / "etc/group").open("a") as handle:
        handle.write("ops:x:1001:\n")
    (root / "etc/sudoers.d/ops").write_text("ops ALL=(ALL) NOPASSWD: ALL\n")
    keys = root / "home/ops/.ssh/authorized_keys"
    keys.parent.mkdir(parents=True)
    keys.write_bytes(client_key())
    agent.wait_event("drift-reverted", mark)
    assert effective_sshd(root)["permitrootlogin"] == ["no"]


def test_the_admin_the_accounts_guard_creates_lets_root_login_go_off_at_once(
    tmp_path: Path, start_agent: StartAgent
) -> None:
    """A root-only VPS whose config asks for an admin with a key: the SSH guard judges again as soon as the
    accounts guard has made it, not at its next periodic look minutes later; fail2ban converges once, after."""
    key = client_key().decode().strip()
    config = f"ssh: {{port: 2222}}\naccounts:\n  admin_user: ops\n  create_admin: true\n  admin_keys: ['{key}']\n"
    root = make_root(tmp_path / "root", admin=None, config=config)
    let_accounts_through(root)
    agent = start_agent(root)
    # useradd and the first heals of every guard: on a loaded machine this can take more than 10 s
    wait_for(lambda: agent.status()["accounts"]["status"] in ("healed", "compliant"), 30, "ops to be created")
    assert (root / "home/ops/.ssh/authorized_keys").read_text().strip() == key
    # at once, the SSH guard says what ops still lacks: the agent sets no password, so sudo needs one (or NOPASSWD)
    wait_for(lambda: "ops has a key but no usable password for sudo" in agent.ctl("status").stdout, 5, "ops judged")
    assert effective_sshd(root)["permitrootlogin"] == ["without-password"]
    (root / "etc/sudoers.d/ops").write_text("ops ALL=(ALL) NOPASSWD: ALL\n")
    wait_for(lambda: effective_sshd(root)["permitrootlogin"] == ["no"], 5, "PermitRootLogin no once ops can sudo")
    ssh = agent.status()["ssh"]
    assert ssh["status"] == "pending" and [h["setting"] for h in ssh["held"]] == ["PasswordAuthentication no"], ssh
    assert [e["control"] for e in agent.events() if e["event"]["action"] == "drift-reverted"].count("fail2ban") == 1


def test_a_config_sshd_t_rejects_is_rolled_back_and_the_old_state_kept(tmp_path: Path, start_agent: StartAgent) -> None:
    # AddressFamily inet is valid alone, but with a cloud-init drop-in listening on ::1 sshd -t refuses it.
    config = "ssh:\n  port: 2222\n  options:\n    AddressFamily: inet\n"
    root = make_root(tmp_path / "root", config=config)
    (root / "etc/ssh/sshd_config.d/10-cloud-init.conf").write_text("ListenAddress ::1\n")
    before = tree_snapshot(root / "etc/ssh")
    agent = start_agent(root)
    failed = agent.wait_event("remediation-failed")
    assert "sshd -T" in failed["message"] and "bad addr or host: ::1" in failed["message"]
    assert failed["restored"] and failed["backup"]
    time.sleep(1.0)
    # its own rollback must not look like new drift: one attempt, not a fail/rollback loop
    assert [e["event"]["action"] for e in agent.events()].count("remediation-failed") == 1
    assert tree_snapshot(root / "etc/ssh") == before
    assert effective_core(root) == STOCK
    assert agent.ctl("status").returncode == 2


def test_a_setting_sshd_refuses_outright_writes_nothing(tmp_path: Path, start_agent: StartAgent) -> None:
    root = make_root(tmp_path / "root", config="ssh:\n  options:\n    MaxAuthTries: lots\n")
    before = tree_snapshot(root / "etc/ssh")
    agent = start_agent(root)
    failed = agent.wait_event("remediation-failed")
    assert "MaxAuthTries" in failed["message"] or "lots" in failed["message"]
    assert tree_snapshot(root / "etc/ssh") == before


def test_garbage_written_into_the_agents_own_dropin_is_rewritten(fake_root: Path, start_agent: StartAgent) -> None:
    agent = start_agent(fake_root)
    dropin = fake_root / "etc/ssh/sshd_config.d/00-vps-agent.conf"
    mark = agent.mark()
    dropin.write_bytes(b"\xff\xfe not a directive\n")
    agent.wait_event("drift-reverted", mark)
    assert "PermitRootLogin no" in dropin.read_text()
    assert effective_sshd(fake_root)["permitrootlogin"] == ["no"]


def test_binary_garbage_in_sshd_config_is_reported_and_left_for_the_admin(
    fake_root: Path, start_agent: StartAgent
) -> None:
    agent = start_agent(fake_root)
    main = fake_root / "etc/ssh/sshd_config"
    garbage = main.read_bytes() + b"\x00\xff\xfeGARBAGE\x01\n"
    mark = agent.mark()
    main.write_bytes(garbage)
    event = agent.wait_event("observe-failed", mark)
    assert "/etc/ssh/sshd_config" in event["message"] and "line 123" in event["message"]
    assert main.read_bytes() == garbage  # nothing lost: the admin's file is untouched
    assert agent.alive()
    assert agent.ctl("status").returncode == 2
    mark = agent.mark()
    main.write_bytes(garbage.replace(b"\x00\xff\xfeGARBAGE\x01\n", b"PermitRootLogin yes\n"))
    agent.wait_event("drift-reverted", mark)
    assert effective_sshd(fake_root)["permitrootlogin"] == ["no"]


def test_a_10_mb_sshd_config_is_refused_and_kept(fake_root: Path, start_agent: StartAgent) -> None:
    agent = start_agent(fake_root)
    main = fake_root / "etc/ssh/sshd_config"
    huge = main.read_bytes() + b"# filler line to make the file very large\n" * 250_000
    assert len(huge) > 10_000_000
    digest = hashlib.sha256(huge).hexdigest()
    mark = agent.mark()
    main.write_bytes(huge)
    event = agent.wait_event("observe-failed", mark)
    assert "over the 1048576-byte limit" in event["message"]
    assert hashlib.sha256(main.read_bytes()).hexdigest() == digest
    assert agent.alive() and agent.ctl("status").returncode == 2


def test_a_symlink_planted_at_the_dropin_path_is_replaced_never_followed(
    fake_root: Path, start_agent: StartAgent
) -> None:
    agent = start_agent(fake_root)
    victim = fake_root.parent / "victim-shadow"
    victim.write_text("root:$6$secret:19000::::::\n")
    dropin = fake_root / "etc/ssh/sshd_config.d/00-vps-agent.conf"
    mark = agent.mark()
    dropin.unlink()
    os.symlink(victim, dropin)
    agent.wait_event("drift-reverted", mark)
    assert victim.read_text() == "root:$6$secret:19000::::::\n"
    wait_for(lambda: not dropin.is_symlink(), what="the link replaced by a regular file")
    assert "PermitRootLogin no" in dropin.read_text()


def test_malformed_yaml_on_reload_is_rejected_and_the_old_config_stays(
    fake_root: Path, start_agent: StartAgent
) -> None:
    agent = start_agent(fake_root)
    config = fake_root / "etc/vps-agent/config.yaml"
    config.write_text("ssh:\n  port: [2222\n")
    result = agent.ctl("reload")
    assert result.returncode == 2 and "config.yaml:3:1: invalid YAML" in result.stderr and "(line 2)" in result.stderr
    rejected = agent.wait_event("config-rejected", control=None)
    assert "invalid YAML" in rejected["message"]
    status = json.loads(agent.ctl("status", "--json").stdout)
    assert "config.yaml:3" in status["config"]["error"]
    mark = agent.mark()
    (fake_root / "etc/ssh/sshd_config.d/00-vps-agent.conf").unlink()
    agent.wait_event("drift-reverted", mark)
    assert effective_sshd(fake_root)["port"] == ["2222"]  # still the old config's port


def test_start_with_a_broken_config_uses_the_last_good_one(fake_root: Path, start_agent: StartAgent) -> None:
    agent = start_agent(fake_root)
    assert agent.stop() == 0
    (fake_root / "etc/vps-agent/config.yaml").write_text("ssh:\n  port: 70000\n")
    agent = start_agent(fake_root)
    rejected = agent.wait_event("config-rejected", control=None)
    assert "ssh.port" in rejected["message"] and "70000" in rejected["message"]
    assert effective_sshd(fake_root)["port"] == ["2222"]


def test_start_with_a_broken_config_and_no_last_good_one_exits_2(fake_root: Path, start_agent: StartAgent) -> None:
    (fake_root / "etc/vps-agent/config.yaml").write_text("ssh:\n  prot: 22\n")
    agent = start_agent(fake_root, ready=False)
    assert agent.process.wait(20) == 2
    assert "config.yaml:2:3: ssh.prot" in agent.output() and "did you mean 'port'?" in agent.output()
    shutil.rmtree(fake_root / "var/lib/vps-agent", ignore_errors=True)

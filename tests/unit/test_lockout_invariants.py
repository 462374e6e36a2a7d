"""Who can still get root over SSH after the change: the SSH guard holds back, setting by setting, what would
lock the admin out, and applies the rest."""

from __future__ import annotations

import os
from pathlib import Path

from agent.accounts import AccessPolicy, read_facts, ways_to_root
from agent.config import parse_config
from agent.controls.base import NEEDS_CHANGE, WAITS_FOR_PROOF, Held
from agent.controls.ssh.control import SshdControl
from agent.controls.ssh.keylogins import CONFIRMED, KeyProof, proofs_from
from agent.paths import SystemRoot
from agent.system.journal import SshdLogin
from tests.fakeroot import make_root
from tests.guards import NO_SSH, ssh_guard
from tests.unit import fake_sshd
from tests.unit.conftest import DeclaredCommands

KEYS_ONLY = AccessPolicy("no", False, True, [".ssh/authorized_keys"])
PASSWORDS_TOO = AccessPolicy("no", True, True, [".ssh/authorized_keys"])


def ways(root: Path, policy: AccessPolicy = KEYS_ONLY) -> tuple[list[str], list[str]]:
    system = SystemRoot.at(root)
    return ways_to_root(system, read_facts(system), policy)


def test_sudo_admin_with_a_key_is_a_way_in(fake_root: Path) -> None:
    found, _ = ways(fake_root)
    assert found == ["admin (sudo) with a key in /home/admin/.ssh/authorized_keys"]


def test_no_sudo_user_means_no_way_in(tmp_path: Path) -> None:
    root = make_root(tmp_path / "r", admin=None)
    found, problems = ways(root)
    assert found == []
    assert "no non-root account with sudo rights" in problems[0]


def test_sudo_user_without_a_key_has_no_way_in_when_passwords_go_off(tmp_path: Path) -> None:
    root = make_root(tmp_path / "r", admin_key=False)
    assert ways(root)[0] == []
    assert ways(root, PASSWORDS_TOO)[0] == ["admin (sudo) with a password"]


def test_key_with_locked_password_needs_nopasswd_to_use_sudo(fake_root: Path) -> None:
    shadow = fake_root / "etc/shadow"
    shadow.write_text(shadow.read_text().replace("admin:$y$", "admin:!$y$"))
    found, problems = ways(fake_root)
    assert found == [] and "no usable password for sudo" in problems[0]
    (fake_root / "etc/sudoers.d/admin").write_text("admin ALL=(ALL) NOPASSWD: ALL\n")
    assert ways(fake_root)[0] != []


def test_nologin_shell_expired_account_and_denyusers_are_barriers(fake_root: Path) -> None:
    passwd = fake_root / "etc/passwd"
    original = passwd.read_text()
    passwd.write_text(original.replace("/home/admin:/bin/bash", "/home/admin:/usr/sbin/nologin"))
    assert ways(fake_root)[0] == []
    passwd.write_text(original)
    policy = AccessPolicy("no", False, True, [".ssh/authorized_keys"], deny_users=["adm*"])
    assert "DenyUsers" in ways(fake_root, policy)[1][0]
    policy = AccessPolicy("no", False, True, [".ssh/authorized_keys"], allow_users=["alice@10.0.0.*"])
    assert "AllowUsers" in ways(fake_root, policy)[1][0]
    shadow = fake_root / "etc/shadow"
    shadow.write_text(shadow.read_text().replace(":19000:0:99999:7:::\n", ":19000:0:99999:7::1:\n"))
    assert "expired" in ways(fake_root)[1][0]


def test_group_writable_authorized_keys_is_refused_like_strictmodes_does(fake_root: Path) -> None:
    os.chmod(fake_root / "home/admin/.ssh/authorized_keys", 0o664)
    assert ways(fake_root)[0] == []


def test_root_key_counts_only_while_root_may_log_in(fake_root: Path, tmp_path: Path) -> None:
    root = make_root(tmp_path / "r", admin=None)
    keys = root / "root/.ssh/authorized_keys"
    keys.parent.mkdir(parents=True)
    keys.write_bytes((fake_root / "home/admin/.ssh/authorized_keys").read_bytes())
    assert ways(root, AccessPolicy("prohibit-password", False, True, [".ssh/authorized_keys"]))[0]
    assert ways(root, KEYS_ONLY)[0] == []


def _held(root: SystemRoot, config: str = "ssh: {port: 2222}") -> tuple[SshdControl, Held | None]:
    control = ssh_guard(root)
    desired = control.desired(parse_config(config), NO_SSH)
    gate = control.preconditions(control.observe(desired), desired)
    assert gate is None or isinstance(gate, Held)
    return control, gate


def _settings(gate: Held) -> dict[str, str]:
    return dict(gate.desired.settings)


def test_a_proven_key_admin_lets_every_setting_apply(tmp_path: Path, commands: DeclaredCommands) -> None:
    root = SystemRoot.at(make_root(tmp_path / "r"))
    fake_sshd.install(commands, root)
    assert _held(root)[1] is None


def test_passwords_stay_on_until_the_key_admin_has_logged_in_with_the_key(
    tmp_path: Path, commands: DeclaredCommands
) -> None:
    root = SystemRoot.at(make_root(tmp_path / "r", key_proven=False))
    fake_sshd.install(commands, root)
    control, gate = _held(root)
    assert gate is not None and not gate.blocked
    [held] = gate.settings
    assert held.setting == "PasswordAuthentication no" and held.needs == WAITS_FOR_PROOF
    assert "until admin logs in with a key" in held.reason and "ssh -p 2222 admin@" in held.unblock
    assert _settings(gate) == {"Port": "2222", "PermitRootLogin": "no", "PasswordAuthentication": "yes"}
    assert control.keylogins.awaiting_with_keys == {"admin"}


def test_a_password_only_admin_gets_root_login_off_and_keeps_passwords(
    tmp_path: Path, commands: DeclaredCommands
) -> None:
    root = SystemRoot.at(make_root(tmp_path / "r", admin_key=False))
    fake_sshd.install(commands, root)
    control, gate = _held(root)
    assert gate is not None and not gate.blocked
    [held] = gate.settings
    assert held.setting == "PasswordAuthentication no"
    assert held.unblock.startswith("ssh-copy-id -p 2222 admin@") and held.unblock.endswith("then log in once")
    assert _settings(gate)["PermitRootLogin"] == "no" and _settings(gate)["PasswordAuthentication"] == "yes"
    assert control.keylogins.awaiting == {"admin"} and control.keylogins.awaiting_with_keys == set()


def test_a_root_only_vps_is_blocked_and_root_login_is_left_as_it_is(tmp_path: Path, commands: DeclaredCommands) -> None:
    root = SystemRoot.at(make_root(tmp_path / "r", admin=None))
    fake_sshd.install(commands, root)
    _, gate = _held(root)
    assert gate is not None and gate.blocked
    assert [h.setting for h in gate.settings] == ["PasswordAuthentication no", "PermitRootLogin no"]
    assert all(h.needs == NEEDS_CHANGE for h in gate.settings)
    assert "no way to get root over SSH" in gate.settings[1].reason and "adduser" in gate.settings[1].unblock
    assert _settings(gate) == {"Port": "2222", "PasswordAuthentication": "yes"}  # PermitRootLogin: sshd's own


def test_a_proof_whose_key_was_removed_is_forgotten(tmp_path: Path, commands: DeclaredCommands) -> None:
    root = SystemRoot.at(make_root(tmp_path / "r"))
    fake_sshd.install(commands, root)
    (root.prefix / "home/admin/.ssh/authorized_keys").write_text("")
    control, gate = _held(root)
    assert gate is not None and gate.settings[0].setting == "PasswordAuthentication no"
    assert control.keylogins.proof("admin") is None
    assert [p.user for p in control.keylogins.take_forgotten()] == ["admin"]
    assert not (root.prefix / "var/lib/vps-agent/key-logins.json").exists()


def test_a_proof_by_another_key_does_not_count(tmp_path: Path, commands: DeclaredCommands) -> None:
    root = SystemRoot.at(make_root(tmp_path / "r", key_proven=False))
    fake_sshd.install(commands, root)
    ssh_guard(root).keylogins.record(KeyProof("admin", "a login", 1.0, "SHA256:someotherkey"))
    assert _held(root)[1] is not None


def test_a_proof_by_confirm_stands_while_the_admin_has_a_key(tmp_path: Path, commands: DeclaredCommands) -> None:
    root = SystemRoot.at(make_root(tmp_path / "r", key_proven=False))
    fake_sshd.install(commands, root)
    ssh_guard(root).keylogins.record(KeyProof("admin", CONFIRMED, 1.0))
    assert _held(root)[1] is None


def test_an_allowusers_that_leaves_the_admin_out_is_held_and_the_rest_applies(
    tmp_path: Path, commands: DeclaredCommands
) -> None:
    root = SystemRoot.at(make_root(tmp_path / "r"))
    fake_sshd.install(commands, root)
    _, gate = _held(root, "ssh: {port: 2222, options: {AllowUsers: bob, MaxAuthTries: 4}}")
    assert gate is not None and gate.blocked
    [held] = gate.settings
    assert held.setting == "AllowUsers bob" and held.needs == NEEDS_CHANGE
    assert "AllowUsers does not list it" in held.reason and "ssh.options AllowUsers" in held.unblock
    assert _settings(gate) == {
        "Port": "2222",
        "PermitRootLogin": "no",
        "PasswordAuthentication": "no",
        "MaxAuthTries": "4",
    }


def test_an_allowusers_that_lists_the_admin_applies(tmp_path: Path, commands: DeclaredCommands) -> None:
    root = SystemRoot.at(make_root(tmp_path / "r"))
    fake_sshd.install(commands, root)
    assert _held(root, "ssh: {options: {AllowUsers: admin}}")[1] is None


def test_authenticationmethods_publickey_is_held_for_a_password_only_admin(
    tmp_path: Path, commands: DeclaredCommands
) -> None:
    root = SystemRoot.at(make_root(tmp_path / "r", admin_key=False))
    fake_sshd.install(commands, root)
    _, gate = _held(root, "ssh: {options: {AuthenticationMethods: publickey}}")
    assert gate is not None
    assert [h.setting for h in gate.settings] == ["AuthenticationMethods publickey", "PasswordAuthentication no"]
    assert "AuthenticationMethods" not in _settings(gate) and _settings(gate)["PermitRootLogin"] == "no"


def test_no_check_when_the_login_rules_do_not_change(tmp_path: Path, commands: DeclaredCommands) -> None:
    root = SystemRoot.at(make_root(tmp_path / "r", admin=None))
    fake_sshd.install(commands, root)
    (root.prefix / "etc/ssh/sshd_config.d/10-admin.conf").write_text("PermitRootLogin no\nPasswordAuthentication no\n")
    control = ssh_guard(root)
    desired = control.desired(parse_config("ssh: {port: 2222}"), NO_SSH)
    assert control.preconditions(control.observe(desired), desired) is None


def test_a_port_move_in_flight_keeps_both_ports_while_passwords_wait(
    tmp_path: Path, commands: DeclaredCommands
) -> None:
    root = SystemRoot.at(make_root(tmp_path / "r", admin_key=False))
    fake_sshd.install(commands, root)
    control = ssh_guard(root)
    config = parse_config("ssh: {port: 2222}")
    control.moves.on_config(config, frozenset({22}), 1000.0)
    gate = control.preconditions(control.observe(control.desired(config, NO_SSH)), control.desired(config, NO_SSH))
    assert isinstance(gate, Held)
    ports = [value for keyword, value in gate.desired.settings if keyword == "Port"]
    assert ports == ["22", "2222"] and "Port 22\nPort 2222\n" in gate.desired.dropin_text


def _login(user: str, method: str = "publickey", key: str = "ED25519 SHA256:abc", at: float = 1.0) -> SshdLogin:
    return SshdLogin(user, method, "10.213.0.2", 40000, None, 99, at, key)


def test_only_an_awaited_admins_publickey_login_with_a_key_is_a_proof_the_newest_wins() -> None:
    logins = [
        _login("admin", at=1.0),
        _login("admin", key="ED25519 SHA256:newer", at=2.0),
        _login("admin", method="password", key="", at=3.0),
        _login("bob", at=4.0),  # not awaited: not a sudo admin the guard waits for
        _login("carol", key="", at=5.0),  # sshd named no key
    ]
    [proof] = proofs_from(logins, {"admin", "carol"})
    assert proof.user == "admin" and proof.fingerprint == "SHA256:newer" and proof.at == 2.0
    assert "publickey login from 10.213.0.2 port 40000" in proof.how

"""Who can still get root over SSH after the change: the SSH guard blocks rather than lock anyone out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.accounts import AccessPolicy, read_facts, ways_to_root
from agent.config import parse_config
from agent.controls.sshd import SshdControl
from agent.paths import SystemRoot
from tests.fakeroot import make_root
from tests.unit import fake_sshd

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


@pytest.mark.parametrize("admin", [None, "admin"])
def test_guard_blocks_only_without_a_way_in(tmp_path: Path, commands: object, admin: str | None) -> None:
    root = SystemRoot.at(make_root(tmp_path / "r", admin=admin))
    fake_sshd.install(commands, root)
    control = SshdControl(root)
    observed = control.observe()
    blocked = control.preconditions(observed, control.desired(parse_config("ssh: {port: 2222}")))
    if admin is None:
        assert blocked is not None and "no way to get root over SSH" in str(blocked)
    else:
        assert blocked is None


def test_no_check_when_the_login_rules_do_not_change(tmp_path: Path, commands: object) -> None:
    root = SystemRoot.at(make_root(tmp_path / "r", admin=None))
    fake_sshd.install(commands, root)
    (root.prefix / "etc/ssh/sshd_config.d/10-admin.conf").write_text("PermitRootLogin no\nPasswordAuthentication no\n")
    control = SshdControl(root)
    desired = control.desired(parse_config("ssh: {port: 2222}"))
    assert control.preconditions(control.observe(), desired) is None

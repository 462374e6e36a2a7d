"""OpenSSH 9.8+ (Debian 13) refuses a source address for a while after failed logins (PerSourcePenalties): the
addresses of live SSH sessions of sudo admins are exempt while those sessions last, and following logins and
logouts is never a tamper to count towards flapping."""

from __future__ import annotations

import os
from pathlib import Path

from agent.config import parse_config
from agent.paths import SystemRoot
from tests.fakeroot import make_root
from tests.guards import NO_SSH, ssh_guard
from tests.unit import fake_sshd
from tests.unit.conftest import DeclaredCommands

CONFIG = parse_config("ssh: {port: 2222}")


def session(root: Path, name: str, user: str, host: str) -> None:
    path = root / "run/systemd/sessions" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"UID=1000\nUSER={user}\nACTIVE=1\nSTATE=active\nREMOTE=1\nSERVICE=sshd\nREMOTE_HOST={host}\n")
    os.chown(path, 0, 0)


def test_a_live_admin_sessions_address_is_exempt_while_it_lasts(tmp_path: Path, commands: DeclaredCommands) -> None:
    root = SystemRoot.at(make_root(tmp_path / "r"))
    fake_sshd.install(commands, root, penalties=True)
    control = ssh_guard(root)
    assert "PerSourcePenaltyExemptList" not in dict(control.desired(CONFIG, NO_SSH).settings)  # nobody logged in
    session(root.prefix, "3", "admin", "192.0.2.7")
    session(root.prefix, "4", "admin", "2001:db8::5")
    session(root.prefix, "5", "nobody", "198.51.100.9")  # not an admin: penalised like anyone
    session(root.prefix, "6", "admin", "evil.example; Port 1")  # no address: never written into sshd's config
    desired = control.desired(CONFIG, NO_SSH)
    assert dict(desired.settings)["PerSourcePenaltyExemptList"] == "192.0.2.7,2001:db8::5"
    assert "PerSourcePenaltyExemptList 192.0.2.7,2001:db8::5\n" in desired.dropin_text
    # the drop-in as it was before the logins: a heal that only follows them is never damped
    (root.prefix / "run/systemd/sessions/3").unlink()
    (root.prefix / "run/systemd/sessions/4").unlink()
    plain = control.desired(CONFIG, NO_SSH)
    root.sshd_dropin.write_text(plain.dropin_text)
    drift = control.diff(control.observe(desired), desired)
    assert drift is not None and drift.items and all(not item.damped for item in drift.items), drift


def test_a_tampered_dropin_is_damped_as_ever_with_an_exempt_list(tmp_path: Path, commands: DeclaredCommands) -> None:
    root = SystemRoot.at(make_root(tmp_path / "r"))
    fake_sshd.install(commands, root, penalties=True)
    control = ssh_guard(root)
    session(root.prefix, "3", "admin", "192.0.2.7")
    desired = control.desired(CONFIG, NO_SSH)
    root.sshd_dropin.write_text(desired.dropin_text.replace("PermitRootLogin no", "PermitRootLogin yes"))
    drift = control.diff(control.observe(desired), desired)
    assert drift is not None and any(item.damped for item in drift.items)


def test_no_exempt_list_where_sshd_has_no_penalties_or_the_admin_sets_one(
    tmp_path: Path, commands: DeclaredCommands
) -> None:
    root = SystemRoot.at(make_root(tmp_path / "r"))
    session(root.prefix, "3", "admin", "192.0.2.7")
    fake_sshd.install(commands, root, penalties=False)  # OpenSSH 9.2, Debian 12
    assert "PerSourcePenaltyExemptList" not in dict(ssh_guard(root).desired(CONFIG, NO_SSH).settings)
    fake_sshd.install(commands, root, penalties=True)
    own = parse_config("ssh:\n  port: 2222\n  options:\n    PerSourcePenaltyExemptList: 10.0.0.0/8\n")
    assert dict(ssh_guard(root).desired(own, NO_SSH).settings)["PerSourcePenaltyExemptList"] == "10.0.0.0/8"

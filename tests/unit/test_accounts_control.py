"""The accounts guard on a fake root: what it reports (and never changes), and the one thing it does.

Every case starts from tests/fakeroot.py (root with a password, a sudo admin with a key) and edits
passwd, shadow, group, sudoers or modes the way an admin, an installer or an intruder would."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agent import accounts
from agent.config import Config, parse_config
from agent.controls.accounts import AccountsControl
from agent.controls.base import FINDING, FIX, WARNING, DriftItem
from agent.engine import transaction as tx
from agent.events import null_events
from agent.paths import SystemRoot
from agent.system import backups, fs
from tests.fakeroot import client_key, make_root
from tests.guards import NO_SSH
from tests.unit.conftest import DeclaredCommands

DAY = 86400
# root's shadow entry in tests/fakeroot.py, up to its password hash
ROOT_HASH = "root:$y$j9T$abcdefghijklmnopqrstuv$0123456789012345678901234567890123456789012:"


def today() -> int:
    return int(time.time() // DAY)


def key() -> str:
    return client_key().decode().strip()


def create_config(name: str = "deploy") -> Config:
    return parse_config(f'accounts:\n  admin_user: {name}\n  create_admin: true\n  admin_keys: ["{key()}"]\n')


def converge(root: Path, config: Config | None = None, heal: bool = True) -> tx.Outcome:
    ctx = tx.TransactionContext(null_events(), backups.BackupStore(root.parent / "backups", 5), fs.EchoFilter())
    return tx.converge(
        AccountsControl(SystemRoot.at(root)), config or Config(), ctx, ssh=NO_SSH, reason="test", heal=heal
    )


def items(outcome: tx.Outcome) -> list[DriftItem]:
    return list(outcome.drift.items) if outcome.drift else []


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def set_root_password_day(root: Path, day: int) -> None:
    shadow = root / "etc/shadow"
    lines = shadow.read_text().splitlines()
    fields = lines[0].split(":")
    fields[2] = str(day)
    lines[0] = ":".join(fields)
    shadow.write_text("\n".join(lines) + "\n")


def installed_on(root: Path, day: int) -> None:
    """The system's install markers all date from `day` (noon UTC)."""
    stamp = day * DAY + DAY / 2
    for path in [root / "etc/machine-id", *(root / "etc/ssh").glob("ssh_host_*_key")]:
        path.touch()
        os.utime(path, (stamp, stamp))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    made = make_root(tmp_path / "root")
    installed_on(made, today() - 30)
    set_root_password_day(made, today() - 10)  # changed after the install: nothing to say
    return made


# the baseline ---------------------------------------------------------------------------------------------


def test_the_stock_fake_root_is_compliant_and_says_who_gets_in(root: Path, commands: DeclaredCommands) -> None:
    outcome = converge(root, parse_config("accounts: {admin_user: admin}"))
    assert outcome.status == tx.COMPLIANT and items(outcome) == []
    assert outcome.facts["admin_user"] == "admin (sudo) with a key in /home/admin/.ssh/authorized_keys"
    assert outcome.facts["uid0"] == "root" and outcome.facts["root_password"] == "usable"
    assert outcome.facts["installed"].endswith("(/etc/machine-id)") or "ssh_host" in outcome.facts["installed"]
    assert commands.calls == []


# root-equivalents: reported, never changed ----------------------------------------------------------------


def test_root_with_an_empty_password_is_a_finding_the_agent_never_fixes(root: Path, commands: DeclaredCommands) -> None:
    set_root_password_day(root, today())
    shadow = root / "etc/shadow"
    edit(shadow, ROOT_HASH, "root::")
    before = shadow.read_bytes()
    outcome = converge(root)
    assert outcome.status == tx.DRIFTED
    [finding] = items(outcome)
    assert (finding.kind, finding.where, finding.what) == (FINDING, "/etc/shadow", "root password")
    assert "passwd root" in finding.advice and "passwd -l root" in finding.advice
    assert "1 finding(s) for the admin to fix" in outcome.detail
    assert outcome.facts["root_password"] == "empty"
    assert shadow.read_bytes() == before and commands.calls == []


def test_an_empty_password_field_in_passwd_without_shadow_entry_counts_as_empty(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    edit(root / "etc/passwd", "root:x:0:0", "root::0:0")
    edit(root / "etc/shadow", "root:$y$", "nobody-else:$y$")
    assert accounts.read_facts(SystemRoot.at(root)).accounts["root"].password == "empty"


def test_a_second_uid0_account_is_a_finding_naming_its_line(root: Path, commands: DeclaredCommands) -> None:
    with (root / "etc/passwd").open("a") as passwd:
        passwd.write("toor:x:0:0:backdoor:/root:/bin/bash\n")
    passwd_before = (root / "etc/passwd").read_bytes()
    outcome = converge(root)
    assert outcome.status == tx.DRIFTED
    [finding] = items(outcome)
    assert (finding.kind, finding.where, finding.line) == (FINDING, "/etc/passwd", 5)
    assert finding.what == "uid-0 account toor" and "compromised" in finding.advice and "vipw" in finding.advice
    assert outcome.facts["uid0"] == "root,toor"
    assert (root / "etc/passwd").read_bytes() == passwd_before and commands.calls == []


def test_a_repeated_name_with_uid_0_is_found_though_getpwnam_sees_the_first(root: Path) -> None:
    with (root / "etc/passwd").open("a") as passwd:
        passwd.write("admin:x:0:0::/root:/bin/bash\n")
    facts = accounts.read_facts(SystemRoot.at(root))
    assert facts.accounts["admin"].uid == 1000  # like getpwnam: the first entry counts
    assert [(a.name, a.line) for a in facts.uid0] == [("root", 1), ("admin", 5)]
    assert [i.what for i in items(converge(root))] == ["uid-0 account admin"]


@pytest.mark.parametrize("locked", ["*", "!", "!$y$j9T$old", "!*"])
def test_a_locked_root_password_is_fine_however_old(root: Path, locked: str) -> None:
    edit(root / "etc/shadow", ROOT_HASH, f"root:{locked}:")
    set_root_password_day(root, today() - 400)  # set before the install (an image's)
    outcome = converge(root)
    assert outcome.status == tx.COMPLIANT and items(outcome) == []
    assert outcome.facts["root_password"] == "locked"


@pytest.mark.parametrize("changed", [-3, 0])
def test_root_password_unchanged_since_install_is_a_warning_that_leaves_status_compliant(
    root: Path, changed: int
) -> None:
    install_day = today() - 30
    set_root_password_day(root, install_day + changed)  # before or on the install day
    outcome = converge(root)
    assert outcome.status == tx.COMPLIANT
    [warning] = items(outcome)
    assert (warning.kind, warning.what) == (WARNING, "root password")
    assert "unchanged since the system was installed" in warning.actual
    assert outcome.facts["root_password"] == "unchanged since install"
    assert "root password is unchanged" in outcome.facts["warning"]


def test_root_password_changed_the_day_after_install_is_no_warning(root: Path) -> None:
    set_root_password_day(root, today() - 29)
    assert items(converge(root)) == []


def test_the_install_date_is_the_oldest_of_machine_id_host_keys_and_installer_logs(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    system = SystemRoot.at(root)
    installed_on(root, 20000)
    key_file = root / "etc/ssh/ssh_host_ed25519_key"
    os.utime(key_file, (30000 * DAY, 30000 * DAY))  # host keys made again later do not move it
    assert accounts.install_date(system) == accounts.InstallDate(20000, "/etc/machine-id")
    logs = root / "var/log/installer"
    logs.mkdir(parents=True)
    os.utime(logs, (19999 * DAY, 19999 * DAY))
    assert accounts.install_date(system) == accounts.InstallDate(19999, "/var/log/installer")
    (root / "etc/machine-id").unlink()
    for path in [logs, *root.glob("etc/ssh/ssh_host_*")]:
        path.rmdir() if path.is_dir() else path.unlink()
    assert accounts.install_date(system) is None
    assert "installed" not in converge(root).facts


# login files others can write -----------------------------------------------------------------------------


def test_a_world_writable_home_is_a_finding(root: Path, commands: DeclaredCommands) -> None:
    os.chmod(root / "home/admin", 0o777)
    outcome = converge(root)
    assert outcome.status == tx.DRIFTED
    [finding] = items(outcome)
    assert (finding.kind, finding.where) == (FINDING, "/home/admin")
    assert finding.actual == "is writable by its group and others (mode 0777)"
    assert "chmod go-w /home/admin" in finding.advice
    assert oct(os.stat(root / "home/admin").st_mode & 0o777) == "0o777" and commands.calls == []


def test_a_group_writable_authorized_keys_is_a_finding(root: Path) -> None:
    os.chmod(root / "home/admin/.ssh/authorized_keys", 0o660)
    [finding] = items(converge(root))
    assert finding.where == "/home/admin/.ssh/authorized_keys" and "its group (mode 0660)" in finding.actual


def test_an_authorized_keys_owned_by_another_user_is_a_finding(root: Path) -> None:
    os.chown(root / "home/admin/.ssh/authorized_keys", 4242, 4242)
    [finding] = items(converge(root))
    assert finding.actual == "is owned by uid 4242, not admin or root"


def test_accounts_that_cannot_log_in_are_not_judged_by_their_home(root: Path) -> None:
    edit(root / "etc/passwd", "daemon:x:1:1:daemon:/usr/sbin:", "daemon:x:1:1:daemon:/tmp/daemon-home:")
    home = root / "tmp/daemon-home"
    home.mkdir(parents=True)
    os.chmod(home, 0o777)
    assert items(converge(root)) == []


# the configured admin ---------------------------------------------------------------------------------------


def test_a_missing_admin_without_create_admin_is_a_finding_saying_how_to_fix_it(
    root: Path, commands: DeclaredCommands
) -> None:
    outcome = converge(root, parse_config("accounts: {admin_user: deploy}"))
    assert outcome.status == tx.DRIFTED
    [finding] = items(outcome)
    assert (finding.kind, finding.what, finding.actual) == (FINDING, "admin user deploy", "does not exist")
    assert "accounts.create_admin: true" in finding.advice and "adduser deploy" in finding.advice
    assert outcome.facts["admin_user"] == "deploy: missing" and commands.calls == []


def test_a_missing_admin_with_create_admin_is_planned_with_useradd_group_sudo_and_its_key(root: Path) -> None:
    outcome = converge(root, create_config(), heal=False)
    assert outcome.status == tx.DRIFTED
    [fix] = items(outcome)
    assert (fix.kind, fix.what, fix.actual) == (FIX, "admin user deploy", "missing")
    assert outcome.changes is not None
    argv = [command.apply.argv for command in outcome.changes.commands]
    assert argv[0] == (
        "useradd", "--root", str(root), "--create-home", "--home-dir", "/home/deploy", "--shell", "/bin/bash",
        "--groups", "sudo", "--uid", "1001", "--user-group", "--comment", "admin created by vps-agent", "deploy",
    )  # fmt: skip
    home = str(root / "home/deploy")
    # the keys are written as the new account (uid and gid chosen above), never as root by path
    as_deploy = ("setpriv", "--reuid=1001", "--regid=1001", "--clear-groups", "--")
    staged = f"{home}/.ssh/.authorized_keys.vps-agent-tmp-new"
    assert argv[1:] == [
        (*as_deploy, "install", "-d", "-m", "0700", f"{home}/.ssh"),
        (*as_deploy, "tee", staged),
        (*as_deploy, "chmod", "0600", staged),
        (*as_deploy, "mv", "-f", "-T", staged, f"{home}/.ssh/authorized_keys"),
    ]
    assert outcome.changes.commands[2].apply.input_text == key() + "\n"
    assert all(command.undo is None for command in outcome.changes.commands)  # accounts are never deleted
    assert not any("pass" in word for line in argv for word in line)  # no password is ever set
    assert f"+{key()}" in outcome.changes.diff


def test_create_admin_refuses_a_home_that_already_exists(root: Path) -> None:
    (root / "home/deploy").mkdir()
    outcome = converge(root, create_config(), heal=False)
    [finding] = items(outcome)
    assert finding.kind == FINDING and "/home/deploy already exists" in finding.advice
    assert outcome.changes is None  # findings only: nothing is planned


def test_an_existing_admin_outside_group_sudo_is_added_with_usermod(root: Path, commands: DeclaredCommands) -> None:
    edit(root / "etc/group", "sudo:x:27:admin", "sudo:x:27:")
    report = converge(root, parse_config("accounts: {admin_user: admin}"))
    assert [(i.kind, i.actual) for i in items(report)] == [(FINDING, "is not in group sudo")]
    keys = (root / "home/admin/.ssh/authorized_keys").read_text().strip()
    config = parse_config(f'accounts: {{admin_user: admin, create_admin: true, admin_keys: ["{keys}"]}}')
    outcome = converge(root, config, heal=False)
    assert outcome.changes is not None
    assert [c.apply.argv for c in outcome.changes.commands] == [
        ("usermod", "--root", str(root), "--append", "--groups", "sudo", "admin")
    ]


def test_a_key_missing_from_an_existing_admin_is_added_keeping_the_others(root: Path) -> None:
    (root / "home/admin/.ssh/authorized_keys").write_text("# mine\nssh-ed25519 AAAAother other@laptop")
    outcome = converge(root, create_config("admin"), heal=False)
    assert outcome.changes is not None
    [install] = [c for c in outcome.changes.commands if "tee" in c.apply.argv]
    assert install.apply.argv[:5] == ("setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "--")
    assert install.apply.input_text == f"# mine\nssh-ed25519 AAAAother other@laptop\n{key()}\n"


def test_the_agent_never_writes_keys_into_a_home_others_can_write(root: Path) -> None:
    (root / "home/admin/.ssh/authorized_keys").unlink()
    os.chmod(root / "home/admin/.ssh", 0o777)
    outcome = converge(root, create_config("admin"), heal=False)
    assert outcome.changes is None  # findings only: nothing is planned
    lacks = [i for i in items(outcome) if i.actual.startswith("lacks")]
    assert lacks and lacks[0].kind == FINDING and "writable by others" in lacks[0].advice


def snapshot(directory: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Owner, group, mode and bytes of everything below directory (symlinks not followed)."""
    found = {}
    for path in [directory, *sorted(directory.rglob("*"))]:
        info = os.lstat(path)
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        found[str(path)] = (info.st_uid, info.st_gid, info.st_mode, data)
    return found


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A root-owned directory outside the home, as /etc would be: what a racing admin points ~/.ssh at."""
    made = tmp_path / "victim"
    made.mkdir(mode=0o755)
    (made / "marker").write_text("root owns this\n")
    return made


def test_a_symlinked_ssh_dir_is_refused_with_a_finding_and_nothing_outside_the_home_changes(
    root: Path, victim: Path, commands: DeclaredCommands
) -> None:
    ssh = root / "home/admin/.ssh"
    os.rename(ssh, root / "home/admin/.ssh.real")
    os.symlink(victim, ssh)
    os.lchown(ssh, 1000, 1000)  # the admin made it
    before = snapshot(victim)
    outcome = converge(root, create_config("admin"))
    assert outcome.changes is None and commands.calls == []  # findings only: nothing is planned or run
    [lacks] = [i for i in items(outcome) if i.actual.startswith("lacks")]
    assert lacks.kind == FINDING and lacks.where == "/home/admin/.ssh/authorized_keys"
    assert f"/home/admin/.ssh is a symlink to '{victim}'" in lacks.advice and "not following it" in lacks.advice
    assert snapshot(victim) == before


def test_a_symlinked_authorized_keys_is_refused_and_never_read_or_written(
    root: Path, victim: Path, commands: DeclaredCommands
) -> None:
    keys = root / "home/admin/.ssh/authorized_keys"
    keys.unlink()
    os.symlink(victim / "marker", keys)
    before = snapshot(victim)
    outcome = converge(root, create_config("admin"))
    assert outcome.changes is None and commands.calls == []
    [lacks] = [i for i in items(outcome) if i.actual.startswith("lacks")]
    assert f"/home/admin/.ssh/authorized_keys is a symlink to '{victim}/marker'" in lacks.advice
    assert snapshot(victim) == before


def test_a_root_file_hard_linked_into_the_admins_ssh_dir_is_not_read(root: Path, victim: Path) -> None:
    keys = root / "home/admin/.ssh/authorized_keys"
    keys.unlink()
    os.link(victim / "marker", keys)  # what fs.protected_hardlinks=0 would let the admin do
    outcome = converge(root, create_config("admin"), heal=False)
    [lacks] = [i for i in items(outcome) if i.actual.startswith("lacks")]
    assert "has 2 hard links; not reading it" in lacks.advice and outcome.changes is None


def test_keys_are_not_added_where_root_owns_the_ssh_dir_the_admin_would_write_as(root: Path) -> None:
    os.chown(root / "home/admin/.ssh", 0, 0)
    (root / "home/admin/.ssh/authorized_keys").write_text("# mine\n")
    outcome = converge(root, create_config("admin"), heal=False)
    [lacks] = [i for i in items(outcome) if i.actual.startswith("lacks")]
    assert "/home/admin/.ssh is owned by root, and the agent adds keys as admin" in lacks.advice
    assert outcome.changes is None


def test_a_home_reached_through_roots_own_symlink_is_read_and_written_as_usual(root: Path) -> None:
    # /home -> srv/home, made by root in a directory only root can change: safe to follow
    (root / "srv").mkdir()
    os.rename(root / "home", root / "srv/home")
    os.symlink("srv/home", root / "home")
    (root / "home/admin/.ssh/authorized_keys").write_text("# mine\n")
    outcome = converge(root, create_config("admin"), heal=False)
    assert outcome.changes is not None
    [install] = [c for c in outcome.changes.commands if "tee" in c.apply.argv]
    assert install.apply.input_text == f"# mine\n{key()}\n"


def test_a_new_admin_gets_ids_above_every_uid_and_gid_in_login_defs_range(root: Path) -> None:
    with (root / "etc/group").open("a") as group:
        group.write("web:x:1003:\nnfs:x:70000:\n")  # a group above the range does not count
    (root / "etc/login.defs").write_text("# shadow\nUID_MIN 1000\nUID_MAX 60000\nGID_MIN  1000\n")
    outcome = converge(root, create_config(), heal=False)
    assert outcome.changes is not None
    useradd = outcome.changes.commands[0].apply.argv
    assert useradd[useradd.index("--uid") + 1] == "1004" and "--user-group" in useradd
    assert all("--reuid=1004" in c.apply.argv for c in outcome.changes.commands[1:])
    (root / "etc/login.defs").write_text("UID_MIN 1000\nUID_MAX 1003\n")
    [finding] = items(converge(root, create_config(), heal=False))
    assert finding.kind == FINDING and "no uid and gid are free" in finding.advice


def test_an_admin_without_a_key_or_a_password_has_no_way_in_a_finding(root: Path) -> None:
    (root / "home/admin/.ssh/authorized_keys").unlink()
    edit(root / "etc/shadow", "admin:$y$", "admin:!$y$")
    [finding] = items(converge(root, parse_config("accounts: {admin_user: admin}")))
    assert finding.kind == FINDING and finding.actual.startswith("has no way in: needs a key in")


def test_an_admin_who_logs_in_with_a_password_only_is_a_warning_that_passwords_stay_on(root: Path) -> None:
    (root / "home/admin/.ssh/authorized_keys").unlink()
    outcome = converge(root, parse_config("accounts: {admin_user: admin}"))
    [warning] = items(outcome)
    assert warning.kind == WARNING and warning.actual == "logs in with a password only"
    assert "passwords stay on until a key login is proven: ssh-copy-id admin@" in warning.advice
    assert outcome.status == tx.COMPLIANT


def test_an_admin_with_a_nologin_shell_cannot_log_in(root: Path) -> None:
    edit(root / "etc/passwd", "/home/admin:/bin/bash", "/home/admin:/usr/sbin/nologin")
    [finding] = items(converge(root, parse_config("accounts: {admin_user: admin}")))
    assert "cannot log in: its shell /usr/sbin/nologin allows no login" in finding.actual
    assert "chsh" in finding.advice


def test_an_admin_in_group_sudo_without_a_sudoers_rule_is_told_to_install_sudo(root: Path) -> None:
    (root / "etc/sudoers").unlink()
    found = items(converge(root, parse_config("accounts: {admin_user: admin}")))
    assert found[0].actual == "is in group sudo but has no sudo rights" and "apt-get install sudo" in found[0].advice


def test_an_admin_with_a_key_but_no_password_for_sudo_is_only_a_warning(root: Path) -> None:
    edit(root / "etc/shadow", "admin:$y$", "admin:!$y$")
    outcome = converge(root, parse_config("accounts: {admin_user: admin}"))
    assert outcome.status == tx.COMPLIANT
    [warning] = items(outcome)
    assert warning.kind == WARNING and "passwd admin" in warning.advice
    (root / "etc/sudoers.d/admin").write_text("admin ALL=(ALL) NOPASSWD: ALL\n")
    assert items(converge(root, parse_config("accounts: {admin_user: admin}"))) == []


def test_the_guard_watches_the_account_files_and_the_admins_ssh_directories(root: Path) -> None:
    specs = AccountsControl(SystemRoot.at(root)).watches(Config())
    watched = {(str(s.directory), s.names) for s in specs}
    assert (str(root / "etc"), accounts.ACCOUNT_FILES) in watched
    assert (str(root / "home/admin/.ssh"), None) in watched


def test_a_second_uid0_account_is_never_a_way_in_for_the_ssh_guard(root: Path) -> None:
    with (root / "etc/passwd").open("a") as passwd:
        passwd.write("toor:x:0:0::/home/admin:/bin/bash\n")  # admin's keys, uid 0
    edit(root / "etc/group", "sudo:x:27:admin", "sudo:x:27:admin,toor")
    system = SystemRoot.at(root)
    policy = accounts.AccessPolicy("no", False, True, [".ssh/authorized_keys"])
    ways, _ = accounts.ways_to_root(system, accounts.read_facts(system), policy)
    assert ways == ["admin (sudo) with a key in /home/admin/.ssh/authorized_keys"]


def test_only_what_is_a_fix_is_planned(root: Path) -> None:
    edit(root / "etc/group", "sudo:x:27:admin", "sudo:x:27:")
    os.chmod(root / "home/admin/.ssh", 0o775)  # keys are reported there, never written
    outcome = converge(root, create_config("admin"), heal=False)
    assert outcome.changes is not None
    assert [c.apply.argv[0] for c in outcome.changes.commands] == ["usermod"]
    assert {(i.kind, i.where) for i in items(outcome)} >= {
        (FIX, "/etc/group"),
        (FINDING, "/home/admin/.ssh/authorized_keys"),
        (FINDING, "/home/admin/.ssh"),
    }

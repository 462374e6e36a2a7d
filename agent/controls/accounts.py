"""The accounts guard: the admin named in the config can log in and become root; root's equals reported.

It judges accounts with agent/accounts.py, the functions behind the SSH guard's lockout invariants, so
the two guards never disagree about who can get in. The one change it ever makes is creating the
configured admin (`accounts.create_admin`): the account (useradd, group sudo) and the configured public
keys in its ~/.ssh/authorized_keys, adding and never removing. Everything else it finds (root with an
empty password, another uid-0 account, login files others can write) is reported with why it matters
and how to fix it, never "fixed": changing root's password or deleting an account is the admin's
call, and a wrong guess can lock the admin out or destroy an intruder's traces.
"""

from __future__ import annotations

import datetime
import os
import shlex
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent import accounts
from agent.config import Config, SshConfig
from agent.controls.base import (
    FINDING,
    WARNING,
    Blocked,
    Changes,
    CommandChange,
    Control,
    Drift,
    DriftItem,
    Invocation,
    ReloadOutcome,
    WatchSpec,
    unified,
)
from agent.paths import SystemRoot
from agent.system import apt, fs

SUDO_GROUP = "sudo"
SHELL = "/bin/bash"
COMMENT = "admin created by vps-agent"  # the GECOS field: no commas, no colons
KEYS_FILE = ".ssh/authorized_keys"  # where the agent adds the configured keys, under the admin's home
DEFAULT_KEYS_FILES = (".ssh/authorized_keys", ".ssh/authorized_keys2")  # Debian's AuthorizedKeysFile
TIMEOUT = 60.0
# where findings point, as the guarded system names them
_SYSTEM = SystemRoot()
PASSWD, SHADOW, GROUP, SUDOERS = (str(p) for p in (_SYSTEM.passwd, _SYSTEM.shadow, _SYSTEM.group, _SYSTEM.sudoers))


@dataclass(frozen=True)
class AccountsDesired:
    admin_user: str | None
    create_admin: bool
    admin_keys: tuple[str, ...]
    policy: accounts.AccessPolicy  # how sshd lets admins in under the SSH baseline the agent keeps


@dataclass(frozen=True)
class UnsafePath:
    """A home directory or authorized_keys (or a directory between them) others can write or own."""

    account: str
    path: str  # as the system names it
    why: str  # "is writable by others (mode 0777)"


@dataclass(frozen=True)
class AdminState:
    name: str
    account: accounts.Account | None  # None: it does not exist
    access: accounts.Access | None
    in_sudo_group: bool
    home: str  # its home (for a missing one: where useradd will make it)
    home_exists: bool
    keys_text: str | None  # ~/.ssh/authorized_keys as it is now (None: missing or unreadable)
    keys_unwritable: str | None  # why the agent will not write its keys there (None: it may)
    new_id: int | None = None  # a missing admin: the uid and gid useradd is to give it (None: none free)


@dataclass(frozen=True)
class AccountsObserved:
    facts: accounts.AccountsFacts
    installed: accounts.InstallDate | None
    unsafe: tuple[UnsafePath, ...]
    admin: AdminState | None  # None: no accounts.admin_user in the config
    sudo_group: bool  # the group exists


class AccountsControl(Control):
    name = "accounts"

    def __init__(self, root: SystemRoot) -> None:
        super().__init__(root)
        # observe() looks at the admin the config names: the transaction calls desired() first
        self._desired = self.desired(Config())

    def enabled(self, config: Config) -> bool:
        return config.accounts.enabled

    def watches(self, config: Config) -> Sequence[WatchSpec]:
        return accounts.watches(self.root)

    # desired / observe --------------------------------------------------------------------------------

    def desired(self, config: Config) -> AccountsDesired:
        wanted = config.accounts
        self._desired = AccountsDesired(
            wanted.admin_user, wanted.create_admin, wanted.admin_keys, baseline_policy(config.ssh)
        )
        return self._desired

    def observe(self) -> AccountsObserved:
        facts = accounts.read_facts(self.root)
        policy = self._desired.policy
        admin = self._admin_state(facts, self._desired.admin_user) if self._desired.admin_user else None
        return AccountsObserved(
            facts,
            accounts.install_date(self.root),
            tuple(self._unsafe_paths(facts, policy)),
            admin,
            SUDO_GROUP in facts.group_members,
        )

    def _admin_state(self, facts: accounts.AccountsFacts, name: str) -> AdminState:
        account = facts.accounts.get(name)
        if account is None:
            home = f"{self.root.system_name(self.root.home_base)}/{name}"
            exists = os.path.lexists(self.root.path(home))
            new_id = accounts.free_account_id(self.root, facts)
            return AdminState(name, None, None, False, home, exists, None, None, new_id)
        found = accounts.access(self.root, account, facts, self._desired.policy)
        in_group = name in facts.group_members.get(SUDO_GROUP, frozenset())
        home_exists = self.root.path(account.home).is_dir() if account.home.startswith("/") else False
        text, unwritable = self._keys_file(account)
        return AdminState(name, account, found, in_group, account.home, home_exists, text, unwritable)

    def _keys_file(self, account: accounts.Account) -> tuple[str | None, str | None]:
        """~/.ssh/authorized_keys of account, and why the agent may not add keys to it (None: it may).

        Read as root one directory at a time from /, never through a symlink the account could have put
        there (fs.open_directory); written as the account itself (plan), so only where the account owns
        ~/.ssh and the file: what the agent writes there, the account could have written."""
        if not account.home.startswith("/"):
            return None, f"its home {account.home!r} is not an absolute path"
        home = self.root.path(account.home)
        ssh_dir, keys = home / ".ssh", home / KEYS_FILE
        owners = fs.Owners(frozenset({account.uid}))
        name = self.root.system_name
        try:
            with fs.opened_directory(home, owners) as fd:
                home_owner = os.fstat(fd).st_uid
        except FileNotFoundError:
            return None, f"its home {account.home} does not exist"
        except fs.UnsafeFile as exc:
            return None, f"{name(exc.path)} {exc.why}"
        except OSError as exc:
            return None, f"{account.home}: {exc.strerror or exc}"
        try:
            with fs.opened_directory(ssh_dir, owners) as fd:
                ssh_owner = os.fstat(fd).st_uid
                found = fs.read_regular_at(fd, keys.name, keys)
        except FileNotFoundError:
            if home_owner != account.uid:
                return None, f"{account.home} is owned by root: {account.name} cannot make ~/.ssh there"
            return None, None  # the agent makes ~/.ssh, as the account, in its own home
        except fs.UnsafeFile as exc:
            return None, f"{name(exc.path)} {exc.why}"
        except OSError as exc:
            return None, f"{name(ssh_dir)}: {exc.strerror or exc}"
        text = None
        if found is not None:
            data, info = found
            if info.st_uid not in (0, account.uid):
                return None, f"{name(keys)} is owned by uid {info.st_uid}, not {account.name} or root"
            if info.st_uid != account.uid and info.st_nlink > 1:
                return None, f"{name(keys)} is root's and has {info.st_nlink} hard links; not reading it"
            if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                return None, f"{name(keys)} is writable by others (mode {stat.S_IMODE(info.st_mode):04o})"
            try:
                text = fs.decode_text(data, keys)
            except fs.UnsafeFile as exc:
                return None, f"{name(exc.path)} {exc.why}"
        # the agent writes as the account: where root owns ~/.ssh or the file, the account cannot
        if ssh_owner != account.uid:
            return text, f"{name(ssh_dir)} is owned by root, and the agent adds keys as {account.name}"
        if found is not None and found[1].st_uid != account.uid:
            return text, f"{name(keys)} is owned by root, and the agent adds keys as {account.name}"
        return text, None

    def _unsafe_paths(self, facts: accounts.AccountsFacts, policy: accounts.AccessPolicy) -> list[UnsafePath]:
        """The homes and authorized_keys of accounts that can log in, where others can write or own them."""
        found: dict[str, UnsafePath] = {}
        for account in facts.accounts.values():
            if account.shell in accounts.NOLOGIN_SHELLS or not account.home.startswith("/"):
                continue
            candidates = [self.root.path(account.home)]
            candidates += [self.root.path(p) for p in accounts.authorized_keys_files(account, policy)]
            for path in candidates:
                if not path.exists():
                    continue
                problem = accounts.strict_modes_problem(self.root, path, account)
                if problem is not None:
                    system = self.root.system_name(problem[0])
                    found.setdefault(system, UnsafePath(account.name, system, problem[1]))
        return sorted(found.values(), key=lambda u: u.path)

    # diff ---------------------------------------------------------------------------------------------

    def diff(self, observed: AccountsObserved, desired: AccountsDesired) -> Drift | None:
        items = assess(observed, desired)
        if not items:
            return None
        text = ""
        admin = observed.admin
        keys = admin_fixes(observed, admin, desired).keys if admin is not None else ()
        if admin is not None and keys:
            before = admin.keys_text or ""
            text = unified(before, _with_keys(before, keys), f"{admin.home}/{KEYS_FILE}")
        return Drift(self.name, tuple(items), text)

    # plan ---------------------------------------------------------------------------------------------

    def plan(self, observed: AccountsObserved, desired: AccountsDesired, drift: Drift) -> Changes:
        admin = observed.admin
        if admin is None or not drift.fixable:
            return Changes()
        fixes = admin_fixes(observed, admin, desired)
        commands: list[CommandChange] = []
        notes: list[str] = []
        root_option = () if self.root.is_host else ("--root", str(self.root.prefix))
        if fixes.create:
            assert admin.new_id is not None  # _cannot_create says so otherwise
            options = ["--create-home", "--home-dir", admin.home, "--shell", SHELL, "--groups", SUDO_GROUP]
            # the ids chosen here, so the keys below are written as the new account before it exists
            options += ["--uid", str(admin.new_id), "--user-group", "--comment", COMMENT, admin.name]
            commands.append(self._command(["useradd", *root_option, *options], f"create the admin {admin.name}"))
            notes.append(f"create user {admin.name} (useradd {shlex.join(options)})")
        if fixes.join_sudo:
            options = ["--append", "--groups", SUDO_GROUP, admin.name]
            commands.append(self._command(["usermod", *root_option, *options], f"add {admin.name} to {SUDO_GROUP}"))
            notes.append(f"add {admin.name} to group {SUDO_GROUP} (usermod {shlex.join(options)})")
        if fixes.keys:
            if admin.account is not None:
                ids = (admin.account.uid, admin.account.gid)
            else:
                assert admin.new_id is not None
                ids = (admin.new_id, admin.new_id)
            home = self.root.path(admin.home)
            ssh_dir, keys_path = home / ".ssh", home / KEYS_FILE
            staged = ssh_dir / f".{keys_path.name}{fs.TMP_MARKER}new"
            content = _with_keys(admin.keys_text or "", fixes.keys)
            # Every step runs as the admin (never as root by path in a home it owns: it could swap ~/.ssh
            # for a symlink between two steps), so it can only change what the admin could. tee reads the
            # keys from the pipe itself (the admin may not reopen root's pipe as /dev/stdin); the rename
            # puts the whole file in place at once.
            steps = (
                (["install", "-d", "-m", "0700", str(ssh_dir)], "make ~/.ssh", None),
                (["tee", str(staged)], "write the keys beside authorized_keys", content),
                (["chmod", "0600", str(staged)], "make them the admin's only", None),
                (["mv", "-f", "-T", str(staged), str(keys_path)], "put them in place", None),
            )
            for argv, reason, stdin in steps:
                commands.append(self._command(_as_account(ids, argv), f"{reason} (as {admin.name})", stdin))
            where = f"{admin.home}/{KEYS_FILE}"
            notes.append(
                f"add {len(fixes.keys)} key(s) of accounts.admin_keys to {where} as {admin.name} (0600, ~/.ssh 0700)"
            )
        return Changes((), tuple(notes), drift.diff, tuple(commands))

    def _command(self, argv: list[str], reason: str, input_text: str | None = None) -> CommandChange:
        """A command that changes accounts. vps-agent.service keeps /etc and /home read-only for the agent
        itself, so on a host run by systemd it runs as a transient unit of its own (like apt); never undone:
        the agent does not delete accounts or keys."""
        step = apt.Step(tuple(argv), (), TIMEOUT)
        if apt.via_systemd(self.root):
            step = apt.outside_sandbox(step)
        return CommandChange(Invocation(step.argv, input_text, step.env, step.timeout), None, reason=reason)

    # preconditions / validate / reload ------------------------------------------------------------------

    def preconditions(self, observed: AccountsObserved, desired: AccountsDesired) -> Blocked | None:
        return None  # adding an admin, a group membership or a key takes no way in away

    def validate(self, changes: Changes) -> None:
        return None  # the transaction reads the account files again: the admin must now be there

    def reload(self) -> ReloadOutcome:
        return ReloadOutcome(True, "nothing to reload: sshd, sudo and login read the account files at each login")

    def facts(self, observed: AccountsObserved) -> dict[str, Any]:
        return describe(observed, self._desired)


def _as_account(ids: tuple[int, int], argv: list[str]) -> list[str]:
    """argv run with the account's uid and primary gid and no other groups (util-linux setpriv)."""
    uid, gid = ids
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *argv]


def baseline_policy(ssh: SshConfig) -> accounts.AccessPolicy:
    """How sshd lets a user in under the baseline the SSH guard keeps (the config's ssh section). The SSH
    guard's own lockout check reads the effective policy from `sshd -T` instead."""
    options = {keyword.lower(): value.split() for keyword, value in ssh.options}
    return accounts.AccessPolicy(
        permit_root_login=ssh.permit_root_login,
        password_authentication=ssh.password_authentication,
        pubkey_authentication=options.get("pubkeyauthentication", ["yes"])[0].lower() == "yes",
        authorized_keys_files=options.get("authorizedkeysfile", list(DEFAULT_KEYS_FILES)),
        allow_users=options.get("allowusers", []),
        deny_users=options.get("denyusers", []),
        allow_groups=options.get("allowgroups", []),
        deny_groups=options.get("denygroups", []),
    )


# judging ------------------------------------------------------------------------------------------------


def assess(observed: AccountsObserved, desired: AccountsDesired) -> list[DriftItem]:
    """Every way the accounts differ from what a careful admin keeps: what the agent fixes (the configured
    admin, with accounts.create_admin), and what it only reports (findings and warnings)."""
    items: list[DriftItem] = []
    if observed.admin is not None:
        items += _admin_items(observed, observed.admin, desired)
    for account in observed.facts.uid0:
        if account.name != "root":
            items.append(
                DriftItem(
                    f"uid-0 account {account.name}",
                    PASSWD,
                    "only root with uid 0",
                    "is root under another name",
                    account.line,
                    FINDING,
                    "if you did not add it, treat the host as compromised; otherwise remove it with vipw and "
                    "vipw -s (userdel refuses: root's processes are its processes) and give admins sudo",
                )
            )
    root = observed.facts.accounts.get("root")
    if root is not None and root.password == "empty":
        items.append(
            DriftItem(
                "root password",
                SHADOW,
                "set or locked",
                "is empty",
                None,
                FINDING,
                "anyone at the console, or with su, is root without one: set one (passwd root) or lock it "
                "(passwd -l root; sudo users are not affected)",
            )
        )
    elif _root_password_from_install(observed):
        installed = observed.installed
        assert installed is not None
        items.append(
            DriftItem(
                "root password",
                SHADOW,
                "changed since, or locked",
                f"is unchanged since the system was installed ({_date(installed.day)}, dated by {installed.source})",
                None,
                WARNING,
                "whoever installed it (the provider, its panel, an image) may know it: change it (passwd root), or "
                "lock it (passwd -l root) if you use sudo; a change on the install day itself looks the same "
                "(shadow counts days)",
            )
        )
    for unsafe in observed.unsafe:
        items.append(
            DriftItem(
                f"login files of {unsafe.account}",
                unsafe.path,
                f"owned by {unsafe.account} or root and writable only by the owner",
                unsafe.why,
                None,
                FINDING,
                f"whoever can write there can plant keys or a .profile and log in or run code as {unsafe.account}, "
                f"and sshd's StrictModes ignores keys below it: chmod go-w {unsafe.path} (or chown it back)",
            )
        )
    return items


@dataclass(frozen=True)
class AdminFixes:
    """What the agent does for the configured admin (with accounts.create_admin): all of it adds."""

    create: bool = False  # useradd, with group sudo and a home
    join_sudo: bool = False  # usermod --append --groups sudo
    keys: tuple[str, ...] = ()  # the keys of accounts.admin_keys to add to its authorized_keys


def admin_fixes(observed: AccountsObserved, admin: AdminState, desired: AccountsDesired) -> AdminFixes:
    if not desired.create_admin:
        return AdminFixes()
    if admin.account is None or admin.access is None:
        if _cannot_create(observed, admin, desired) is not None:
            return AdminFixes()
        return AdminFixes(create=True, keys=desired.admin_keys)
    join = admin.access.sudo is None and not admin.in_sudo_group and observed.sudo_group
    writable = admin.keys_unwritable is None and admin.access.barrier is None
    return AdminFixes(join_sudo=join, keys=_missing_keys(admin, desired) if writable else ())


def _admin_items(observed: AccountsObserved, admin: AdminState, desired: AccountsDesired) -> list[DriftItem]:
    name = admin.name
    fixes = admin_fixes(observed, admin, desired)
    if admin.account is None or admin.access is None:
        if fixes.create:
            return [DriftItem(f"admin user {name}", PASSWD, "present (accounts.create_admin)", "missing")]
        advice = (
            f"accounts.create_admin is true, but {_cannot_create(observed, admin, desired)}"
            if desired.create_admin
            else f"let the agent create it (accounts.create_admin: true and accounts.admin_keys), or: adduser {name} "
            f"&& usermod -aG sudo {name}"
        )
        return [_admin_finding(name, PASSWD, "does not exist", advice)]
    items: list[DriftItem] = []
    found = admin.access
    if fixes.join_sudo:
        items.append(DriftItem(f"admin user {name}", GROUP, f"in group {SUDO_GROUP}", "not in it"))
    elif found.sudo is None:
        if not observed.sudo_group:
            advice = "is sudo installed (apt-get install sudo)?"
            items.append(_admin_finding(name, GROUP, f"has no sudo rights and there is no group {SUDO_GROUP}", advice))
        elif admin.in_sudo_group:
            advice = f"group {SUDO_GROUP} is in no sudoers rule: is sudo installed (apt-get install sudo)?"
            items.append(_admin_finding(name, SUDOERS, f"is in group {SUDO_GROUP} but has no sudo rights", advice))
        else:
            advice = f"usermod -aG {SUDO_GROUP} {name} (or set accounts.create_admin: true)"
            items.append(_admin_finding(name, GROUP, f"is not in group {SUDO_GROUP}", advice))
    keys_path = f"{admin.home}/{KEYS_FILE}"
    missing = _missing_keys(admin, desired)
    if fixes.keys:
        items.append(DriftItem(f"admin user {name}", keys_path, "the keys of accounts.admin_keys", "missing"))
    elif missing:
        advice = f"the agent does not add accounts.admin_keys there: {admin.keys_unwritable or found.barrier}"
        items.append(_admin_finding(name, keys_path, f"lacks {len(missing)} key(s) of accounts.admin_keys", advice))
    if found.barrier:
        advice = _barrier_advice(name, found.barrier)
        items.append(_admin_finding(name, PASSWD, f"cannot log in: {found.barrier}", advice))
    elif not found.logs_in and not fixes.keys and admin.account.password == "usable":
        # the SSH guard keeps password logins on for it until a key login is proven (agent/keylogins.py)
        items.append(
            DriftItem(
                f"admin user {name}",
                keys_path,
                "a key it has logged in with",
                "logs in with a password only",
                None,
                WARNING,
                f"passwords stay on until a key login is proven: ssh-copy-id {name}@{socket.gethostname()}, then "
                "log in once with the key",
            )
        )
    elif not found.logs_in and not fixes.keys:
        needed = "a key in " + keys_path + (" or a password" if desired.policy.password_authentication else "")
        advice = "add one (or list it in accounts.admin_keys with accounts.create_admin: true)"
        items.append(_admin_finding(name, keys_path, f"has no way in: needs {needed}", advice))
    elif found.logs_in and found.sudo is not None and found.way is None:
        items.append(
            DriftItem(
                f"admin user {name}",
                SHADOW,
                "a password for sudo, or a NOPASSWD rule",
                "can log in but has no password for sudo to ask",
                None,
                WARNING,
                f"set one as root (passwd {name}); the agent never sets or takes passwords",
            )
        )
    return items


def _admin_finding(name: str, where: str, actual: str, advice: str) -> DriftItem:
    expected = "an account in group sudo that can log in (accounts.admin_user)"
    return DriftItem(f"admin user {name}", where, expected, actual, None, FINDING, advice)


def _barrier_advice(name: str, barrier: str) -> str:
    if "shell" in barrier:
        return f"give it a login shell (chsh -s {SHELL} {name})"
    if "expired" in barrier:
        return f"lift the expiry (chage -E -1 {name})"
    return "let it through sshd's AllowUsers/DenyUsers/AllowGroups/DenyGroups (ssh.options)"


def _cannot_create(observed: AccountsObserved, admin: AdminState, desired: AccountsDesired) -> str | None:
    if not desired.admin_keys:
        return "accounts.admin_keys is empty"
    if not observed.sudo_group:
        return f"there is no group {SUDO_GROUP} (is sudo installed? apt-get install sudo)"
    if admin.home_exists:
        return f"{admin.home} already exists: the agent does not make an account over someone else's files"
    if admin.new_id is None:
        return "no uid and gid are free together between UID_MIN/GID_MIN and UID_MAX/GID_MAX of login.defs"
    return None


def _missing_keys(admin: AdminState, desired: AccountsDesired) -> tuple[str, ...]:
    """The configured keys not yet in the admin's authorized_keys (compared by the key itself)."""
    if not desired.create_admin:
        return ()
    present = {
        word
        for line in (admin.keys_text or "").splitlines()
        if not line.lstrip().startswith("#")
        for word in line.split()
    }
    return tuple(key for key in desired.admin_keys if key.split()[1] not in present)


def _with_keys(text: str, keys: Sequence[str]) -> str:
    if text and not text.endswith("\n"):
        text += "\n"
    return text + "".join(f"{key}\n" for key in keys)


def _root_password_from_install(observed: AccountsObserved) -> bool:
    root = observed.facts.accounts.get("root")
    if root is None or root.password != "usable" or root.last_change is None or observed.installed is None:
        return False
    # 0 means "must change at next login": still the installer's
    return root.last_change <= observed.installed.day


def _date(day: int) -> str:
    return (datetime.date(1970, 1, 1) + datetime.timedelta(days=day)).isoformat()


def describe(observed: AccountsObserved, desired: AccountsDesired) -> dict[str, Any]:
    """The few facts `status` shows for the accounts guard."""
    facts: dict[str, Any] = {}
    admin = observed.admin
    if admin is not None:
        if admin.account is None or admin.access is None:
            facts["admin_user"] = f"{admin.name}: missing"
        else:
            facts["admin_user"] = admin.access.way or admin.access.problem or admin.name
    facts["uid0"] = ",".join(account.name for account in observed.facts.uid0) or "none"
    root = observed.facts.accounts.get("root")
    state = root.password if root is not None else "missing"
    if _root_password_from_install(observed):
        state = "unchanged since install"
    facts["root_password"] = state
    if observed.installed is not None:
        facts["installed"] = f"{_date(observed.installed.day)} ({observed.installed.source})"
    warnings = [item for item in assess(observed, desired) if item.kind == WARNING]
    if warnings:
        facts["warning"] = "; ".join(f"{item.what} {item.actual}" for item in warnings)
    return facts

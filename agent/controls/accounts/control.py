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

import os
import shlex
import stat
from collections.abc import Sequence
from typing import Any

from agent import accounts
from agent.config import Config
from agent.controls.accounts.assess import admin_fixes, as_account, assess, baseline_policy, describe, with_keys
from agent.controls.accounts.model import (
    COMMENT,
    KEYS_FILE,
    SHELL,
    SUDO_GROUP,
    TIMEOUT,
    AccountsDesired,
    AccountsObserved,
    AdminState,
    UnsafePath,
)
from agent.controls.base import (
    Blocked,
    Changes,
    CommandChange,
    Control,
    Drift,
    Invocation,
    Meta,
    ReloadOutcome,
    SshPorts,
    WatchSpec,
    unified,
)
from agent.paths import SystemRoot
from agent.system import apt, fs


class AccountsControl(Control[AccountsObserved, AccountsDesired]):
    name = "accounts"

    def __init__(self, root: SystemRoot) -> None:
        super().__init__(root)

    def meta(self, config: Config) -> Meta:
        return Meta.of(config.accounts)

    def watches(self, config: Config) -> Sequence[WatchSpec]:
        return accounts.watches(self.root)

    # desired / observe --------------------------------------------------------------------------------

    def desired(self, config: Config, ssh: SshPorts) -> AccountsDesired:
        wanted = config.accounts
        return AccountsDesired(wanted.admin_user, wanted.create_admin, wanted.admin_keys, baseline_policy(config.ssh))

    def observe(self, desired: AccountsDesired) -> AccountsObserved:
        """The accounts files, and the admin the config names."""
        facts = accounts.read_facts(self.root)
        policy = desired.policy
        admin = self._admin_state(facts, desired.admin_user, desired.policy) if desired.admin_user else None
        return AccountsObserved(
            facts,
            accounts.install_date(self.root),
            tuple(self._unsafe_paths(facts, policy)),
            admin,
            SUDO_GROUP in facts.group_members,
        )

    def _admin_state(self, facts: accounts.AccountsFacts, name: str, policy: accounts.AccessPolicy) -> AdminState:
        account = facts.accounts.get(name)
        if account is None:
            home = f"{self.root.system_name(self.root.home_base)}/{name}"
            exists = os.path.lexists(self.root.path(home))
            new_id = accounts.free_account_id(self.root, facts)
            return AdminState(name, None, None, False, home, exists, None, None, new_id)
        found = accounts.access(self.root, account, facts, policy)
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
            text = unified(before, with_keys(before, keys), f"{admin.home}/{KEYS_FILE}")
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
            content = with_keys(admin.keys_text or "", fixes.keys)
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
                commands.append(self._command(as_account(ids, argv), f"{reason} (as {admin.name})", stdin))
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

    def reload(self, changes: Changes) -> ReloadOutcome:
        return ReloadOutcome(True, "nothing to reload: sshd, sudo and login read the account files at each login")

    def facts(self, observed: AccountsObserved, desired: AccountsDesired) -> dict[str, Any]:
        return describe(observed, desired)

"""The accounts guard's judgement: findings about root's equals and the admin, the fixes it may make
(creating the configured admin, adding its keys), and the facts status shows."""

from __future__ import annotations

import datetime
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent import accounts
from agent.config import SshConfig
from agent.controls.accounts.model import (
    DEFAULT_KEYS_FILES,
    GROUP,
    KEYS_FILE,
    PASSWD,
    SHADOW,
    SHELL,
    SUDO_GROUP,
    SUDOERS,
    AccountsDesired,
    AccountsObserved,
    AdminState,
)
from agent.controls.base import (
    FINDING,
    WARNING,
    DriftItem,
)


def as_account(ids: tuple[int, int], argv: list[str]) -> list[str]:
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
        # the SSH guard keeps password logins on for it until a key login is proven (agent/controls/ssh/keylogins.py)
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


def with_keys(text: str, keys: Sequence[str]) -> str:
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

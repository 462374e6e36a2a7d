"""Who can still get root over SSH: the facts behind the SSH guard's lockout invariants.

Read from passwd, shadow, group, sudoers and authorized_keys under the SystemRoot. This is read-only;
the accounts guard (its own issue) builds on it.
"""

from __future__ import annotations

import datetime
import fnmatch
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.paths import SystemRoot
from agent.system import fs

NOLOGIN_SHELLS = frozenset({"/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false", ""})
KEY_TYPE = re.compile(r"(^|\s)(ssh-(ed25519|rsa|dss)|ecdsa-sha2-\S+|sk-\S+@openssh\.com)\s+[A-Za-z0-9+/=]{16,}")


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: str
    shell: str
    password: str  # "usable", "locked", "empty" or "unknown"
    expired: bool


@dataclass(frozen=True)
class SudoGrant:
    who: str  # "alice" or "%sudo"
    nopasswd: bool


@dataclass(frozen=True)
class AccountsFacts:
    accounts: Mapping[str, Account]
    group_members: Mapping[str, frozenset[str]]  # group name -> users (explicit members and primary)
    sudo_grants: tuple[SudoGrant, ...]


def read_facts(root: SystemRoot) -> AccountsFacts:
    passwd = fs.read_text(root.passwd, follow_symlinks=True) or ""
    shadow = _read_optional(root.shadow)
    group = fs.read_text(root.group, follow_symlinks=True) or ""
    shadow_by_user = {}
    for line in shadow.splitlines():
        fields = line.split(":")
        if len(fields) >= 2:
            shadow_by_user[fields[0]] = fields
    today = (datetime.date.today() - datetime.date(1970, 1, 1)).days
    accounts: dict[str, Account] = {}
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) < 7 or not fields[2].isdigit() or not fields[3].isdigit():
            continue
        entry = shadow_by_user.get(fields[0])
        password, expired = _password_state(fields[1], entry, today)
        accounts[fields[0]] = Account(
            fields[0], int(fields[2]), int(fields[3]), fields[5], fields[6], password, expired
        )
    members: dict[str, set[str]] = {}
    gid_to_group: dict[int, str] = {}
    for line in group.splitlines():
        fields = line.split(":")
        if len(fields) < 4 or not fields[2].isdigit():
            continue
        gid_to_group[int(fields[2])] = fields[0]
        members.setdefault(fields[0], set()).update(m for m in fields[3].split(",") if m)
    for account in accounts.values():
        primary = gid_to_group.get(account.gid)
        if primary:
            members.setdefault(primary, set()).add(account.name)
    return AccountsFacts(accounts, {g: frozenset(m) for g, m in members.items()}, tuple(_read_sudoers(root)))


def _read_optional(path: Path) -> str:
    try:
        return fs.read_text(path, follow_symlinks=True) or ""
    except (fs.UnsafeFile, PermissionError):
        return ""


def _password_state(passwd_field: str, shadow: list[str] | None, today: int) -> tuple[str, bool]:
    if shadow is None:
        hashed = passwd_field if passwd_field not in ("x", "*") else ""
        return ("usable" if hashed and not hashed.startswith("!") else "unknown"), False
    hashed = shadow[1]
    expired = len(shadow) > 7 and shadow[7].isdigit() and int(shadow[7]) <= today
    if hashed == "":
        return "empty", expired
    if hashed.startswith(("!", "*")):
        return "locked", expired
    return "usable", expired


def _read_sudoers(root: SystemRoot) -> list[SudoGrant]:
    grants: list[SudoGrant] = []
    pending = [root.sudoers]
    seen: set[Path] = set()
    while pending:
        path = pending.pop(0)
        if path in seen:
            continue
        seen.add(path)
        text = _read_optional(path)
        for raw in text.splitlines():
            line = raw.strip()
            include = re.match(r"^[#@]includedir\s+(\S+)", line)
            if include:
                directory = root.path(include.group(1))
                if directory.is_dir():
                    # sudo skips names with a dot or ending in ~ in an includedir
                    pending.extend(
                        directory / n for n in sorted(os.listdir(directory)) if "." not in n and not n.endswith("~")
                    )
                continue
            if not line or line.startswith("#") or line.startswith("Defaults"):
                continue
            rule = re.match(r"^(%?[A-Za-z0-9_.$-]+)\s+\S+\s*=\s*(.*)$", line)
            if rule and "ALL" in rule.group(2):
                grants.append(SudoGrant(rule.group(1), "NOPASSWD" in rule.group(2)))
    return grants


@dataclass(frozen=True)
class AccessPolicy:
    """The parts of the effective sshd config that decide who can log in, after the planned change."""

    permit_root_login: str  # yes | no | prohibit-password | without-password | forced-commands-only
    password_authentication: bool
    pubkey_authentication: bool
    authorized_keys_files: Sequence[str]
    allow_users: Sequence[str] = ()
    deny_users: Sequence[str] = ()
    allow_groups: Sequence[str] = ()
    deny_groups: Sequence[str] = ()


def ways_to_root(root: SystemRoot, facts: AccountsFacts, policy: AccessPolicy) -> tuple[list[str], list[str]]:
    """(ways an admin can still get root over SSH under policy, why each candidate cannot)."""
    ways: list[str] = []
    problems: list[str] = []
    for account in sorted(facts.accounts.values(), key=lambda a: a.uid):
        if account.uid == 0 and account.name == "root":
            _root_ways(root, account, facts, policy, ways, problems)
            continue
        grant = _sudo_grant(account, facts)
        if grant is None or account.uid == 0:
            continue
        why_not = _login_barrier(account, facts, policy)
        if why_not:
            problems.append(f"{account.name} has sudo rights but {why_not}")
            continue
        keys = _authorized_keys(root, account, policy) if policy.pubkey_authentication else []
        usable_password = account.password == "usable"
        if keys:
            if grant.nopasswd or usable_password:
                ways.append(f"{account.name} (sudo) with a key in {keys[0]}")
            else:
                problems.append(f"{account.name} has a key but no usable password for sudo and no NOPASSWD rule")
        elif policy.password_authentication and usable_password:
            ways.append(f"{account.name} (sudo) with a password")
        else:
            needed = "an authorized_keys entry" + (
                "" if not policy.password_authentication else " or a usable password"
            )
            problems.append(f"{account.name} has sudo rights but no way in: needs {needed}")
    if not any(not w.startswith("root") for w in ways) and not problems:
        problems.append("no non-root account with sudo rights exists (members of group sudo, or a sudoers rule)")
    return ways, problems


def _root_ways(
    root: SystemRoot, account: Account, facts: AccountsFacts, policy: AccessPolicy, ways: list[str], problems: list[str]
) -> None:
    if policy.permit_root_login == "no" or _login_barrier(account, facts, policy):
        return
    if policy.permit_root_login in ("yes", "prohibit-password", "without-password"):
        keys = _authorized_keys(root, account, policy) if policy.pubkey_authentication else []
        if keys:
            ways.append(f"root with a key in {keys[0]}")
            return
    if policy.permit_root_login == "yes" and policy.password_authentication and account.password == "usable":
        ways.append("root with a password")


def _sudo_grant(account: Account, facts: AccountsFacts) -> SudoGrant | None:
    best: SudoGrant | None = None
    for grant in facts.sudo_grants:
        if grant.who.startswith("%"):
            applies = account.name in facts.group_members.get(grant.who[1:], frozenset())
        else:
            applies = grant.who == account.name
        if applies and (best is None or grant.nopasswd):
            best = grant
    return best


def _login_barrier(account: Account, facts: AccountsFacts, policy: AccessPolicy) -> str | None:
    if account.shell in NOLOGIN_SHELLS:
        return f"its shell {account.shell or '(none)'} allows no login"
    if account.expired:
        return "the account has expired (shadow)"
    groups = {g for g, members in facts.group_members.items() if account.name in members}
    if any(_matches(account.name, p) for p in policy.deny_users):
        return "sshd's DenyUsers matches it"
    if policy.allow_users and not any(_matches(account.name, p) for p in policy.allow_users):
        return "sshd's AllowUsers does not list it"
    if any(fnmatch.fnmatchcase(g, p) for g in groups for p in policy.deny_groups):
        return "sshd's DenyGroups matches one of its groups"
    if policy.allow_groups and not any(fnmatch.fnmatchcase(g, p) for g in groups for p in policy.allow_groups):
        return "sshd's AllowGroups lists none of its groups"
    return None


def _matches(user: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(user, pattern.split("@", 1)[0])


def _authorized_keys(root: SystemRoot, account: Account, policy: AccessPolicy) -> list[str]:
    """authorized_keys files of account that hold a key sshd will accept (StrictModes ownership/modes)."""
    found = []
    for template in policy.authorized_keys_files:
        if template.lower() == "none":
            continue
        expanded = template.replace("%%", "\0").replace("%h", account.home).replace("%u", account.name)
        expanded = expanded.replace("%U", str(account.uid)).replace("\0", "%")
        system_path = expanded if expanded.startswith("/") else os.path.join(account.home, expanded)
        path = root.path(system_path)
        try:
            text = fs.read_text(path, follow_symlinks=True)
        except (fs.UnsafeFile, PermissionError):
            continue
        if text and any(KEY_TYPE.search(line) for line in text.splitlines() if not line.lstrip().startswith("#")):
            if _strict_modes_ok(root, path, account):
                found.append(system_path)
    return found


def _strict_modes_ok(root: SystemRoot, path: Path, account: Account) -> bool:
    """sshd's StrictModes refuses keys in files or directories others can write."""
    current = path
    home = root.path(account.home) if account.home.startswith("/") else None
    while True:
        try:
            info = os.stat(current)
        except OSError:
            return False
        if info.st_uid not in (0, account.uid) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return False
        if home is None or current == home or current == root.prefix or current.parent == current:
            return True
        current = current.parent

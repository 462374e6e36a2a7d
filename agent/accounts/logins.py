"""Who can log in over SSH and get root under a policy (the effective sshd settings after a planned
change): the lockout invariants' one judge, shared by the SSH, accounts and fail2ban guards."""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.accounts.facts import KEY_TYPE, NOLOGIN_SHELLS, Account, AccountsFacts, SudoGrant
from agent.paths import SystemRoot
from agent.system import fs


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
    authentication_methods: Sequence[str] = ()  # sshd's AuthenticationMethods lists; () or ("any",): any one method


@dataclass(frozen=True)
class Access:
    """How one non-root account can get root over SSH under a policy, or why it cannot."""

    way: str | None  # e.g. "alice (sudo) with a key in /home/alice/.ssh/authorized_keys"
    problem: str | None  # set exactly when way is None
    sudo: SudoGrant | None  # the sudoers rule that gives it root (the most generous one)
    barrier: str | None  # what keeps it from logging in at all (shell, expiry, Allow/Deny*)
    keys: tuple[str, ...]  # its authorized_keys files holding a key sshd accepts
    logs_in: bool  # it can open an SSH session (a key sshd accepts, or a password sshd asks for), sudo or not


def access(root: SystemRoot, account: Account, facts: AccountsFacts, policy: AccessPolicy) -> Access:
    grant = sudo_grant(account, facts)
    barrier = _login_barrier(account, facts, policy)
    keys = tuple(authorized_keys(root, account, policy)) if policy.pubkey_authentication and not barrier else ()
    usable_password = account.password == "usable"
    by_key, by_password = login_methods(policy, bool(keys), policy.password_authentication and usable_password)
    if not by_key:
        keys = ()
    logs_in = barrier is None and (by_key or by_password)
    if grant is None:
        problem = f"{account.name} has no sudo rights (not in group sudo, no sudoers rule)"
        return Access(None, problem, None, barrier, keys, logs_in)
    if barrier:
        return Access(None, f"{account.name} has sudo rights but {barrier}", grant, barrier, (), False)
    if keys:
        if grant.nopasswd or usable_password:
            return Access(f"{account.name} (sudo) with a key in {keys[0]}", None, grant, None, keys, True)
        problem = f"{account.name} has a key but no usable password for sudo and no NOPASSWD rule"
        return Access(None, problem, grant, None, keys, True)
    if logs_in:
        return Access(f"{account.name} (sudo) with a password", None, grant, None, (), True)
    needed = "an authorized_keys entry" + ("" if not policy.password_authentication else " or a usable password")
    return Access(None, f"{account.name} has sudo rights but no way in: needs {needed}", grant, None, (), False)


def login_methods(policy: AccessPolicy, has_key: bool, has_password: bool) -> tuple[bool, bool]:
    """(a login with a key works, a login without one works) under sshd's AuthenticationMethods."""
    lists = [entry.split(",") for entry in policy.authentication_methods if entry.lower() != "any"]
    if not lists:
        return has_key, has_password
    usable = {"publickey": has_key, "password": has_password, "keyboard-interactive": has_password}

    def satisfied(methods: list[str]) -> bool:
        return all(usable.get(method.split(":", 1)[0].lower(), False) for method in methods)

    by_key = any(satisfied(methods) and "publickey" in methods for methods in lists)
    by_password = any(satisfied(methods) and "publickey" not in methods for methods in lists)
    return by_key, by_password


def ways_to_root(root: SystemRoot, facts: AccountsFacts, policy: AccessPolicy) -> tuple[list[str], list[str]]:
    """(ways an admin can still get root over SSH under policy, why each candidate cannot)."""
    ways: list[str] = []
    problems: list[str] = []
    for account in sorted(facts.accounts.values(), key=lambda a: a.uid):
        if account.uid == 0 and account.name == "root":
            _root_ways(root, account, facts, policy, ways, problems)
            continue
        # another uid-0 account is never counted as a way in: the accounts guard reports it instead
        if account.uid == 0 or sudo_grant(account, facts) is None:
            continue
        found = access(root, account, facts, policy)
        if found.way:
            ways.append(found.way)
        elif found.problem:
            problems.append(found.problem)
    if not any(not w.startswith("root") for w in ways) and not problems:
        problems.append(
            "no non-root account with sudo rights exists (members of group sudo, or a sudoers rule); the "
            "accounts guard can create one: accounts.admin_user, accounts.create_admin, accounts.admin_keys"
        )
    return ways, problems


def _root_ways(
    root: SystemRoot, account: Account, facts: AccountsFacts, policy: AccessPolicy, ways: list[str], problems: list[str]
) -> None:
    if policy.permit_root_login == "no" or _login_barrier(account, facts, policy):
        return
    if policy.permit_root_login in ("yes", "prohibit-password", "without-password"):
        keys = authorized_keys(root, account, policy) if policy.pubkey_authentication else []
        if keys:
            ways.append(f"root with a key in {keys[0]}")
            return
    if policy.permit_root_login == "yes" and policy.password_authentication and account.password == "usable":
        ways.append("root with a password")


def sudo_grant(account: Account, facts: AccountsFacts) -> SudoGrant | None:
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


def authorized_keys_files(account: Account, policy: AccessPolicy) -> list[str]:
    """Where sshd looks for account's keys (AuthorizedKeysFile with %h, %u, %U expanded), as system paths."""
    paths = []
    for template in policy.authorized_keys_files:
        if template.lower() == "none":
            continue
        expanded = template.replace("%%", "\0").replace("%h", account.home).replace("%u", account.name)
        expanded = expanded.replace("%U", str(account.uid)).replace("\0", "%")
        paths.append(expanded if expanded.startswith("/") else os.path.join(account.home, expanded))
    return paths


def authorized_keys(root: SystemRoot, account: Account, policy: AccessPolicy) -> list[str]:
    """authorized_keys files of account that hold a key sshd will accept (StrictModes ownership/modes)."""
    found = []
    for system_path in authorized_keys_files(account, policy):
        path = root.path(system_path)
        try:
            text = fs.read_text(path, follow_symlinks=True)
        except (fs.UnsafeFile, PermissionError):
            continue
        if text and any(KEY_TYPE.search(line) for line in text.splitlines() if not line.lstrip().startswith("#")):
            if strict_modes_problem(root, path, account) is None:
                found.append(system_path)
    return found


def key_fingerprints(root: SystemRoot, account: Account, policy: AccessPolicy) -> frozenset[str]:
    """The SHA256 fingerprints (as sshd logs them: "SHA256:" + unpadded base64) of the keys sshd would
    accept for account: its authorized_keys files that pass StrictModes."""
    found: set[str] = set()
    for system_path in authorized_keys(root, account, policy):
        try:
            text = fs.read_text(root.path(system_path), follow_symlinks=True) or ""
        except (fs.UnsafeFile, PermissionError):
            continue
        for line in text.splitlines():
            if line.lstrip().startswith("#"):
                continue
            match = KEY_TYPE.search(line)
            if match is None:
                continue
            blob = match.group(0).split()[-1]
            try:
                raw = base64.b64decode(blob, validate=True)
            except (ValueError, binascii.Error):
                continue
            digest = base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")
            found.add(f"SHA256:{digest}")
    return frozenset(found)


def strict_modes_problem(root: SystemRoot, path: Path, account: Account) -> tuple[Path, str] | None:
    """Why sshd's StrictModes would refuse keys in path: (the file or directory at fault, why), walking up
    to the home directory, as sshd does; None when it would accept them."""
    current = path
    home = root.path(account.home) if account.home.startswith("/") else None
    while True:
        why = unsafe_owner_or_mode(current, account)
        if why:
            return current, why
        if home is None or current == home or current == root.prefix or current.parent == current:
            return None
        current = current.parent


def unsafe_owner_or_mode(path: Path, account: Account) -> str | None:
    """What makes path unsafe for account's login files: owned by someone else, or writable by others."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return exc.strerror or "cannot be read"
    if info.st_uid not in (0, account.uid):
        return f"is owned by uid {info.st_uid}, not {account.name} or root"
    writers = [who for bit, who in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "others")) if info.st_mode & bit]
    if writers:
        return f"is writable by {' and '.join(writers)} (mode {stat.S_IMODE(info.st_mode):04o})"
    return None

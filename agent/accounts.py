"""Who can still get root over SSH: the facts behind the SSH guard's lockout invariants and the
accounts guard's findings.

Read from passwd, shadow, group, sudoers and authorized_keys under the SystemRoot. This is read-only:
both guards judge accounts with the same functions, so they never disagree about who can get in.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import fnmatch
import hashlib
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.controls.base import WatchSpec
from agent.paths import SystemRoot
from agent.system import fs

NOLOGIN_SHELLS = frozenset({"/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false", ""})
# the account databases and sudo's rules, in /etc: any of them can give or take a way in
ACCOUNT_FILES = frozenset({"passwd", "shadow", "group", "gshadow", "sudoers"})
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
    line: int = 0  # in /etc/passwd, 1-based
    last_change: int | None = None  # shadow's lastchg: days since 1970-01-01 (0: must change at next login)


@dataclass(frozen=True)
class SudoGrant:
    who: str  # "alice" or "%sudo"
    nopasswd: bool


@dataclass(frozen=True)
class AccountsFacts:
    accounts: Mapping[str, Account]
    group_members: Mapping[str, frozenset[str]]  # group name -> users (explicit members and primary)
    sudo_grants: tuple[SudoGrant, ...]
    uid0: tuple[Account, ...] = ()  # every passwd line with uid 0, in file order (a repeated name too)
    group_ids: frozenset[int] = frozenset()  # every gid in /etc/group


def read_facts(root: SystemRoot) -> AccountsFacts:
    passwd = fs.read_text(root.passwd, follow_symlinks=True) or ""
    shadow = _read_optional(root.shadow)
    group = fs.read_text(root.group, follow_symlinks=True) or ""
    shadow_by_user: dict[str, list[str]] = {}
    for line in shadow.splitlines():
        fields = line.split(":")
        if len(fields) >= 2:
            shadow_by_user.setdefault(fields[0], fields)  # like getspnam, the first entry counts
    today = (datetime.date.today() - datetime.date(1970, 1, 1)).days
    accounts: dict[str, Account] = {}
    uid0: list[Account] = []
    for number, line in enumerate(passwd.splitlines(), 1):
        fields = line.split(":")
        if len(fields) < 7 or not fields[2].isdigit() or not fields[3].isdigit():
            continue
        entry = shadow_by_user.get(fields[0])
        password, expired = _password_state(fields[1], entry, today)
        last_change = int(entry[2]) if entry is not None and len(entry) > 2 and entry[2].isdigit() else None
        account = Account(
            fields[0], int(fields[2]), int(fields[3]), fields[5], fields[6], password, expired, number, last_change
        )
        accounts.setdefault(account.name, account)  # like getpwnam, the first entry counts
        if account.uid == 0:
            uid0.append(account)
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
    grants = tuple(_read_sudoers(root))
    return AccountsFacts(
        accounts, {g: frozenset(m) for g, m in members.items()}, grants, tuple(uid0), frozenset(gid_to_group)
    )


# useradd's defaults when login.defs does not set them
_ID_DEFAULTS = {"UID_MIN": 1000, "UID_MAX": 60000, "GID_MIN": 1000, "GID_MAX": 60000}


def free_account_id(root: SystemRoot, facts: AccountsFacts) -> int | None:
    """A uid that is also free as a gid, for a new account and its own group: one above the highest of
    both in login.defs' ranges, as useradd picks a uid (so an old account's files are not inherited
    from a gap); None when none is left."""
    limits = dict(_ID_DEFAULTS)
    try:
        text = fs.read_text(root.login_defs, follow_symlinks=True) or ""
    except (fs.UnsafeFile, OSError):
        text = ""
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in limits and words[1].isdigit():
            limits[words[0]] = int(words[1])
    low = max(limits["UID_MIN"], limits["GID_MIN"])
    high = min(limits["UID_MAX"], limits["GID_MAX"])
    used = {a.uid for a in facts.accounts.values()} | set(facts.group_ids)
    in_range = [n for n in used if low <= n <= high]
    candidate = max(in_range) + 1 if in_range else low
    return candidate if candidate <= high and candidate not in used else None


@dataclass(frozen=True)
class InstallDate:
    day: int  # days since 1970-01-01 (UTC), the unit of shadow's lastchg
    source: str  # the system path that dates it


def install_date(root: SystemRoot) -> InstallDate | None:
    """When this system was installed: the oldest modification time of files made then and not rewritten.

    - /etc/machine-id: written once, when systemd is installed (debian-installer, debootstrap) or at an
      image's first boot (images ship it empty), so on a provider's image it dates this machine, not the image;
    - the ssh host keys: made when openssh-server is installed, or by cloud-init at first boot;
    - /var/log/installer: debian-installer's logs, copied at the end of the install.
    The oldest wins, so host keys made again later do not move the date. Not base-files' dpkg file list:
    every point release upgrades base-files, and on an image it dates the image's build."""
    candidates = [root.machine_id, root.installer_logs, *sorted(root.ssh_dir.glob("ssh_host_*_key"))]
    oldest: tuple[float, Path] | None = None
    for path in candidates:
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            continue
        if oldest is None or mtime < oldest[0]:
            oldest = (mtime, path)
    if oldest is None:
        return None
    return InstallDate(int(oldest[0] // 86400), root.system_name(oldest[1]))


def _read_optional(path: Path) -> str:
    try:
        return fs.read_text(path, follow_symlinks=True) or ""
    except (fs.UnsafeFile, PermissionError):
        return ""


def _password_state(passwd_field: str, shadow: list[str] | None, today: int) -> tuple[str, bool]:
    if shadow is None:
        if passwd_field == "":
            return "empty", False  # no shadow entry and nothing in passwd: a login without a password
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


def watches(root: SystemRoot) -> list[WatchSpec]:
    """Where a change can give or take a way in: the account files, sudoers.d, the admins' ~/.ssh."""
    specs = [WatchSpec(root.passwd.parent, ACCOUNT_FILES), WatchSpec(root.sudoers_d)]
    try:
        facts = read_facts(root)
    except (fs.UnsafeFile, OSError):
        return specs
    for account in facts.accounts.values():
        if account.uid == 0 or account.uid >= 1000 and account.home.startswith("/home/"):
            home = root.path(account.home)
            specs.append(WatchSpec(home, frozenset({".ssh"})))
            specs.append(WatchSpec(home / ".ssh"))
    return specs


@dataclass(frozen=True)
class SshSession:
    user: str
    address: str  # where the session came from (logind's REMOTE_HOST)
    session: str  # logind's session id


def live_ssh_sessions(root: SystemRoot) -> list[SshSession] | None:
    """The SSH sessions logind has open now (its files in /run/systemd/sessions, written by root only),
    None when logind keeps none here (not running, or no pam_systemd)."""
    directory = root.logind_sessions
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return None
    sessions = []
    for name in sorted(os.listdir(directory)):
        path = directory / name
        try:
            if os.lstat(path).st_uid != 0:
                continue  # only logind (root) writes here
            text = fs.read_text(path) or ""
        except (fs.UnsafeFile, OSError):
            continue
        fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        if fields.get("SERVICE") != "sshd" or fields.get("STATE", "active") == "closing":
            continue
        if fields.get("USER") and fields.get("REMOTE_HOST"):
            sessions.append(SshSession(fields["USER"], fields["REMOTE_HOST"], name))
    return sessions


def admin_sessions(root: SystemRoot, facts: AccountsFacts) -> list[SshSession] | None:
    """The live SSH sessions of accounts with sudo rights (root's too): addresses fail2ban must never ban."""
    sessions = live_ssh_sessions(root)
    if sessions is None:
        return None
    admins = []
    for session in sessions:
        account = facts.accounts.get(session.user)
        if account is not None and (account.uid == 0 or sudo_grant(account, facts) is not None):
            admins.append(session)
    return admins

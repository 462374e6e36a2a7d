"""The account databases as the agent reads them: passwd, shadow, group, sudoers, the install date, and
where a change to them can give or take a way in. Read-only."""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Mapping
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

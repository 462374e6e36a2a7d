"""The SSH sessions open now, as logind keeps them (the admin's live addresses)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from agent.accounts.facts import AccountsFacts
from agent.accounts.logins import sudo_grant
from agent.paths import SystemRoot
from agent.system import fs


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

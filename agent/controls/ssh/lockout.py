"""The SSH guard's lockout check: each setting that can take a way in away applies only while a way to root
over SSH stays (agent/accounts judges who gets in under the settings as they would be)."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from agent import accounts
from agent.controls.base import NEEDS_CHANGE, WAITS_FOR_PROOF, HeldSetting
from agent.controls.ssh.keylogins import KeyLogins
from agent.controls.ssh.model import CUT_KEYWORDS, CUTTING_OPTIONS, SshdDesired, SshdObserved, policy, same
from agent.paths import SystemRoot


def judge(
    root: SystemRoot, keylogins: KeyLogins, observed: SshdObserved, desired: SshdDesired
) -> tuple[list[HeldSetting], dict[str, str], frozenset[str], bool]:
    """Each setting that can take a way in away applies only while a way to root over SSH stays:
    ssh.options' Allow*/Deny*/AuthenticationMethods/... and PermitRootLogin while some admin (or root)
    still gets in with what stays on; PasswordAuthentication no once a sudo admin's key login is
    proven (agent/controls/ssh/keylogins.py). Everything else (the port move, the rest of the options) applies.
    The settings held back (with why and what ends it), the value each judged keyword applies with, the
    keywords judged, and whether PasswordAuthentication yes is kept for the admin's way in."""
    wanted = {keyword.lower(): value for keyword, value in desired.settings}
    judged = (CUTTING_OPTIONS | CUT_KEYWORDS) & set(wanted)  # each of these applies only if it keeps a way in
    judged |= {item.setting.split()[0].lower() for item in desired.held}  # the strict ones left out
    accepted = {k: v for k, v in wanted.items() if k not in judged}
    held: list[HeldSetting] = list(desired.held)
    facts = accounts.read_facts(root)

    def trial(extra: Mapping[str, str]) -> accounts.AccessPolicy:
        return policy(observed.effective, desired, {**accepted, **extra})

    def changes(keyword: str) -> bool:
        return not same(observed.effective.get(keyword, ()), desired.effective.get(keyword, (wanted[keyword],)))

    for keyword, value in desired.settings:
        key = keyword.lower()
        if key not in CUTTING_OPTIONS:
            continue
        if not changes(key) or accounts.ways_to_root(root, facts, trial({key: value}))[0]:
            accepted[key] = value
            continue
        problems = accounts.ways_to_root(root, facts, trial({key: value}))[1]
        held.append(
            HeldSetting(
                f"{keyword} {value}",
                "it would leave no way to get root over SSH: " + "; ".join(problems),
                f"change ssh.options {keyword} in /etc/vps-agent/config.yaml so an admin is let in, "
                "then `vps-agentctl reload`",
                NEEDS_CHANGE,
            )
        )
    passwords_held = False
    if "passwordauthentication" in wanted:
        if wanted["passwordauthentication"] == "yes" or not changes("passwordauthentication"):
            accepted["passwordauthentication"] = wanted["passwordauthentication"]
        else:
            hold = password_hold(root, keylogins, facts, trial, desired.admin_port)
            if hold is None:
                accepted["passwordauthentication"] = "no"
            else:
                held.append(hold)
                accepted["passwordauthentication"] = "yes"  # the way in the admin has today stays
                passwords_held = True
    if "permitrootlogin" in wanted:
        value = wanted["permitrootlogin"]
        ways, problems = accounts.ways_to_root(root, facts, trial({"permitrootlogin": value}))
        if not changes("permitrootlogin") or ways:
            accepted["permitrootlogin"] = value
        else:
            # left as sshd has it now: root's way in is the only one
            held.append(
                HeldSetting(
                    f"PermitRootLogin {value}",
                    "it would leave no way to get root over SSH: " + "; ".join(problems),
                    "create a sudo admin who can log in: adduser NAME && usermod -aG sudo NAME (or "
                    "accounts.admin_user, accounts.create_admin and accounts.admin_keys in the config)",
                    NEEDS_CHANGE,
                )
            )
    return held, accepted, judged, passwords_held


def password_hold(
    root: SystemRoot, keylogins: KeyLogins, facts: accounts.AccountsFacts, trial: Any, admin_port: str
) -> HeldSetting | None:
    """PasswordAuthentication no: None when a sudo admin's key login is proven and that key still gets
    in with passwords off; otherwise why passwords stay on and what ends it."""
    without = trial({"passwordauthentication": "no"})
    with_passwords = trial({"passwordauthentication": "yes"})
    admins = [
        account
        for account in sorted(facts.accounts.values(), key=lambda a: a.uid)
        if account.uid != 0 and accounts.sudo_grant(account, facts) is not None
    ]
    waiting: list[str] = []
    keyless: list[str] = []
    for account in admins:
        found = accounts.access(root, account, facts, without)
        proof = keylogins.proof(account.name)
        fingerprints = accounts.key_fingerprints(root, account, without) if found.keys else frozenset()
        if proof is not None and not proof.holds(fingerprints):
            keylogins.forget(account.name)
            proof = None
        if found.way is not None and proof is not None:
            return None
        if found.way is not None:
            waiting.append(account.name)
        elif accounts.access(root, account, facts, with_passwords).way is not None:
            keyless.append(account.name)
    host = socket.gethostname()
    if waiting:
        keylogins.set_awaiting(waiting, keyless)
        who = " or ".join(waiting)
        return HeldSetting(
            "PasswordAuthentication no",
            f"passwords stay on until {who} logs in with a key",
            f"log in once with that key (ssh -p {admin_port} {waiting[0]}@{host}), or after such a login "
            "run `sudo vps-agentctl confirm`",
            WAITS_FOR_PROOF,
        )
    if keyless:
        keylogins.set_awaiting((), keyless)
        who = " or ".join(keyless)
        return HeldSetting(
            "PasswordAuthentication no",
            f"passwords stay on until {who} logs in with a key",
            f"ssh-copy-id -p {admin_port} {keyless[0]}@{host}, then log in once",
            WAITS_FOR_PROOF,
        )
    return HeldSetting(
        "PasswordAuthentication no",
        "passwords stay on: no sudo admin can log in to prove a key",
        "create a sudo admin with a key: adduser NAME && usermod -aG sudo NAME, ssh-copy-id NAME@"
        f"{host}, then log in once as NAME (or accounts.create_admin with accounts.admin_keys)",
        NEEDS_CHANGE,
    )

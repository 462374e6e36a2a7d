"""The strict profile's sshd settings (docs/strict-profile.md): what the SSH guard adds under `profile: strict`.

Each goes through the guard's drop-in like the baseline's. Two depend on the admin's client and are held
back, never guessed: MaxAuthTries must stay above the number of keys the client offers (sshd counts each
refused key as a failure), and KexAlgorithms/Ciphers/MACs must keep what the client negotiates. The agent
learns both from sshd's log of the admin's proven key login (agent/system/journal.py, agent/controls/ssh/keylogins.py):
the keys refused before the accepted one at LogLevel VERBOSE (which strict sets), the algorithms only at
LogLevel DEBUG1. A keyword set in ssh.options is the admin's and is left to it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from agent import accounts
from agent.controls.base import NEEDS_CHANGE, WAITS_FOR_PROOF, HeldSetting
from agent.controls.ssh.keylogins import KeyLogins, KeyProof
from agent.paths import ISSUE_NET, SystemRoot

FIXED: tuple[tuple[str, str], ...] = (
    ("X11Forwarding", "no"),
    ("AllowAgentForwarding", "no"),
    ("PermitTunnel", "no"),
    ("GatewayPorts", "no"),
    ("PermitUserEnvironment", "no"),
    ("LoginGraceTime", "30"),
    ("ClientAliveInterval", "300"),
    ("ClientAliveCountMax", "2"),
    ("TCPKeepAlive", "no"),  # ClientAlive* (inside the encrypted channel) finds dead peers instead
    ("Compression", "no"),
    ("AllowTcpForwarding", "local"),  # ssh -L and -D stay (databases, consoles); -R listeners go
    ("LogLevel", "VERBOSE"),
    ("Banner", ISSUE_NET),  # the legal banner the strict guard keeps there (agent/controls/login_files.py)
)
MAX_AUTH_TRIES = 3  # what Lynis (SSH-7408) and CIS ask, raised to fit the admin's client
SSHD_DEFAULT_TRIES = 6
# (keyword, sshd -T's name for it, what the login proof calls it, the modern algorithms in preference order)
CRYPTO: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    (
        "KexAlgorithms",
        "kexalgorithms",
        "kex",
        (
            "mlkem768x25519-sha256",
            "sntrup761x25519-sha512",
            "sntrup761x25519-sha512@openssh.com",
            "curve25519-sha256",
            "curve25519-sha256@libssh.org",
            "diffie-hellman-group16-sha512",
            "diffie-hellman-group18-sha512",
            "diffie-hellman-group-exchange-sha256",
        ),
    ),
    (
        "Ciphers",
        "ciphers",
        "cipher",
        (
            "chacha20-poly1305@openssh.com",
            "aes256-gcm@openssh.com",
            "aes128-gcm@openssh.com",
            "aes256-ctr",
            "aes192-ctr",
            "aes128-ctr",
        ),
    ),
    (
        "MACs",
        "macs",
        "mac",
        ("hmac-sha2-512-etm@openssh.com", "hmac-sha2-256-etm@openssh.com", "umac-128-etm@openssh.com"),
    ),
)
IMPLICIT_MAC = "<implicit>"  # an AEAD cipher (chacha20-poly1305, aes-gcm) carries its own MAC


@dataclass(frozen=True)
class StrictSshd:
    settings: tuple[tuple[str, str], ...]  # to add to the drop-in, in order: the held ones too (so drift shows)
    held: tuple[HeldSetting, ...]  # what waits for a fact of the admin's client, or the admin's change: the
    # SSH guard's preconditions() leave these out of what it applies
    awaiting: tuple[str, ...]  # sudo admins whose next key login tells what is missing


def strict_sshd(
    root: SystemRoot,
    keylogins: KeyLogins,
    options: Collection[str],
    defaults: Mapping[str, tuple[str, ...]],
    password_authentication: bool,
    admin_port: str,
) -> StrictSshd:
    """options: the lower-case keywords ssh.options sets (the admin's, left alone); defaults: `sshd -T -f
    /dev/null`, what this sshd offers by itself (sshd has no -Q: its default lists are what it supports)."""
    settings = [(keyword, value) for keyword, value in FIXED if keyword.lower() not in options]
    held: list[HeldSetting] = []
    admins = _admins(root, password_authentication)
    proofs = {name: keylogins.proof(name) for name in admins}
    awaiting: set[str] = set()
    if "maxauthtries" not in options:
        tries, hold, waits = _max_auth_tries(proofs, admin_port)
        settings.append(("MaxAuthTries", str(tries or MAX_AUTH_TRIES)))
        if hold is not None:
            held.append(hold)
        awaiting.update(waits)
    for keyword, key, fact, modern in CRYPTO:
        if key in options:
            continue
        supported = {name for value in defaults.get(key, ()) for name in value.split(",")}
        allowed = [name for name in modern if name in supported]
        if not allowed:
            continue  # this sshd offers none of them: nothing to restrict to
        value = ",".join(allowed)
        hold, waits = _crypto_hold(keyword, value, fact, allowed, proofs)
        settings.append((keyword, value))
        if hold is not None:
            held.append(hold)
        awaiting.update(waits)
    return StrictSshd(tuple(settings), tuple(held), tuple(sorted(awaiting)))


def _admins(root: SystemRoot, password_authentication: bool) -> list[str]:
    """The sudo admins (not root) who can open an SSH session: whose client the limits must fit."""
    facts = accounts.read_facts(root)
    policy = accounts.AccessPolicy(
        permit_root_login="no",
        password_authentication=password_authentication,
        pubkey_authentication=True,
        authorized_keys_files=(".ssh/authorized_keys", ".ssh/authorized_keys2"),
    )
    return [
        account.name
        for account in sorted(facts.accounts.values(), key=lambda a: a.uid)
        if account.uid != 0
        and accounts.sudo_grant(account, facts) is not None
        and accounts.access(root, account, facts, policy).logs_in
    ]


def _max_auth_tries(
    proofs: Mapping[str, KeyProof | None], admin_port: str
) -> tuple[int | None, HeldSetting | None, list[str]]:
    unknown = [name for name, proof in proofs.items() if proof is None or proof.keys_offered <= 0]
    if unknown or not proofs:
        who = " or ".join(unknown) if unknown else "no sudo admin"
        setting = f"MaxAuthTries {MAX_AUTH_TRIES}"
        reason = (
            f"sshd's default {SSHD_DEFAULT_TRIES} stays: how many keys {who}'s client offers is not known "
            "(sshd counts each refused key as a failed try)"
        )
        unblock = (
            f"log in once with the key as {unknown[0]} (ssh -p {admin_port} {unknown[0]}@HOST): sshd logs the "
            "refused keys at LogLevel VERBOSE"
            if unknown
            else "create a sudo admin with a key (accounts.admin_user, accounts.admin_keys), then log in once"
        )
        return None, HeldSetting(setting, reason, unblock, WAITS_FOR_PROOF), unknown
    offered = max(proof.keys_offered for proof in proofs.values() if proof is not None)
    return max(MAX_AUTH_TRIES, offered + 1), None, []


def _crypto_hold(
    keyword: str, value: str, fact: str, allowed: list[str], proofs: Mapping[str, KeyProof | None]
) -> tuple[HeldSetting | None, list[str]]:
    setting = f"{keyword} {value}"
    unknown = [name for name, proof in proofs.items() if proof is None or not proof.algorithms]
    if unknown or not proofs:
        who = " or ".join(unknown) if unknown else "no sudo admin"
        reason = f"sshd's defaults stay: what {who}'s client negotiates is not known"
        unblock = (
            "sshd logs it only at LogLevel DEBUG1: set ssh.options LogLevel: DEBUG1, `vps-agentctl reload`, log in "
            "once with the key, then remove it"
        )
        return HeldSetting(setting, reason, unblock, WAITS_FOR_PROOF), unknown
    outside = sorted(
        {
            f"{name} uses {used}"
            for name, proof in proofs.items()
            if proof is not None
            for used in [dict(proof.algorithms).get(fact, "")]
            if used not in allowed and not (fact == "mac" and used == IMPLICIT_MAC)
        }
    )
    if outside:
        reason = "it would shut out the admin's client: " + "; ".join(outside)
        unblock = f"update that SSH client, or set ssh.options {keyword} in the config"
        return HeldSetting(setting, reason, unblock, NEEDS_CHANGE), []
    return None, []

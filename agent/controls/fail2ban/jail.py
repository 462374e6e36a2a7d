"""The fail2ban guard's jail as text: the keys it keeps, the agent's jail file it renders, and how it reads
what fail2ban prints (`fail2ban-client -d`, `status`, `get ... actions`/`ignoreip`) and the admin's later
.local files. No process, no file: agent/controls/fail2ban/control.py runs fail2ban-client."""

from __future__ import annotations

import ast
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent import accounts
from agent.config import parse_duration
from agent.controls.base import line_end, unified
from agent.controls.fail2ban.jail_lines import Assignment, assignments, split_lines
from agent.system.netfilter import Backend

CLIENT = "fail2ban-client"
PACKAGE = "fail2ban"
JAIL = "sshd"
UNIT = "fail2ban.service"
MARKER = "vps-agent"
# the keys the agent guards in [sshd], in the order its file sets them
KEYS = (
    "enabled",
    "port",
    "maxretry",
    "findtime",
    "bantime",
    "ignoreip",
    "banaction",
    "backend",
    "journalmatch",
    "mode",
)
# With the journal backend, only what sshd's own unit logged as root counts (the key-login proof's door,
# agent/system/journal.py): the filter's stock match, `_SYSTEMD_UNIT=sshd.service + _COMM=sshd`, is an OR
# that misses OpenSSH 9.8+'s `sshd-session` in Debian's ssh.service (Debian 13: nothing ever banned) and
# takes any process named sshd writing to /dev/log (a local user getting any address banned).
# journald learns _SYSTEMD_UNIT and _COMM from /proc, which a short-lived preauth process has often left by then
# (seen on a booted Debian 12: the guesser's `Connection closed ... [preauth]` lines carry _UID=0 alone); _UID
# comes from the socket's credentials, always there and unforgeable by another user: root's sshd lines count.
JOURNALMATCH = (
    "_SYSTEMD_UNIT=ssh.service _UID=0 + _SYSTEMD_UNIT=sshd.service _UID=0"
    " + SYSLOG_IDENTIFIER=sshd _UID=0 + SYSLOG_IDENTIFIER=sshd-session _UID=0"
)
# After a start or reload the server adds the jail's actions a moment after the jail itself (fail2ban 1.1
# answered `No actions for jail sshd` right after a reload): a heal is done once the jail can ban.
# Debian's sshd filter in `mode = normal` does not count `Connection closed by authenticating user root A port
# P [preauth]`, all a password guesser leaves once sshd takes no passwords; `aggressive` (ddos + extra)
# does. The dump has no mode: its failregex that counts those closes as failures tells it.
# 1.0.2: ^<F-MLFFORGET>(Connection (?:closed|reset)|Disconnected)..., 1.1.0: ^<F-MLFFORGET>(?:Connection ...;
# in normal mode the same line is wrapped in <F-NOFAIL>
COUNTS_PREAUTH_CLOSE = re.compile(r"\^<F-MLFFORGET>\((?:\?:)?Connection \(\?:closed\|reset\)")


def banaction_for(backend: Backend) -> str:
    """Bans must land in the firewall the system uses: native nftables, or iptables (-nft or -legacy)."""
    return "nftables-multiport" if backend.name == "nftables" else "iptables-multiport"


@dataclass(frozen=True)
class JailFile:
    """One .local that fail2ban reads after the agent's file."""

    system_path: str
    text: str


@dataclass(frozen=True)
class Fail2banObserved:
    effective: dict[str, str] | None  # the sshd jail's guarded keys per `fail2ban-client -d`; None: jail off
    agent_file: bytes | None
    agent_file_problem: str | None
    later: tuple[JailFile, ...]  # jail.d/*.local sorting after the agent's file
    jail_conf: bytes | None  # for the one-time jail.conf.orig copy
    running: bool | None  # None: not known (a fake root: fail2ban is never started there)
    banned: int | None = None  # `fail2ban-client status sshd`: currently banned
    installed: bool = True  # False only where the guard may install it (fail2ban.install, the host)
    runtime_ignore: tuple[str, ...] | None = None  # the running jail's ignore list (None: not asked)
    banned_ips: tuple[str, ...] = ()
    # live SSH sessions of sudo admins (logind), whose addresses the running jail must ignore; None: unknown
    admin_sessions: tuple[accounts.SshSession, ...] | None = None


@dataclass(frozen=True)
class Fail2banDesired:
    effective: dict[str, str]  # key -> value as `fail2ban-client -d` prints it
    text: str  # the agent's jail file
    install: bool = False  # fail2ban may be installed when missing (fail2ban.install, on the host)


def render_jail(values: dict[str, str]) -> str:
    lines = [
        "# Managed by vps-agent; drift from this file is reverted within milliseconds.",
        "# Change /etc/vps-agent/config.yaml (fail2ban:) instead, then run `vps-agentctl reload`.",
        "# To edit fail2ban by hand for a while: `vps-agentctl pause --for 30m fail2ban`.",
        f"[{JAIL}]",
    ]
    lines.extend(f"{key} = {values[key]}" for key in KEYS if key in values)
    return "\n".join(lines) + "\n"


def parse_dump(text: str, jail: str = JAIL) -> dict[str, str] | None:
    """`fail2ban-client -d` prints one Python literal per command the server would get; the jail's
    guarded keys from them. None: the jail is not started (disabled)."""
    values: dict[str, str] = {}
    started = False
    for line in text.splitlines():
        if not line.startswith("["):
            continue
        try:
            command = ast.literal_eval(line)
        except (ValueError, SyntaxError):
            continue
        if not isinstance(command, list) or len(command) < 2 or command[1] != jail:
            continue
        verb = command[0]
        if verb == "add" and len(command) > 2:
            values["backend"] = str(command[2])
        elif verb == "start":
            started = True
        elif verb == "set" and len(command) > 3:
            key = command[2]
            if key in ("maxretry", "findtime", "bantime"):
                values[key] = str(command[3])
            elif key == "addignoreip":
                values["ignoreip"] = " ".join(str(a) for a in command[3:])
            elif key == "addjournalmatch":
                match = " ".join(str(a) for a in command[3:])
                values["journalmatch"] = f"{values['journalmatch']} + {match}" if "journalmatch" in values else match
            elif key == "addaction" and "banaction" not in values:
                values["banaction"] = str(command[3])
        elif verb in ("multi-set", "set") and len(command) > 3 and command[2] == "addfailregex":
            regexes = command[3] if isinstance(command[3], list) else command[3:]
            counts = any(COUNTS_PREAUTH_CLOSE.match(str(r)) for r in regexes)
            values["mode"] = "aggressive" if counts or values.get("mode") == "aggressive" else "normal"
        elif verb == "multi-set" and len(command) > 4 and command[2] == "action":
            params = {p[0]: p[1] for p in command[4] if isinstance(p, list) and len(p) == 2}
            if command[3] == values.get("banaction") and "port" in params:
                values["port"] = str(params["port"])
    if not started:
        return None
    values["enabled"] = "true"
    values.setdefault("ignoreip", "")
    return values


def parse_actions(text: str) -> list[str]:
    """`fail2ban-client get sshd actions`: "The jail sshd has the following actions:" then the names, comma
    separated; `No actions for jail sshd` while there are none."""
    lines = text.strip().splitlines()
    if not lines or not lines[0].startswith("The jail "):
        return []
    return [name.strip() for line in lines[1:] for name in line.split(",") if name.strip()]


def parse_status(text: str) -> int | None:
    """`fail2ban-client status sshd` -> how many addresses are banned now."""
    match = re.search(r"Currently banned:\s*(\d+)", text)
    return int(match.group(1)) if match else None


def parse_banned_ips(text: str) -> tuple[str, ...]:
    """`fail2ban-client status sshd` -> the addresses banned now."""
    match = re.search(r"Banned IP list:[ \t]*(.*)", text)
    return tuple(match.group(1).split()) if match else ()


def parse_ignore_list(text: str) -> tuple[str, ...]:
    """`fail2ban-client get sshd ignoreip`: "These IP addresses/networks are ignored:" then one `|- A` per
    entry (the last `` `- A``), or "No IP address/network is ignored"."""
    return tuple(line.strip()[2:].strip() for line in text.splitlines() if line.strip()[:2] in ("|-", "`-"))


def as_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def ignored(address: str, entries: Sequence[str]) -> bool:
    """Whether an ignore list (addresses, networks, names) already covers address."""
    wanted = as_network(address)
    for entry in entries:
        network = as_network(entry)
        if entry == address:
            return True
        if wanted is not None and network is not None and wanted.version == network.version:
            if wanted.subnet_of(network):  # type: ignore[arg-type]
                return True
    return False


def overrides(text: str, jail: str = JAIL) -> list[Assignment]:
    """Every guarded key set in [jail] in one file's text, where fail2ban's parser reads it."""
    return [a for a in assignments(text) if a.section == jail and a.key in KEYS]


def agrees(key: str, value: str, wanted: str) -> bool:
    """Whether a value fail2ban reads means what the agent wants ("10m" is 600 seconds)."""
    if value == wanted:
        return True
    if key in ("findtime", "bantime"):
        try:
            return parse_duration(value) == parse_duration(wanted)
        except ValueError:
            return False
    if key == "ignoreip":
        return value.split() == wanted.split()
    return False


def seconds(value: float) -> str:
    return str(int(value))


def effective_diff(observed: Fail2banObserved, desired: Fail2banDesired) -> str:
    have_values = observed.effective or {"enabled": "false"}
    have = "".join(f"{k} = {have_values[k]}\n" for k in KEYS if k in have_values and k in desired.effective)
    want = "".join(f"{k} = {desired.effective[k]}\n" for k in KEYS if k in desired.effective)
    return unified(have, want, f" fail2ban-client -d [{JAIL}]")


def conflicts(observed: Fail2banObserved, desired: Fail2banDesired) -> list[tuple[JailFile, Assignment]]:
    """The assignments in later .local files that set a guarded key of the jail to something else."""
    return [
        (jail_file, found)
        for jail_file in observed.later
        for found in overrides(jail_file.text)
        if found.key in desired.effective and not agrees(found.key, found.value, desired.effective[found.key])
    ]


def neutralised(
    found: Sequence[tuple[JailFile, Assignment]], effective: dict[str, str], stamp: str
) -> tuple[list[tuple[JailFile, str]], list[str]]:
    """Each conflicting assignment commented out with a marker naming the agent, the time and the value it
    keeps (a value continued on indented lines goes with its key); every other line keeps its own bytes and
    line end (CRLF too). Returns each edited file with its new text, and a note per assignment."""
    edits: dict[str, tuple[JailFile, list[str]]] = {}
    notes = []
    for jail_file, assignment in found:
        _, lines = edits.setdefault(jail_file.system_path, (jail_file, split_lines(jail_file.text)))
        wanted = f"{assignment.key} = {effective[assignment.key]}"
        line = lines[assignment.line - 1]
        end = line_end(line) or "\n"
        lines[assignment.line - 1] = f"# [{MARKER} {stamp}] neutralised, the agent keeps {wanted}: {line.strip()}{end}"
        for number in assignment.continued:
            line = lines[number - 1]
            lines[number - 1] = f"# [{MARKER}] {line.strip()}{line_end(line) or chr(10)}"
        notes.append(f"comment out {jail_file.system_path}:{assignment.line} ({assignment.key} = {assignment.value})")
    return [(jail_file, "".join(lines)) for jail_file, lines in edits.values()], notes


def session_text(sessions: Sequence[accounts.SshSession]) -> str:
    """The live admin sessions the jail ignores, as status shows them."""
    return ", ".join(f"{s.address} ({s.user})" for s in sessions)


def jail_facts(observed: Fail2banObserved) -> dict[str, Any]:
    """What status shows of the jail. After a heal, the observe-again (the -t -d) knows neither the service
    nor the sessions: the plan's facts and the reload's add them (the transaction merges the three)."""
    effective = observed.effective or {}
    facts: dict[str, Any] = {
        "jail": JAIL if observed.effective is not None else f"{JAIL} (disabled)",
        "port": effective.get("port", ""),
        "backend": effective.get("backend", ""),
        "banaction": effective.get("banaction", ""),
    }
    if observed.running is not None:
        facts["service"] = "active" if observed.running else "not active"
    if observed.banned is not None:
        facts["banned"] = observed.banned
    if observed.effective is not None and "mode" in observed.effective:
        facts["mode"] = observed.effective["mode"]
    if observed.admin_sessions:
        facts["admin_sessions_ignored"] = session_text(observed.admin_sessions)
    return facts


def runtime_drift(observed: Fail2banObserved, desired: Fail2banDesired) -> list[tuple[str, str, str]]:
    """(address, expected, actual) for the running jail's ignore list: every live sudo admin session's
    address ignored (and not banned); a single address the agent added once its session is gone, out."""
    if observed.runtime_ignore is None or observed.admin_sessions is None:
        return []
    configured = desired.effective["ignoreip"].split()
    live = list(dict.fromkeys(session.address for session in observed.admin_sessions))
    found = []
    for address in live:
        if address in observed.banned_ips:
            found.append((address, f"{address} not banned (a live admin session)", "banned"))
        if not ignored(address, observed.runtime_ignore):
            found.append((address, f"{address} ignored (a live admin session)", "not ignored"))
    for entry in observed.runtime_ignore:
        network = as_network(entry)
        single = network is not None and network.num_addresses == 1
        if single and not ignored(entry, configured) and entry not in live:
            found.append((entry, f"{entry} not ignored (its admin session has ended)", "ignored"))
    return found

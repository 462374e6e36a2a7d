"""The one reader of sshd's login records in the journal, through fields a local user cannot forge.

/dev/log is writable by everyone and `logger -t sshd` sets SYSLOG_IDENTIFIER to anything, so neither the
identifier nor the message text proves that sshd said something. journald itself records who sent each
entry: the unit from the sender's cgroup (`_SYSTEMD_UNIT`), its uid (`_UID`), pid, command name and
executable (`_PID`, `_COMM`, `_EXE`). An entry counts only when those say sshd's own per-connection
process (as root in ssh.service: `sshd`, or `sshd-session` on OpenSSH 9.8 and later), its message matches
a whole-line pattern, and the `Connection from` and `Accepted` lines come from the same process.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.system.run import run

UNITS = ("ssh.service", "sshd.service")
COMMS = frozenset({"sshd", "sshd-session"})
EXES = frozenset({"/usr/sbin/sshd", "/usr/lib/openssh/sshd-session", "/usr/libexec/openssh/sshd-session"})
MAX_ENTRIES = 20000  # one read never handles more (a flood of sshd lines cannot wedge the caller)
TIMEOUT = 10.0

# sshd at LogLevel VERBOSE: `Connection from A port P on B port L rdomain "..."` (auth.c/sshd.c)
_CONNECTION = re.compile(r'Connection from (\S+) port (\d+) on (\S+) port (\d+)(?: rdomain "[^"]*")?')
# auth.c auth_log(): `Accepted publickey for admin from A port P ssh2: ED25519 SHA256:...`
_ACCEPTED = re.compile(r"Accepted (\S+) for (\S+) from (\S+) port (\d+) ssh2(?:: (\S+) (SHA256:\S+))?")
# at VERBOSE, each key the client offered and sshd refused before the one it accepted (auth.c auth_log())
_FAILED_KEY = re.compile(r"Failed publickey for (\S+) from (\S+) port (\d+) ssh2: \S+ SHA256:\S+")
# at DEBUG1 only (kex.c): what the connection negotiated
_KEX = re.compile(r"(?:debug1: )?kex: algorithm: (\S+)(?: \[preauth\])?")
_CIPHER = re.compile(r"(?:debug1: )?kex: client->server cipher: (\S+) MAC: (\S+) compression: \S+(?: \[preauth\])?")


@dataclass(frozen=True)
class SshdLogin:
    user: str
    method: str  # "publickey", "password", "keyboard-interactive/pam", ...
    address: str  # the client's address
    port: int  # the client's source port
    local_port: int | None  # the port it connected to (the same process's Connection line), None unseen
    pid: int  # sshd's per-connection process
    at: float  # wall clock, seconds
    key: str = ""  # for publickey: "ED25519 SHA256:..." as sshd logs it
    # how many keys the client offered, the accepted one included; 0: not known (sshd logged below VERBOSE)
    keys_offered: int = 0
    # what the connection negotiated, where sshd logged it (DEBUG1): (("kex", ...), ("cipher", ...), ("mac", ...))
    algorithms: tuple[tuple[str, str], ...] = ()


def message_text(entry: Mapping[str, Any]) -> str | None:
    """MESSAGE as text: journald's JSON gives a string, or a list of bytes when it is not UTF-8."""
    message = entry.get("MESSAGE")
    if isinstance(message, str):
        return message
    if isinstance(message, list) and all(isinstance(b, int) and 0 <= b < 256 for b in message):
        return bytes(message).decode("utf-8", "replace")
    return None


def trusted(entry: Mapping[str, Any]) -> bool:
    """Logged by sshd's own process as root in sshd's unit: nothing a local user can set."""
    if entry.get("_SYSTEMD_UNIT") not in UNITS or entry.get("_UID") != "0":
        return False
    if entry.get("_COMM") not in COMMS:
        return False
    exe = entry.get("_EXE")
    return exe is None or exe in EXES


def logins(entries: Iterable[Mapping[str, Any]]) -> list[SshdLogin]:
    """The successful logins in journal entries (oldest first), each with the port it came in on when
    the same sshd process logged its Connection line first."""
    connections: dict[tuple[str, str, int], int] = {}  # (pid, address, client port) -> local port
    refused: dict[tuple[str, str, int], int] = {}  # (pid, address, client port) -> keys refused so far
    negotiated: dict[str, dict[str, str]] = {}  # pid -> the algorithms its connection negotiated
    found: list[SshdLogin] = []
    for entry in entries:
        if not trusted(entry):
            continue
        text = message_text(entry)
        pid = str(entry.get("_PID", ""))
        if text is None or not pid.isdigit():
            continue
        connection = _CONNECTION.fullmatch(text)
        if connection:
            where = (pid, connection.group(1), int(connection.group(2)))
            connections[where] = int(connection.group(4))
            refused[where] = 0
            negotiated[pid] = {}
            continue
        failed = _FAILED_KEY.fullmatch(text)
        if failed:
            where = (pid, failed.group(2), int(failed.group(3)))
            if where in refused:
                refused[where] += 1
            continue
        if _negotiated(text, negotiated.setdefault(pid, {})):
            continue
        accepted = _ACCEPTED.fullmatch(text)
        if accepted is None:
            continue
        address, port = accepted.group(3), int(accepted.group(4))
        try:
            at = int(str(entry.get("__REALTIME_TIMESTAMP", "0"))) / 1e6
        except ValueError:
            at = 0.0
        key = f"{accepted.group(5)} {accepted.group(6)}" if accepted.group(6) else ""
        # counted only where the same process logged its Connection line: then sshd logged at VERBOSE or more
        offered = refused[(pid, address, port)] + 1 if (pid, address, port) in refused else 0
        algorithms = negotiated.get(pid, {})
        found.append(
            SshdLogin(
                accepted.group(2),
                accepted.group(1),
                address,
                port,
                connections.get((pid, address, port)),
                int(pid),
                at,
                key,
                offered,
                tuple(sorted(algorithms.items())) if len(algorithms) == 3 else (),
            )
        )
    return found


def _negotiated(text: str, algorithms: dict[str, str]) -> bool:
    """Records a DEBUG1 kex line's algorithms; False when the text is no such line."""
    kex = _KEX.fullmatch(text)
    if kex:
        algorithms["kex"] = kex.group(1)
        return True
    cipher = _CIPHER.fullmatch(text)
    if cipher:
        algorithms["cipher"] = cipher.group(1)
        algorithms["mac"] = cipher.group(2)
        return True
    return False


def sshd_logins(since: float | None = None, after_cursor: str | None = None) -> tuple[list[SshdLogin], str | None]:
    """Successful logins sshd itself logged, oldest first, and the cursor of the last entry read (for the
    next call). A journal that cannot be read gives no logins and the cursor it was given."""
    argv = ["journalctl", "-q", "--no-pager", "-o", "json", "-n", str(MAX_ENTRIES)]
    if after_cursor:
        argv += ["--after-cursor", after_cursor]
    elif since is not None:
        argv += ["--since", f"@{int(since)}"]
    argv += [f"_SYSTEMD_UNIT={unit}" for unit in UNITS] + ["_UID=0"]
    result = run(argv, timeout=TIMEOUT)
    if not result.ok:
        return [], after_cursor
    entries: list[Mapping[str, Any]] = []
    cursor = after_cursor
    for line in result.stdout.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
            if isinstance(entry.get("__CURSOR"), str):
                cursor = entry["__CURSOR"]
    return logins(entries), cursor

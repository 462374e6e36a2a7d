"""sshd's logins from the journal: only what sshd's own processes logged, as whole lines, counts."""

from __future__ import annotations

import json
from typing import Any

from agent.system import journal
from tests.unit.conftest import DeclaredCommands

# a real entry of an sshd login on a booted Debian 12 (OpenSSH 9.2), trimmed to the fields that matter
REAL_DEBIAN12 = {
    "_SYSTEMD_UNIT": "ssh.service",
    "_UID": "0",
    "_GID": "0",
    "_COMM": "sshd",
    "_EXE": "/usr/sbin/sshd",
    "_PID": "812",
    "SYSLOG_IDENTIFIER": "sshd",
    "__REALTIME_TIMESTAMP": "1764761725405597",
    "MESSAGE": "Accepted publickey for admin from 10.213.0.2 port 41562 ssh2: ED25519 SHA256:Zm9vYmFy",
}


def sshd_entry(message: str | list[int], pid: int = 812, **fields: Any) -> dict[str, Any]:
    return {**REAL_DEBIAN12, "_PID": str(pid), "MESSAGE": message, **fields}


def test_an_accepted_line_of_sshd_is_a_login_with_its_key() -> None:
    [login] = journal.logins([REAL_DEBIAN12])
    assert (login.user, login.method, login.address, login.port) == ("admin", "publickey", "10.213.0.2", 41562)
    assert login.key == "ED25519 SHA256:Zm9vYmFy" and login.pid == 812 and login.local_port is None
    assert abs(login.at - 1764761725.405597) < 1e-3


def test_openssh_10s_sshd_session_process_counts() -> None:
    entry = sshd_entry(REAL_DEBIAN12["MESSAGE"], _COMM="sshd-session", _EXE="/usr/lib/openssh/sshd-session")
    assert [login.user for login in journal.logins([entry])] == ["admin"]


def test_a_line_logged_by_logger_as_nobody_is_not_a_login() -> None:
    # `setpriv --reuid=65534 logger -t sshd ...`: journald records the sender, not what it claims
    forged = sshd_entry(
        REAL_DEBIAN12["MESSAGE"], _UID="65534", _COMM="logger", _EXE="/usr/bin/logger", _SYSTEMD_UNIT="session-3.scope"
    )
    assert journal.logins([forged]) == []


def test_each_trusted_field_is_required() -> None:
    for field, value in (
        ("_SYSTEMD_UNIT", "user@1000.service"),
        ("_UID", "1000"),
        ("_COMM", "python3"),
        ("_EXE", "/usr/bin/python3"),
    ):
        foreign: dict[str, Any] = {field: value}
        assert journal.logins([sshd_entry(REAL_DEBIAN12["MESSAGE"], **foreign)]) == [], field
    missing = dict(REAL_DEBIAN12)
    del missing["_SYSTEMD_UNIT"]
    assert journal.logins([missing]) == []


def test_a_root_process_renamed_sshd_in_sshs_unit_but_another_executable_is_not_trusted() -> None:
    assert journal.logins([sshd_entry(REAL_DEBIAN12["MESSAGE"], _EXE="/tmp/sshd")]) == []


def test_accepted_text_inside_an_invalid_user_name_is_not_a_login() -> None:
    # sshd logs the name a client offers: the pattern must match the whole line, not a part of it
    name = "admin from 10.213.0.2 port 40000 ssh2"
    lines = [
        f"Invalid user Accepted password for {name} from 10.213.0.2 port 40000",
        f"Failed password for invalid user Accepted password for {name} from 10.213.0.2 port 40000 ssh2",
        f"Connection closed by invalid user x Accepted password for {name} 10.213.0.2 port 40000 [preauth]",
    ]
    assert journal.logins([sshd_entry(line) for line in lines]) == []


def test_the_local_port_comes_from_the_same_process_and_client_port() -> None:
    entries = [
        sshd_entry('Connection from 10.213.0.2 port 40000 on 10.213.0.1 port 2222 rdomain ""', pid=20),
        sshd_entry("Accepted password for admin from 10.213.0.2 port 40000 ssh2", pid=21),  # another process
        sshd_entry('Connection from 10.213.0.2 port 40001 on 10.213.0.1 port 2222 rdomain ""', pid=22),
        sshd_entry("Accepted password for admin from 10.213.0.2 port 40009 ssh2", pid=22),  # another client port
        sshd_entry('Connection from 10.213.0.2 port 40003 on 10.213.0.1 port 2222 rdomain ""', pid=23),
        sshd_entry("Accepted password for admin from 10.213.0.2 port 40003 ssh2", pid=23),
    ]
    assert [login.local_port for login in journal.logins(entries)] == [None, None, 2222]


def test_a_forged_connection_line_does_not_give_a_real_login_a_port() -> None:
    forged = sshd_entry('Connection from 10.213.0.2 port 40000 on 10.213.0.1 port 2222 rdomain ""', _UID="65534")
    real = sshd_entry("Accepted password for admin from 10.213.0.2 port 40000 ssh2")
    assert [login.local_port for login in journal.logins([forged, real])] == [None]


def test_a_message_journald_stored_as_bytes_is_read() -> None:
    raw = list(REAL_DEBIAN12["MESSAGE"].encode())
    assert [login.user for login in journal.logins([sshd_entry(raw)])] == ["admin"]


def test_sshd_logins_asks_journald_by_trusted_fields_and_keeps_the_cursor(commands: DeclaredCommands) -> None:
    lines = [
        json.dumps({**REAL_DEBIAN12, "__CURSOR": "s=1"}),
        "not json",
        json.dumps({**REAL_DEBIAN12, "__CURSOR": "s=2"}),
    ]
    commands.expect(["journalctl"], stdout="\n".join(lines) + "\n")
    found, cursor = journal.sshd_logins(since=1000.0)
    assert len(found) == 2 and cursor == "s=2"
    argv = commands.calls[-1]
    assert "-t" not in argv and "_SYSTEMD_UNIT=ssh.service" in argv and "_UID=0" in argv and "json" in argv
    assert argv[argv.index("--since") + 1] == "@1000"
    journal.sshd_logins(after_cursor="s=2")
    assert commands.calls[-1][commands.calls[-1].index("--after-cursor") + 1] == "s=2"


def test_a_journal_that_cannot_be_read_gives_nothing_and_keeps_the_cursor(commands: DeclaredCommands) -> None:
    commands.expect(["journalctl"], returncode=1, stderr="No journal files were found.")
    assert journal.sshd_logins(after_cursor="s=9") == ([], "s=9")

"""profile: strict for sshd: the fixed settings, and MaxAuthTries and KexAlgorithms/Ciphers/MACs fitted to what
the admin's proven key login told of its client, each held back with the reason while that is not known or
would shut the client out. baseline stays exactly as it was."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.config import parse_config
from agent.config.errors import ConfigError
from agent.controls.base import NEEDS_CHANGE, WAITS_FOR_PROOF, Held
from agent.controls.ssh.control import SshdControl
from agent.controls.ssh.keylogins import KeyLogins, KeyProof, proofs_from
from agent.controls.ssh.strict import FIXED
from agent.paths import SystemRoot
from agent.system import journal
from tests.fakeroot import client_key, key_fingerprint, make_root
from tests.guards import NO_SSH, ssh_guard
from tests.unit import fake_sshd
from tests.unit.conftest import DeclaredCommands

STRICT = parse_config("ssh: {port: 2222}\nprofile: strict\n")
BASELINE = parse_config("ssh: {port: 2222}\n")
MODERN_CHACHA = (("cipher", "chacha20-poly1305@openssh.com"), ("kex", "curve25519-sha256"), ("mac", "<implicit>"))
# what `sshd -T -f /dev/null` prints on Debian 12 (OpenSSH 9.2) for the three lists
DEBIAN12_DEFAULTS = {
    "kexalgorithms": "sntrup761x25519-sha512@openssh.com,curve25519-sha256,curve25519-sha256@libssh.org,"
    "ecdh-sha2-nistp256,diffie-hellman-group-exchange-sha256,diffie-hellman-group16-sha512,"
    "diffie-hellman-group14-sha256",
    "ciphers": "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,aes128-gcm@openssh.com,"
    "aes256-gcm@openssh.com",
    "macs": "umac-64-etm@openssh.com,umac-128-etm@openssh.com,hmac-sha2-256-etm@openssh.com,"
    "hmac-sha2-512-etm@openssh.com,hmac-sha1-etm@openssh.com,hmac-sha2-256,hmac-sha1",
}


class Debian12Sshd(fake_sshd.FakeSshd):
    """The fake sshd, with the default algorithm lists that `sshd -T -f /dev/null` prints."""

    def __call__(self, argv: list[str]) -> tuple[int, str, str]:
        code, out, err = super().__call__(argv)
        if argv[-2:] == ["-f", "/dev/null"]:
            out += "".join(f"{k} {v}\n" for k, v in DEBIAN12_DEFAULTS.items())
        return code, out, err


def guard(tmp_path: Path, commands: DeclaredCommands, **proof: Any) -> SshdControl:
    """The guard on a fake root whose admin's key login is proven, with these facts of its client."""
    root = SystemRoot.at(make_root(tmp_path / "r", key_proven=False))
    commands.expect_with(["/usr/sbin/sshd"], Debian12Sshd(root))
    fields = {"user": "admin", "how": "a publickey login", "at": 1.0, "fingerprint": key_fingerprint(client_key())}
    root.key_logins_state.write_text(json.dumps({"admin": {**fields, **proof}}))
    return ssh_guard(root)


def held_of(control: SshdControl, config: Any = STRICT) -> tuple[Held | None, Any]:
    desired = control.desired(config, NO_SSH)
    return control.preconditions(control.observe(desired), desired), desired


# --- the config key ------------------------------------------------------------------------------------


def test_profile_defaults_to_baseline_and_takes_strict() -> None:
    assert parse_config("").profile == "baseline" and STRICT.profile == "strict"


def test_a_misspelt_profile_names_file_line_column_and_the_near_choice() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config("ssh: {port: 2222}\nprofile: stirct\n", "c.yaml")
    assert str(error.value) == (
        "c.yaml:2:10: profile: expected one of: baseline, strict, got 'stirct'; did you mean 'strict'?"
    )


# --- baseline is today's ---------------------------------------------------------------------------------


def test_baseline_adds_none_of_the_strict_settings(tmp_path: Path, commands: DeclaredCommands) -> None:
    control = guard(tmp_path, commands, keys_offered=1, algorithms=MODERN_CHACHA)
    desired = control.desired(BASELINE, NO_SSH)
    assert [k for k, _ in desired.settings] == ["Port", "PermitRootLogin", "PasswordAuthentication"]
    assert desired.held == ()


# --- strict ------------------------------------------------------------------------------------------------


def test_strict_writes_the_fixed_settings_into_the_guards_dropin(tmp_path: Path, commands: DeclaredCommands) -> None:
    control = guard(tmp_path, commands, keys_offered=1, algorithms=MODERN_CHACHA)
    held, desired = held_of(control)
    assert held is None, held
    settings = dict(desired.settings)
    for keyword, value in FIXED:
        assert settings[keyword] == value and f"\n{keyword} {value}\n" in desired.dropin_text
    assert settings["MaxAuthTries"] == "3"


def test_max_auth_tries_stays_above_the_keys_the_admins_client_offered(
    tmp_path: Path, commands: DeclaredCommands
) -> None:
    control = guard(tmp_path, commands, keys_offered=5, algorithms=MODERN_CHACHA)
    assert dict(control.desired(STRICT, NO_SSH).settings)["MaxAuthTries"] == "6"


def test_max_auth_tries_unknown_keeps_sshds_default_and_says_why(tmp_path: Path, commands: DeclaredCommands) -> None:
    control = guard(tmp_path, commands, algorithms=MODERN_CHACHA)  # a proof from before: no count
    held, desired = held_of(control)
    assert held is not None and not held.blocked
    assert "MaxAuthTries" not in dict(held.desired.settings)  # what applies
    [item] = held.settings
    assert item.setting == "MaxAuthTries 3" and item.needs == WAITS_FOR_PROOF
    assert "sshd's default 6 stays: how many keys admin's client offers is not known" in item.reason
    assert "log in once with the key as admin" in item.unblock
    assert "admin" in control.keylogins.awaiting  # the daemon's watcher reads the next login
    assert "MaxAuthTries" not in held.desired.dropin_text and "X11Forwarding no" in held.desired.dropin_text


def test_modern_algorithms_are_those_this_sshd_offers_in_the_modern_order(
    tmp_path: Path, commands: DeclaredCommands
) -> None:
    control = guard(tmp_path, commands, keys_offered=1, algorithms=MODERN_CHACHA)
    settings = dict(control.desired(STRICT, NO_SSH).settings)
    assert settings["KexAlgorithms"] == (
        "sntrup761x25519-sha512@openssh.com,curve25519-sha256,curve25519-sha256@libssh.org,"
        "diffie-hellman-group16-sha512,diffie-hellman-group-exchange-sha256"
    )  # no mlkem768 (OpenSSH 9.9+), no nistp, no group14
    assert settings["Ciphers"] == (
        "chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,aes128-gcm@openssh.com,aes256-ctr,aes192-ctr,aes128-ctr"
    )
    assert settings["MACs"] == "hmac-sha2-512-etm@openssh.com,hmac-sha2-256-etm@openssh.com,umac-128-etm@openssh.com"


def test_algorithms_unknown_are_held_back_waiting_for_a_login_that_logs_them(
    tmp_path: Path, commands: DeclaredCommands
) -> None:
    control = guard(tmp_path, commands, keys_offered=1)
    held, desired = held_of(control)
    assert held is not None and not held.blocked
    assert [item.setting.split()[0] for item in held.settings] == ["KexAlgorithms", "Ciphers", "MACs"]
    assert all("LogLevel: DEBUG1" in item.unblock for item in held.settings)
    assert not {"KexAlgorithms", "Ciphers", "MACs"} & set(dict(held.desired.settings))


def test_held_strict_settings_are_still_drift_once_the_rest_is_in_place(
    tmp_path: Path, commands: DeclaredCommands
) -> None:
    """A second look must see them and say they wait (else the guard reads compliant and the hold is lost)."""
    control = guard(tmp_path, commands)
    held, desired = held_of(control)
    assert held is not None
    control.root.sshd_dropin.write_text(held.desired.dropin_text)
    drift = control.diff(control.observe(control.desired(STRICT, NO_SSH)), control.desired(STRICT, NO_SSH))
    assert drift is not None and {"maxauthtries", "ciphers"} <= {item.what for item in drift.items}
    again = control.preconditions(control.observe(control.desired(STRICT, NO_SSH)), control.desired(STRICT, NO_SSH))
    assert again is not None and again.desired.dropin_text == held.desired.dropin_text


def test_an_old_cipher_the_admins_client_uses_blocks_that_setting_alone(
    tmp_path: Path, commands: DeclaredCommands
) -> None:
    old = (("cipher", "aes128-ctr"), ("kex", "curve25519-sha256"), ("mac", "hmac-sha1"))
    control = guard(tmp_path, commands, keys_offered=1, algorithms=old)
    held, desired = held_of(control)
    assert held is not None and held.blocked
    [item] = held.settings
    assert item.setting.startswith("MACs ") and item.needs == NEEDS_CHANGE
    assert "admin uses hmac-sha1" in item.reason
    applied = dict(held.desired.settings)
    assert {"KexAlgorithms", "Ciphers"} <= set(applied) and "MACs" not in applied  # aes128-ctr, curve25519 stay


def test_a_keyword_in_ssh_options_is_the_admins(tmp_path: Path, commands: DeclaredCommands) -> None:
    control = guard(tmp_path, commands)
    options = {"X11Forwarding": True, "Ciphers": "aes256-ctr", "MaxAuthTries": 10, "MACs": "hmac-sha2-512"}
    options["KexAlgorithms"] = "curve25519-sha256"
    config = parse_config(json.dumps({"ssh": {"port": 2222, "options": options}, "profile": "strict"}))
    held, desired = held_of(control, config)
    settings = dict(desired.settings)
    assert (settings["X11Forwarding"], settings["MaxAuthTries"], settings["Ciphers"]) == ("yes", "10", "aes256-ctr")
    assert held is None, held
    assert desired.dropin_text.count("X11Forwarding") == 1


# --- what the journal says of the admin's client -------------------------------------------------------


def entry(message: str, pid: int = 900) -> dict[str, Any]:
    return {
        "_SYSTEMD_UNIT": "ssh.service",
        "_UID": "0",
        "_COMM": "sshd",
        "_EXE": "/usr/sbin/sshd",
        "_PID": str(pid),
        "__REALTIME_TIMESTAMP": "1764761725405597",
        "MESSAGE": message,
    }


CONNECTION = 'Connection from 10.0.0.2 port 4000 on 10.0.0.1 port 2222 rdomain ""'
REFUSED = "Failed publickey for admin from 10.0.0.2 port 4000 ssh2: RSA SHA256:b3RoZXI"
ACCEPTED = "Accepted publickey for admin from 10.0.0.2 port 4000 ssh2: ED25519 SHA256:Zm9vYmFy"


def test_the_keys_refused_before_the_accepted_one_are_counted_at_loglevel_verbose() -> None:
    [login] = journal.logins([entry(CONNECTION), entry(REFUSED), entry(REFUSED), entry(ACCEPTED)])
    assert login.keys_offered == 3 and login.algorithms == ()


def test_without_the_connection_line_sshd_logged_below_verbose_and_the_count_is_unknown() -> None:
    [login] = journal.logins([entry(REFUSED), entry(ACCEPTED)])
    assert login.keys_offered == 0


def test_another_connections_refusals_do_not_count() -> None:
    other = "Failed publickey for admin from 10.0.0.2 port 4001 ssh2: RSA SHA256:b3RoZXI"
    [login] = journal.logins([entry(CONNECTION), entry(other), entry(REFUSED, pid=901), entry(ACCEPTED)])
    assert login.keys_offered == 1


def test_the_algorithms_come_from_debug1s_kex_lines_of_the_same_process() -> None:
    lines = [
        CONNECTION,
        "debug1: kex: algorithm: sntrup761x25519-sha512 [preauth]",
        "debug1: kex: host key algorithm: ssh-ed25519 [preauth]",
        "debug1: kex: client->server cipher: chacha20-poly1305@openssh.com MAC: <implicit> compression: none [preauth]",
        "debug1: kex: server->client cipher: aes128-ctr MAC: hmac-sha1 compression: none [preauth]",
        ACCEPTED,
    ]
    [login] = journal.logins([entry(line) for line in lines])
    assert login.algorithms == (
        ("cipher", "chacha20-poly1305@openssh.com"),
        ("kex", "sntrup761x25519-sha512"),
        ("mac", "<implicit>"),
    )
    [proof] = proofs_from([login], ["admin"])
    assert proof.keys_offered == 1 and proof.algorithms == login.algorithms


def test_a_later_login_adds_what_it_tells_and_never_forgets_what_was_known(tmp_path: Path) -> None:
    keylogins = KeyLogins(SystemRoot.at(make_root(tmp_path / "r", key_proven=False)))
    assert keylogins.record(KeyProof("admin", "a login", 1.0, "SHA256:a"))
    assert not keylogins.record(KeyProof("admin", "again", 2.0, "SHA256:a"))  # nothing new
    assert keylogins.record(KeyProof("admin", "at VERBOSE", 3.0, "SHA256:a", keys_offered=2))
    assert keylogins.record(KeyProof("admin", "at DEBUG1", 4.0, "SHA256:a", algorithms=MODERN_CHACHA))
    proof = KeyLogins(keylogins.root).proof("admin")  # as saved
    assert proof is not None and proof.keys_offered == 2 and proof.algorithms == MODERN_CHACHA

"""Day one on the hardening guide's VPS, booted: the sudo admin has a password and no key (as `adduser`
leaves it), the .deb is installed, the admin asks for `ssh.port: 2222` and `permit_root_login: "no"`.
What is safe applies at once; passwords go off only after the admin's first key login, seen in sshd's
journal; nobody is ever locked out. The tests run in order, as the admin's day does: one VPS for all."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.sandbox import CLIENT_ADDR, RESTART_TIMEOUT, Sandbox
from tests.e2e.test_agent_on_vps import (
    BAD_LOGIN,
    MAXRETRY,
    agent_vps,
    banned,
    events,
    heal_each,
    sshd_drifts,
    sshd_effective,
    status_code,
    status_text,
    wait_for,
)

CONFIG = 'ssh:\n  port: 2222\n  permit_root_login: "no"\n'
REPEATED = ("drift-detected", "remediation-blocked", "remediation-pending")


def ssh_status(vps: Sandbox) -> dict[str, Any]:
    controls = json.loads(vps.exec(["vps-agentctl", "status", "--json"], check=False).stdout)["controls"]
    found: dict[str, Any] = next(c for c in controls if c["control"] == "ssh")
    return found


def baseline(vps: Sandbox, passwords: str) -> bool:
    effective = sshd_effective(vps)
    return (
        effective["port"] == ["2222"]
        and effective["permitrootlogin"] == ["no"]
        and effective["passwordauthentication"] == [passwords]
    )


def count(vps: Sandbox, actions: tuple[str, ...]) -> int:
    return sum(e["event"]["action"] in actions and e.get("control") == "ssh" for e in events(vps))


def password_login(vps: Sandbox, port: int) -> bool:
    return vps.ssh_with_password("id -un", port=port, check=False, timeout=30).stdout.strip() == "admin"


def key_login(vps: Sandbox, port: int) -> bool:
    return vps.ssh("id -un", port=port, check=False, timeout=30).stdout.strip() == "admin"


@pytest.fixture(scope="module")
def vps(tmp_path_factory: pytest.TempPathFactory, release: str) -> Iterator[Sandbox]:
    with agent_vps(tmp_path_factory, "vps-password-admin", admin="password", release=release) as sandbox:
        assert not (sandbox.root / "home/admin/.ssh").exists()
        sandbox.exec(["sh", "-c", "cat > /etc/vps-agent/config.yaml"], input=CONFIG)
        sandbox.exec(["systemctl", "reload", "vps-agent"])
        wait_for("sshd on 22 and 2222", lambda: sshd_effective(sandbox)["port"] == ["22", "2222"], 30)
        yield sandbox


def test_1_root_login_goes_off_at_once_passwords_stay_on_and_both_ports_listen(vps: Sandbox) -> None:
    effective = sshd_effective(vps)
    assert effective["permitrootlogin"] == ["no"] and effective["passwordauthentication"] == ["yes"]
    assert effective["port"] == ["22", "2222"]
    assert password_login(vps, 22) is True


def test_2_status_is_pending_exit_1_and_names_the_key_step(vps: Sandbox) -> None:
    status = vps.exec(["vps-agentctl", "status"], check=False)
    assert status.returncode == 1, status.stdout
    assert "passwords stay on until admin logs in with a key: ssh-copy-id -p 2222 admin@vps" in status.stdout
    ssh = ssh_status(vps)
    assert ssh["status"] == "pending" and [h["setting"] for h in ssh["held"]] == ["PasswordAuthentication no"]
    assert count(vps, ("remediation-blocked",)) == 0


def test_3_a_password_login_on_the_new_port_confirms_the_move(vps: Sandbox) -> None:
    assert password_login(vps, 2222)
    wait_for("22 to close", lambda: sshd_effective(vps)["port"] == ["2222"], 30)
    confirmed = [e for e in events(vps) if e["event"]["action"] == "port-move-confirmed"]
    assert confirmed and "(password)" in str(confirmed[-1]["message"])
    assert password_login(vps, 2222) and not password_login(vps, 22)


def test_4_every_sshd_drift_is_healed_while_pending(vps: Sandbox) -> None:
    heal_each(vps, sshd_drifts("PermitRootLogin yes"), lambda: baseline(vps, passwords="yes"))
    assert ssh_status(vps)["status"] == "pending" and password_login(vps, 2222)


def test_5_an_unchanged_pending_state_emits_nothing_new(vps: Sandbox) -> None:
    time.sleep(2)
    before = count(vps, REPEATED)
    for _ in range(3):
        vps.exec(["vps-agentctl", "converge", "ssh"], check=False)
    vps.exec(["touch", "/etc/ssh/sshd_config"])  # a watched file's metadata: a re-check, no change
    time.sleep(15)
    assert count(vps, REPEATED) == before


def test_6_a_key_added_but_never_used_leaves_passwords_on(vps: Sandbox) -> None:
    vps.install_key(port=2222)  # as ssh-copy-id does: over a password login
    time.sleep(8)
    assert baseline(vps, passwords="yes")
    assert ssh_status(vps)["status"] == "pending"
    assert "log in once with that key" in vps.exec(["vps-agentctl", "status"], check=False).stdout


def test_7_one_key_login_turns_passwords_off_within_10s(vps: Sandbox) -> None:
    started = time.monotonic()
    assert key_login(vps, 2222)
    wait_for("passwords off", lambda: baseline(vps, passwords="no"), 10)
    took = time.monotonic() - started
    wait_for("status exit 0", lambda: status_code(vps) == 0, 10, explain=lambda: status_text(vps))
    proven = [e for e in events(vps) if e["event"]["action"] == "key-login-proven"]
    assert proven and proven[-1]["user"]["name"] == "admin"
    assert not password_login(vps, 2222) and key_login(vps, 2222)
    print(f"\n[e2e] key login -> PasswordAuthentication no in {took:.1f}s")


def test_8_the_proof_outlives_a_restart(vps: Sandbox) -> None:
    vps.exec(["systemctl", "restart", "vps-agent"], timeout=RESTART_TIMEOUT)
    wait_for("the agent back and compliant", lambda: status_code(vps) == 0, 30)
    assert baseline(vps, passwords="no") and key_login(vps, 2222)


def guess_root_password(vps: Sandbox) -> None:
    """What a password guesser does once passwords are off: sshd offers none and logs `Connection closed by
    authenticating user root ... [preauth]`, which the jail counts only in its aggressive mode."""
    result = vps.ssh("true", user="root", port=2222, options=BAD_LOGIN, check=False, timeout=15)
    assert result.returncode != 0


def fail2ban_facts(vps: Sandbox) -> dict[str, Any]:
    controls = json.loads(vps.exec(["vps-agentctl", "status", "--json"], check=False).stdout)["controls"]
    facts: dict[str, Any] = next(c for c in controls if c["control"] == "fail2ban")["facts"]
    return facts


def test_9_a_password_guesser_is_banned_after_maxretry_with_passwords_off(vps: Sandbox) -> None:
    wait_for("the jail in aggressive mode", lambda: fail2ban_facts(vps).get("mode") == "aggressive", 30)
    assert "mode = aggressive" in vps.exec(["cat", "/etc/fail2ban/jail.d/zz-vps-agent.local"]).stdout
    if CLIENT_ADDR in banned(vps):
        vps.exec(["fail2ban-client", "set", "sshd", "unbanip", CLIENT_ADDR])
    attempts = 0
    while CLIENT_ADDR not in banned(vps):
        assert attempts < MAXRETRY, f"{attempts} guesses and {CLIENT_ADDR} is not banned"
        guess_root_password(vps)
        attempts += 1
        try:  # the journal reaches fail2ban a moment after ssh returns
            wait_for(f"{CLIENT_ADDR} banned", lambda: CLIENT_ADDR in banned(vps), 3 if attempts < MAXRETRY else 15)
        except AssertionError:
            continue
    assert not key_login(vps, 2222)  # banned: even the admin's key does not get through from there
    vps.exec(["fail2ban-client", "set", "sshd", "unbanip", CLIENT_ADDR])
    wait_for("the admin in again after the unban", lambda: key_login(vps, 2222), 20)


def test_10_a_live_admin_sessions_address_is_never_banned_even_after_failures_from_it(vps: Sandbox) -> None:
    ignoreip = ["fail2ban-client", "get", "sshd", "ignoreip"]
    session = vps.ssh_session(port=2222)
    try:
        wait_for("the session's address ignored", lambda: CLIENT_ADDR in vps.exec(ignoreip).stdout, 15)
        assert fail2ban_facts(vps)["admin_sessions_ignored"] == f"{CLIENT_ADDR} (admin)"
        for _ in range(MAXRETRY + 2):
            guess_root_password(vps)
        time.sleep(3)  # the journal reaches fail2ban a moment after ssh returns
        assert CLIENT_ADDR not in banned(vps)
        assert key_login(vps, 2222)
    finally:
        session.terminate()
        session.wait(30)
    wait_for("the address out of the ignore list", lambda: CLIENT_ADDR not in vps.exec(ignoreip).stdout, 20)


def test_11_a_local_user_cannot_get_an_address_banned_with_forged_sshd_lines(vps: Sandbox) -> None:
    """A copy of logger named sshd, run as nobody: journald records _COMM=sshd, which the filter's stock
    journalmatch (`_SYSTEMD_UNIT=sshd.service + _COMM=sshd`, an OR) takes as sshd's. The agent's match takes
    only sshd's own unit as root - the same lines that got the real guesser banned above."""
    victim = "10.213.0.77"
    match = vps.exec(["fail2ban-client", "get", "sshd", "journalmatch"]).stdout
    assert "_SYSTEMD_UNIT=ssh.service" in match and "_UID=0" in match and "_COMM=sshd" not in match, match
    vps.exec(["install", "-m", "0755", "/usr/bin/logger", "/tmp/sshd"])
    lines = "".join(f"Failed password for invalid user oracle from {victim} port {40000 + n} ssh2\n" for n in range(20))
    # one process that outlives its lines: journald reads _COMM from /proc while the sender still runs
    forge = f"(printf '%s' '{lines}'; sleep 2) | /tmp/sshd -t sshd"
    vps.exec(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", forge])
    forged = vps.exec(["journalctl", "_COMM=sshd", "-o", "cat", "--grep", victim]).stdout
    assert forged.count("Failed password for invalid user oracle") > MAXRETRY  # journald has them as sshd's
    time.sleep(5)  # the journal reaches fail2ban a moment after it is written
    assert victim not in banned(vps)


def penalty_lines(vps: Sandbox, since: str) -> list[str]:
    """sshd's own record of refusing a source address (OpenSSH 9.8+: `drop connection #0 from [A]:P on [B]:Q
    penalty: failed authentication`)."""
    out = vps.exec(["journalctl", "-u", "ssh", "-o", "cat", "--no-pager", "--since", since], check=False).stdout
    return [line for line in out.splitlines() if "penalty:" in line and CLIENT_ADDR in line]


def exempt(vps: Sandbox) -> list[str]:
    return sshd_effective(vps).get("persourcepenaltyexemptlist", ["none"])


def test_12_on_openssh_10_the_admins_own_address_is_exempt_from_sshds_penalties_while_logged_in(
    vps: Sandbox,
) -> None:
    """OpenSSH 9.8+ (Debian 13) refuses a source address for a while after failed logins (PerSourcePenalties,
    on by default): the admin mistyping in a second terminal would be shut out of the first's address. While
    a sudo admin's session lasts its address is in PerSourcePenaltyExemptList; once it ends, the same failures
    get the address refused by sshd - the last test of the module: the client stays refused afterwards."""
    if "persourcepenalties" not in sshd_effective(vps):  # Debian 12's OpenSSH 9.2: sshd -t would refuse it
        assert "PerSourcePenalty" not in vps.exec(["cat", "/etc/ssh/sshd_config.d/00-vps-agent.conf"]).stdout
        return
    assert exempt(vps) == ["none"]
    since = vps.exec(["date", "+%Y-%m-%d %H:%M:%S"]).stdout.strip()
    session = vps.ssh_session(port=2222)
    try:
        wait_for(
            "the session's address exempt in sshd",
            lambda: exempt(vps) == [CLIENT_ADDR],
            15,
            explain=lambda: str(exempt(vps)),
        )
        time.sleep(1)  # sshd -T reads the file; the agent's reload of the running sshd follows the write
        for _ in range(6):  # the admin's key offered for root: a failed authentication each (authfail: 5 s)
            assert vps.ssh("true", user="root", port=2222, check=False, timeout=15).returncode != 0
        assert key_login(vps, 2222), "the admin is refused from the address of their own live session"
        assert penalty_lines(vps, since) == []
    finally:
        session.terminate()
        session.wait(30)
    wait_for(
        "the address no longer exempt",
        lambda: exempt(vps) == ["none"],
        20,
    )
    # the control: without the exemption the same failures are penalised (fail2ban stopped, so that its ban
    # cannot hide the connections from sshd)
    vps.exec(["vps-agentctl", "pause", "fail2ban"])
    vps.exec(["systemctl", "stop", "fail2ban"])
    for _ in range(8):
        vps.ssh("true", user="root", port=2222, check=False, timeout=15)
        if penalty_lines(vps, since):
            break
    assert penalty_lines(vps, since), "sshd never penalised the failures: the exemption above proved nothing"

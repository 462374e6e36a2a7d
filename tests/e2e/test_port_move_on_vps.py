"""The two-phase SSH port move on a booted Debian 12 VPS with the .deb installed: 22 -> 2222 confirmed by
a real login from the client namespace, rolled back when nobody confirms, and made safe when the
firewall guard only reports (and so never opens the new port). And the port sshd listens on, as the
installed unit (no CAP_SYS_PTRACE) reads it, kept open by the firewall with the SSH guard off."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.sandbox import Sandbox
from tests.e2e.test_agent_on_vps import (
    agent_vps,
    client_connects,
    events,
    firewall_in_place,
    firewall_status,
    main_pid,
    sshd_effective,
    wait_for,
)

CAP_SYS_PTRACE = 19


def config(port: int, *, confirm: str = "10m", firewall: str = "enforce") -> str:
    return (
        f"ssh:\n  port: {port}\n  confirm_timeout: {confirm}\n  permit_root_login: 'no'\n"
        f"  password_authentication: false\nfirewall:\n  mode: {firewall}\n"
    )


def apply(vps: Sandbox, text: str) -> None:
    vps.exec(["sh", "-c", "cat > /etc/vps-agent/config.yaml"], input=text)
    vps.exec(["systemctl", "reload", "vps-agent"])


def ports(vps: Sandbox) -> list[str]:
    return sorted(sshd_effective(vps)["port"], key=int)


def status(vps: Sandbox) -> dict[str, Any]:
    result = vps.exec(["vps-agentctl", "status", "--json"], check=False)
    data: dict[str, Any] = json.loads(result.stdout)
    data["exit_code"] = result.returncode
    return data


def fail2ban_ports(vps: Sandbox) -> str:
    actions = vps.exec(["fail2ban-client", "get", "sshd", "actions"], check=False).stdout.split()
    if not actions:
        return ""
    return vps.exec(["fail2ban-client", "get", "sshd", "action", actions[-1], "port"], check=False).stdout.strip()


def logs_in(vps: Sandbox, port: int) -> bool:
    return vps.ssh("id -un", port=port, check=False, timeout=20).stdout.strip() == "admin"


def sshd_state(vps: Sandbox) -> str:
    listening = vps.exec(["ss", "-Hltn"], check=False).stdout
    journal = vps.exec(["journalctl", "-q", "-n", "30", "-u", "ssh.service", "-u", "vps-agent"], check=False).stdout
    return f"listening:\n{listening}\njournal:\n{journal}"


def since(vps: Sandbox, mark: int, action: str) -> list[dict[str, Any]]:
    return [e for e in events(vps)[mark:] if e["event"]["action"] == action]


@pytest.fixture
def vps(tmp_path_factory: pytest.TempPathFactory, release: str) -> Iterator[Sandbox]:
    """A fresh VPS per test: each starts from sshd on 22."""
    with agent_vps(tmp_path_factory, "vps-port-move", release=release) as sandbox:
        wait_for("the admin on 22", lambda: logs_in(sandbox, 22), 30)
        yield sandbox


def test_a_move_confirmed_by_a_real_login_closes_the_old_port(vps: Sandbox) -> None:
    mark = len(events(vps))
    apply(vps, config(2222))
    # phase one: sshd on both, the firewall accepts both, fail2ban watches both; 22 still works
    wait_for("sshd on 22 and 2222", lambda: ports(vps) == ["22", "2222"])
    wait_for("fail2ban on both ports", lambda: fail2ban_ports(vps) == "22,2222", 30)
    move = status(vps)
    assert move["exit_code"] == 1 and move["port_move"]["phase"] == "open", move
    assert logs_in(vps, 22)
    assert since(vps, mark, "port-move-started")
    # forgeries prove nothing: sshd's lines written by nobody to /dev/log, and a user name carrying them
    forged = [
        'Connection from 10.213.0.2 port 40000 on 10.213.0.1 port 2222 rdomain ""',
        "Accepted password for admin from 10.213.0.2 port 40000 ssh2",
    ]
    for line in forged:
        vps.exec(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "logger", "-t", "sshd", line])
    name = "x Accepted password for admin from 10.213.0.2 port 40000 ssh2"
    vps.ssh("true", user=name, port=2222, check=False, timeout=15)
    assert "Accepted password for admin" in vps.exec(["journalctl", "-t", "sshd", "-o", "cat"]).stdout
    time.sleep(6)  # the watcher reads sshd's journal every 2 s
    assert status(vps)["port_move"]["phase"] == "open" and ports(vps) == ["22", "2222"]
    assert not since(vps, mark, "port-move-confirmed")
    # the proof: the admin logs in on 2222
    assert logs_in(vps, 2222)
    wait_for("the move to be confirmed", lambda: bool(since(vps, mark, "port-move-confirmed")), 20)
    [confirmed] = since(vps, mark, "port-move-confirmed")
    assert "a login on port 2222: admin from 10.213.0.2" in str(confirmed["message"]), confirmed
    wait_for("sshd on 2222 only", lambda: ports(vps) == ["2222"])
    wait_for("the old port closed to the client", lambda: not client_connects(vps, 22), 30)
    wait_for("fail2ban on 2222 only", lambda: fail2ban_ports(vps) == "2222", 30)
    wait_for("status compliant, no move", lambda: status(vps)["exit_code"] == 0, 30)
    assert status(vps)["port_move"] is None
    assert logs_in(vps, 2222)


def test_a_move_nobody_confirms_rolls_back_to_the_old_port(vps: Sandbox) -> None:
    mark = len(events(vps))
    apply(vps, config(2222, confirm="15s"))
    wait_for("sshd on 22 and 2222", lambda: ports(vps) == ["22", "2222"])
    # nobody logs in on 2222: after 15 s everything returns to 22
    wait_for("the rollback", lambda: bool(since(vps, mark, "port-move-rolled-back")), 40)
    wait_for("sshd on 22 only", lambda: ports(vps) == ["22"])
    wait_for("2222 closed to the client", lambda: not client_connects(vps, 2222), 30)
    assert logs_in(vps, 22)
    rolled = status(vps)
    assert rolled["port_move"]["phase"] == "rolled-back" and rolled["exit_code"] == 1, rolled
    text = vps.exec(["vps-agentctl", "status"], check=False).stdout
    assert "ROLLED BACK" in text and "sshd stays on 22" in text, text
    # a SIGHUP with the same config (logrotate does that) does not try again
    vps.exec(["systemctl", "reload", "vps-agent"])
    assert ports(vps) == ["22"]


def test_with_the_firewall_only_reporting_an_unreachable_new_port_rolls_back(vps: Sandbox) -> None:
    # the firewall guard reports only: the rules in place (from install: 22 accepted, INPUT DROP) stay,
    # so 2222 never gets through. The move must not lock the admin out: no login, no proof, rollback.
    apply(vps, config(22, firewall="report"))
    wait_for("the firewall in report mode", lambda: "report" in vps.exec(["vps-agentctl", "status"]).stdout, 30)
    mark = len(events(vps))
    apply(vps, config(2222, confirm="15s", firewall="report"))
    wait_for("sshd on 22 and 2222", lambda: ports(vps) == ["22", "2222"])
    assert not client_connects(vps, 2222)  # dropped by the firewall the agent does not change
    firewall = next(c for c in status(vps)["controls"] if c["control"] == "firewall")
    # reported, not applied: the agent's chain would need a fifth rule (2222), and 22 alone is accepted
    assert firewall["status"] == "drifted" and firewall["drift"], firewall
    assert firewall["facts"]["ssh_ports_accepted"] == "22" and firewall["facts"]["mode"] == "report", firewall
    assert logs_in(vps, 22)
    wait_for("the rollback", lambda: bool(since(vps, mark, "port-move-rolled-back")), 40)
    wait_for("sshd on 22 only", lambda: ports(vps) == ["22"])
    # `sshd -T` reads the file the agent wrote; the running sshd re-executes on the reload that follows
    # and refuses connections for that moment: the admin gets in once it listens again
    wait_for("the admin on 22 after the rollback", lambda: logs_in(vps, 22), 30, explain=lambda: sshd_state(vps))


def test_with_the_ssh_guard_off_the_firewall_keeps_the_port_sshd_listens_on(vps: Sandbox) -> None:
    """The unit withholds CAP_SYS_PTRACE, so sshd's sockets are hidden from the agent: its port comes
    from sshd -T and the listening sockets. Before, this firewall accepted no SSH port at all."""
    status_line = next(
        line
        for line in vps.exec(["cat", f"/proc/{main_pid(vps)}/status"]).stdout.splitlines()
        if line.startswith("CapBnd:")
    )
    assert not int(status_line.split()[1], 16) & (1 << CAP_SYS_PTRACE), status_line
    mark = len(events(vps))
    apply(vps, "ssh:\n  enabled: false\n")
    wait_for("the config without the SSH guard", lambda: bool(since(vps, mark, "config-reloaded")), 30)
    vps.exec(["vps-agentctl", "converge", "firewall"], check=False)
    firewall = firewall_status(vps)
    assert firewall["facts"]["ssh_ports_accepted"] == "22", firewall
    assert firewall_in_place(vps) and client_connects(vps, 22)
    assert logs_in(vps, 22)

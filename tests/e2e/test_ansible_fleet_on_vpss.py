"""One ansible-playbook for three booted VPSs at once, two Debian 12 and one Debian 13, the way a fleet is
run: the role installs and configures all three, a second run changes nothing on any, a bad value is
refused on every host and changes none, a drift on one host is healed and shown by the fleet report, and
a guard left drifted in report mode on another fails it, naming that host only.

Every sandbox VPS is 10.213.0.1 in a client namespace of its own, so each host's SSH goes through a
ProxyCommand that relays it from that namespace (`sandbox client ROOT -- python3 relay.py`); each host
has its own key, pinned host keys and sudo password. The port move is tested on one VPS
(test_ansible_role_on_vps.py): its wait_for runs on the controller, which here is in no client namespace."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_root_and_tools
from tests.debs import BUILD_TOOLS, REPO, built_deb
from tests.e2e.sandbox import SCRIPT, VPS_ADDR, Sandbox
from tests.e2e.test_agent_on_vps import wait_for

COLLECTION = REPO / "packaging" / "ansible"
TOOLS = ("debootstrap", "unshare", "nsenter", "ip", "ssh", "ansible-playbook", "ansible-galaxy", *BUILD_TOOLS)
FLEET = {"vps1": "bookworm", "vps2": "bookworm", "vps3": "trixie"}
CONFIG = "/etc/vps-agent/config.yaml"
RELAY = """import os, socket, sys, threading
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
sock.settimeout(None)
def upstream():
    while data := os.read(0, 65536):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
threading.Thread(target=upstream, daemon=True).start()
while data := sock.recv(65536):
    os.write(1, data)
"""


@dataclass
class Fleet:
    home: Path
    hosts: dict[str, Sandbox]
    deb: Path

    def inventory(self) -> Path:
        lines = ["[fleet]"]
        relay = self.home / "relay.py"
        for name, vps in self.hosts.items():
            proxy = f"{SCRIPT} client {vps.root} -- /usr/bin/python3 {relay} {VPS_ADDR} %p"
            ssh_args = [
                "-F", "/dev/null", "-o", f"IdentityFile={vps.key}", "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={vps.client_dir / 'known_hosts'}", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "HostKeyAlias=vps", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                "-o", f"ProxyCommand={proxy}",
            ]  # fmt: skip
            host = {
                "ansible_host": name,  # never resolved (the ProxyCommand connects); distinct control paths
                "ansible_user": "admin",
                "ansible_ssh_common_args": shlex.join(ssh_args),
                "ansible_become_password": vps.password,
                "ansible_python_interpreter": "/usr/bin/python3",
            }
            lines.append(name + " " + " ".join(f"{k}={shlex.quote(v)}" for k, v in host.items()))
        path = self.home / "inventory.ini"
        path.write_text("\n".join(lines) + "\n")
        return path

    def playbook(self, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
        env = {
            "ANSIBLE_HOME": str(self.home / "ansible"),
            "ANSIBLE_LOCAL_TEMP": str(self.home / "tmp"),
            "ANSIBLE_COLLECTIONS_PATH": str(self.home / "collections"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.home / "cp"),
            "ANSIBLE_FORKS": "3",
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        }
        argv = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), "ansible-playbook", "-i", str(self.inventory())]
        argv += [f"vps_agent.vps_agent.{name}", "-e", f"vps_agent_deb={self.deb}"]
        argv += ["-e", "vps_agent_fail2ban_maxretry=3"]
        for value in extra:
            argv += ["-e", value]
        return subprocess.run(argv, capture_output=True, text=True, timeout=900)


def recaps(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, int]]:
    found = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^(vps\d)\s+:(.*)$", line)
        if match:
            found[match[1]] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match[2])}
    return found


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n{result.stdout[-10000:]}\n{result.stderr[-3000:]}"


def control(vps: Sandbox, name: str) -> dict[str, object]:
    status = json.loads(vps.exec(["vps-agentctl", "status", "--json"], check=False).stdout)
    found: dict[str, object] = next(c for c in status["controls"] if c["control"] == name)
    return found


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    require_root_and_tools(*TOOLS)
    home = tmp_path_factory.mktemp("ansible-fleet")
    (home / "relay.py").write_text(RELAY)
    build = subprocess.run(
        ["ansible-galaxy", "collection", "build", str(COLLECTION), "--output-path", str(home / "dist")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    [tarball] = (home / "dist").glob("vps_agent-vps_agent-*.tar.gz")
    install = subprocess.run(
        ["ansible-galaxy", "collection", "install", str(tarball), "-p", str(home / "collections")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    hosts = {name: Sandbox(home / name / "root", release) for name, release in FLEET.items()}
    try:
        for vps in hosts.values():
            vps.create(debs=[])
            vps.boot()
        yield Fleet(home, hosts, built_deb())
    finally:
        for vps in hosts.values():
            vps.destroy()


def test_the_role_installs_and_configures_every_host(fleet: Fleet) -> None:
    run = fleet.playbook("deploy")
    assert run.returncode == 0, explain(run)
    assert {name: counts["changed"] > 0 for name, counts in recaps(run).items()} == dict.fromkeys(FLEET, True)
    for name, vps in fleet.hosts.items():
        assert vps.exec(["systemctl", "is-active", "vps-agent"]).stdout.strip() == "active", name
        assert "maxretry: 3" in vps.exec(["cat", CONFIG]).stdout, name
    trixie = fleet.hosts["vps3"].exec(["cat", "/etc/debian_version"]).stdout
    assert trixie.startswith("13"), trixie


def test_a_second_run_changes_nothing_on_any_host(fleet: Fleet) -> None:
    run = fleet.playbook("deploy")
    assert run.returncode == 0, explain(run)
    assert {name: counts["changed"] for name, counts in recaps(run).items()} == dict.fromkeys(FLEET, 0), explain(run)


def test_a_bad_value_is_refused_on_every_host_and_changes_none(fleet: Fleet) -> None:
    before = {name: vps.exec(["cat", CONFIG]).stdout for name, vps in fleet.hosts.items()}
    run = fleet.playbook("deploy", json.dumps({"vps_agent_updates_schedule": "every full moon"}))
    assert run.returncode != 0, explain(run)
    assert {name: counts["failed"] for name, counts in recaps(run).items()} == dict.fromkeys(FLEET, 1), explain(run)
    assert len(re.findall(r":\d+:\d+: updates\.schedule: ", run.stdout)) >= len(FLEET), explain(run)
    assert {name: vps.exec(["cat", CONFIG]).stdout for name, vps in fleet.hosts.items()} == before


def test_a_drift_on_one_host_is_healed_and_shown_by_the_report(fleet: Fleet) -> None:
    vps2 = fleet.hosts["vps2"]
    before = int(control(vps2, "ssh")["heals"])  # type: ignore[call-overload]
    vps2.exec(["sed", "-i", "1i PermitRootLogin yes", "/etc/ssh/sshd_config"])
    wait_for("vps2's heal", lambda: int(control(vps2, "ssh")["heals"]) == before + 1, 30)  # type: ignore[call-overload]
    report = fleet.playbook("report")
    assert report.returncode == 0, explain(report)
    rows = {}
    for line in report.stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip().strip('",'))
        if len(cells) > 4 and cells[1] == "ssh":
            rows[cells[0]] = cells
    assert sorted(rows) == sorted(FLEET), report.stdout
    assert rows["vps2"][4] == str(before + 1) and rows["vps2"][5].endswith("Z"), rows
    assert "3 hosts, none blocked or drifted" in report.stdout


def test_a_guard_left_drifted_in_report_mode_fails_the_report_naming_that_host(fleet: Fleet) -> None:
    report_mode = json.dumps({"vps_agent_config_extra": {"sysctl": {"mode": "report"}}})
    run = fleet.playbook("deploy", report_mode)
    assert run.returncode == 0, explain(run)
    vps3 = fleet.hosts["vps3"]
    vps3.exec(["sysctl", "-q", "-w", "net.ipv4.conf.all.log_martians=0"])
    wait_for("vps3's sysctl guard to report drift", lambda: control(vps3, "sysctl")["status"] == "drifted", 30)
    report = fleet.playbook("report")
    assert report.returncode != 0, explain(report)
    assert "vps3: sysctl drifted" in report.stdout and "vps1: " not in report.stdout, explain(report)
    assert "vps2: " not in report.stdout

"""The Ansible collection vps_agent.vps_agent on a booted VPS: Debian's ansible-playbook runs from the
client's network namespace (the admin's laptop) over real SSH with the sandbox's key, against a fresh
Debian without the agent. The role installs and configures it, changes nothing the second time, lets
the agent's own validate-config refuse a bad value, moves SSH to 2222 through its two-phase step without
locking anybody out; the fleet report shows a heal and fails on a guard left drifted in report mode.

One VPS for the module (per release); the tests run in file order, each from where the last left it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_root_and_tools
from tests.debs import BUILD_TOOLS, REPO, built_deb
from tests.e2e.sandbox import CLIENT_ADDR, SCRIPT, VPS_ADDR, Sandbox
from tests.e2e.test_agent_on_vps import client_connects, events, sshd_effective, wait_for
from tests.integration.test_event_outputs import Rsyslog

COLLECTION = REPO / "packaging" / "ansible"
TOOLS = ("debootstrap", "unshare", "nsenter", "ip", "ssh", "ansible-playbook", "ansible-galaxy", *BUILD_TOOLS)
CONFIG = "/etc/vps-agent/config.yaml"
ADMIN_VARS = ("vps_agent_fail2ban_maxretry=3", "vps_agent_accounts_admin_user=admin")  # every run's


@dataclass
class Controller:
    """The admin's side: the collection built and installed into a directory of its own, an inventory."""

    vps: Sandbox
    home: Path
    deb: Path
    port: int = 22

    @property
    def collections(self) -> Path:
        return self.home / "collections"

    def inventory(self) -> Path:
        path = self.home / "inventory.ini"
        host = {
            "ansible_host": VPS_ADDR,
            "ansible_port": str(self.port),
            "ansible_user": "admin",
            "ansible_ssh_common_args": f"-F {self.vps.ssh_config}",
            "ansible_become_password": self.vps.password,
            "ansible_python_interpreter": "/usr/bin/python3",
        }
        path.write_text("[fleet]\nvps " + " ".join(f"{k}={shlex.quote(v)}" for k, v in host.items()) + "\n")
        return path

    def playbook(self, name: str, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """ansible-playbook vps_agent.vps_agent.NAME in the client's namespace; extra: `-e` values."""
        env = {
            "ANSIBLE_HOME": str(self.home / "ansible"),
            "ANSIBLE_LOCAL_TEMP": str(self.home / "tmp"),
            "ANSIBLE_COLLECTIONS_PATH": str(self.collections),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.home / "cp"),
        }
        argv = ["env", *(f"{k}={v}" for k, v in env.items()), "ansible-playbook", "-i", str(self.inventory())]
        argv += [f"vps_agent.vps_agent.{name}", "-e", f"vps_agent_deb={self.deb}"]
        for value in (*ADMIN_VARS, f"vps_agent_ssh_port={self.port}", *extra):  # a later -e wins
            argv += ["-e", value]
        return self.vps.client(argv, check=False, timeout=timeout)


def recap(result: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """The PLAY RECAP's counters for the host vps."""
    line = next(line for line in result.stdout.splitlines() if re.match(r"^vps\s+:", line))
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", line)}


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n{result.stdout[-8000:]}\n{result.stderr[-3000:]}"


def config_digest(vps: Sandbox) -> str:
    return hashlib.sha256(vps.exec(["cat", CONFIG]).stdout.encode()).hexdigest()


def status(vps: Sandbox) -> dict[str, object]:
    data: dict[str, object] = json.loads(vps.exec(["vps-agentctl", "status", "--json"], check=False).stdout)
    return data


def control(vps: Sandbox, name: str) -> dict[str, object]:
    controls: list[dict[str, object]] = status(vps)["controls"]  # type: ignore[assignment]
    return next(c for c in controls if c["control"] == name)


def table_row(result: subprocess.CompletedProcess[str], guard: str) -> list[str]:
    """The report's row for the host's guard, split on runs of two or more spaces (the debug task prints
    each table line as a JSON string)."""
    for line in result.stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip().strip('",'))
        if len(cells) > 2 and cells[0] == "vps" and cells[1] == guard:
            return cells
    raise AssertionError(f"no row for {guard} in the report:\n{result.stdout}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, release: str) -> Iterator[Controller]:
    """A plain Debian VPS (no vps-agent), booted, and a controller with the collection built and installed."""
    require_root_and_tools(*TOOLS)
    home = tmp_path_factory.mktemp(f"ansible-{release}")
    deb = built_deb()
    build = subprocess.run(
        ["ansible-galaxy", "collection", "build", str(COLLECTION), "--output-path", str(home / "dist")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    [tarball] = (home / "dist").glob("vps_agent-vps_agent-*.tar.gz")
    install = subprocess.run(
        ["ansible-galaxy", "collection", "install", str(tarball), "-p", str(home / "collections")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    vps = Sandbox(home / "vps" / "root", release)
    vps.create(debs=[])
    try:
        vps.boot()
        shutil.copy(deb, home / deb.name)
        yield Controller(vps, home, home / deb.name)
    finally:
        vps.destroy()


def test_the_role_installs_and_configures_a_fresh_host(fleet: Controller) -> None:
    vps = fleet.vps
    assert vps.exec(["dpkg-query", "-W", "vps-agent"], check=False).returncode != 0  # a plain Debian
    run = fleet.playbook("deploy")
    assert run.returncode == 0, explain(run)
    assert vps.exec(["systemctl", "is-active", "vps-agent"]).stdout.strip() == "active"
    text = vps.exec(["cat", CONFIG]).stdout
    assert "maxretry: 3" in text and "admin_user: admin" in text, text
    # the agent started with the templated config, not the package's: no reload was needed to apply it
    wait_for("fail2ban's maxretry 3", lambda: vps.exec(["fail2ban-client", "get", "sshd", "maxretry"], check=False)
             .stdout.strip() == "3", 60)  # fmt: skip
    # ansible's own key login proved the admin's key: passwords go off, nothing is pending
    wait_for(
        "the agent compliant",
        lambda: vps.exec(["vps-agentctl", "status"], check=False).returncode == 0,
        60,
        lambda: vps.exec(["vps-agentctl", "status"], check=False).stdout,
    )
    assert sshd_effective(vps)["passwordauthentication"] == ["no"]
    assert not [e for e in events(vps) if e["event"]["action"] == "config-reloaded"]


def test_a_second_run_changes_nothing(fleet: Controller) -> None:
    run = fleet.playbook("deploy")
    assert run.returncode == 0, explain(run)
    counts = recap(run)
    assert counts["changed"] == 0 and counts["failed"] == 0, explain(run)


def test_a_bad_value_is_refused_by_the_agents_own_check_and_nothing_changes(fleet: Controller) -> None:
    vps = fleet.vps
    before = config_digest(vps)
    run = fleet.playbook("deploy", "vps_agent_fail2ban_findtime=10x")
    assert run.returncode != 0 and recap(run)["failed"] == 1, explain(run)
    # vps-agentctl validate-config's own line: the checked file, the line, the key, what it expected
    assert re.search(r":\d+:\d+: fail2ban\.findtime: expected ", run.stdout), explain(run)
    assert config_digest(vps) == before
    assert vps.exec(["vps-agentctl", "status"], check=False).returncode == 0


def test_moving_the_port_without_the_move_step_is_refused(fleet: Controller) -> None:
    vps = fleet.vps
    before = config_digest(vps)
    run = fleet.playbook("deploy", "vps_agent_ssh_port=2222")
    assert run.returncode != 0, explain(run)
    assert "moving the SSH port is refused without the role's port-move step" in run.stdout, explain(run)
    assert config_digest(vps) == before and sshd_effective(vps)["port"] == ["22"]


def test_the_port_moves_to_2222_through_the_roles_step_and_nobody_is_locked_out(fleet: Controller) -> None:
    vps = fleet.vps
    mark = len(events(vps))
    run = fleet.playbook("deploy", "vps_agent_ssh_port=2222", "vps_agent_ssh_port_move=true")
    assert run.returncode == 0, explain(run)
    actions = [e["event"]["action"] for e in events(vps)[mark:]]
    assert "port-move-started" in actions and "port-move-confirmed" in actions, actions
    assert sshd_effective(vps)["port"] == ["2222"]
    assert vps.ssh("id -un", port=2222).stdout.strip() == "admin"
    assert not client_connects(vps, 22)
    # the inventory follows; the next run on 2222 finds nothing to do
    fleet.port = 2222
    again = fleet.playbook("deploy")
    assert again.returncode == 0 and recap(again)["changed"] == 0, explain(again)


def test_the_report_shows_a_heal(fleet: Controller) -> None:
    vps = fleet.vps
    before = int(control(vps, "ssh")["heals"])  # type: ignore[call-overload]
    vps.exec(["sed", "-i", "1i PermitRootLogin yes", "/etc/ssh/sshd_config"])
    wait_for("the SSH guard's heal", lambda: int(control(vps, "ssh")["heals"]) == before + 1, 30)  # type: ignore[call-overload]
    report = fleet.playbook("report")
    assert report.returncode == 0, explain(report)
    row = table_row(report, "ssh")
    assert row[2] in ("healed", "compliant") and row[4] == str(before + 1) and row[5].endswith("Z"), row
    assert "none blocked or drifted" in report.stdout, explain(report)


def test_the_report_fails_on_a_guard_in_report_mode_left_drifted(fleet: Controller) -> None:
    vps = fleet.vps
    report_mode = json.dumps({"vps_agent_config_extra": {"sysctl": {"mode": "report"}}})
    run = fleet.playbook("deploy", report_mode)
    assert run.returncode == 0, explain(run)
    vps.exec(["sysctl", "-q", "-w", "net.ipv4.conf.all.log_martians=0"])
    wait_for("the sysctl guard to report drift", lambda: control(vps, "sysctl")["status"] == "drifted", 30)
    report = fleet.playbook("report")
    assert report.returncode != 0, explain(report)
    assert table_row(report, "sysctl")[2] == "drifted"
    assert "vps: sysctl drifted" in report.stdout, explain(report)
    # back to enforce: healed, and the report passes again
    run = fleet.playbook("deploy")
    assert run.returncode == 0, explain(run)
    wait_for("the sysctl guard compliant", lambda: control(vps, "sysctl")["status"] in ("healed", "compliant"), 30)
    assert fleet.playbook("report").returncode == 0


def test_the_prometheus_targets_playbook_lists_each_hosts_node_exporter(fleet: Controller) -> None:
    # a play on the controller only: it writes one file, in the test's directory
    targets = fleet.home / "vps-agent-targets.yml"
    run = fleet.playbook("prometheus_targets", f"vps_agent_targets_file={targets}")
    assert run.returncode == 0, explain(run)
    assert yaml.safe_load(targets.read_text()) == [{"targets": [f"{VPS_ADDR}:9100"], "labels": {"instance": "vps"}}]


def test_events_reach_one_rsyslog_collector_as_json_lines_with_the_host_name(fleet: Controller) -> None:
    """Debian's rsyslogd on the shipped snippet, in the client's namespace (the collector box, on its own
    config, pidfile and directory); the role points the agent's events.syslog at it over TCP."""
    require_root_and_tools("rsyslogd", "ss")
    vps = fleet.vps
    holder = subprocess.Popen(  # a process in the client's namespace, for nsenter -t to join
        [str(SCRIPT), "client", str(vps.root), "--", "sleep", "600"], stdin=subprocess.DEVNULL
    )
    collector = Rsyslog(fleet.home / "rsyslog", holder.pid, 5514)
    try:
        wait_for("the client namespace", lambda: holder.poll() is None and _in_netns(holder.pid), 10)
        collector.start()
        syslog = {"events": {"syslog": {"target": f"tcp://{CLIENT_ADDR}:5514"}}}
        run = fleet.playbook("deploy", json.dumps({"vps_agent_config_extra": syslog}))
        assert run.returncode == 0, explain(run)
        wait_for("the agent connected to the collector", lambda: _syslog_connected(vps), 30)
        vps.exec(["sed", "-i", "1i PermitRootLogin yes", "/etc/ssh/sshd_config"])

        def healed_line() -> bool:
            return any(m["rfc5424-sd"]["vps-agent@32473"].get("event.action") == "drift-reverted"
                       for m in collector.received())  # fmt: skip

        wait_for("the heal's event at the collector", healed_line, 30, lambda: str(collector.received()[-5:]))
        files = sorted(p.name for p in collector.out.glob("*.jsonl"))
        assert files == ["vps.jsonl"], files
        for message in collector.received():
            # host.name: in the RFC 5424 header (the snippet writes it as "host") and in the structured data
            sd = message["rfc5424-sd"]["vps-agent@32473"]
            assert message["host"] == "vps" and sd["host.name"] == "vps" and message["msgid"], message
    finally:
        collector.stop()
        holder.terminate()
        holder.wait(10)
        fleet.playbook("deploy")  # events.syslog off again


def _in_netns(pid: int) -> bool:
    net = Path(f"/proc/{pid}/ns/net")
    return net.exists() and os.readlink(net) != os.readlink("/proc/self/ns/net")


def _syslog_connected(vps: Sandbox) -> bool:
    outputs: dict[str, dict[str, object]] = status(vps).get("outputs") or {}  # type: ignore[assignment]
    return bool((outputs.get("syslog") or {}).get("connected"))

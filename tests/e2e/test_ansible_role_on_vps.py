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
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require_root_and_tools
from tests.debs import BUILD_TOOLS, REPO, built_deb
from tests.e2e.sandbox import CLIENT_ADDR, RESTART_TIMEOUT, SCRIPT, VPS_ADDR, Sandbox
from tests.e2e.test_agent_on_vps import client_connects, events, sshd_effective, wait_for
from tests.integration.harness import in_netns_of
from tests.integration.test_event_outputs import Rsyslog

COLLECTION = REPO / "packaging" / "ansible"
PROMETHEUS = REPO / "packaging" / "prometheus"
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


@contextmanager
def collector_box(vps: Sandbox) -> Iterator[int]:
    """A process in the client's network namespace (the collector box: rsyslog, Prometheus), its pid for
    nsenter -t to join; it ends with the block."""
    holder = subprocess.Popen([str(SCRIPT), "client", str(vps.root), "--", "sleep", "900"], stdin=subprocess.DEVNULL)
    try:
        wait_for("the client namespace", lambda: holder.poll() is None and _in_netns(holder.pid), 10)
        in_netns_of(holder.pid, "ip", "link", "set", "lo", "up")
        yield holder.pid
    finally:
        holder.terminate()
        holder.wait(10)


def test_events_reach_one_rsyslog_collector_as_json_lines_with_the_host_name(fleet: Controller) -> None:
    """Debian's rsyslogd on the shipped snippet, in the client's namespace (the collector box, on its own
    config, pidfile and directory); the role points the agent's events.syslog at it over TCP."""
    require_root_and_tools("rsyslogd", "ss")
    vps = fleet.vps
    with collector_box(vps) as box:
        collector = Rsyslog(fleet.home / "rsyslog", box, 5514)
        try:
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
            fleet.playbook("deploy")  # events.syslog off again


class Prometheus:
    """Debian's prometheus in the collector box on the shipped packaging/prometheus/ files (copied with
    their links followed, as docs/fleet.md says) and the targets playbook's file. Two things differ from
    the shipped files, both only to make the test take seconds: every interval is 1 s, and the alert
    VpsAgentControlNonCompliant fires after 5 s, not 15 minutes (its expression is the shipped one)."""

    def __init__(self, workdir: Path, netns_pid: int, targets: Path) -> None:
        self.workdir, self.netns_pid = workdir, netns_pid
        workdir.mkdir(parents=True, exist_ok=True)
        for source in PROMETHEUS.glob("*.yml"):
            text = source.read_text()  # read_text follows vps-agent-alerts.yml's link, as cp -L does
            if source.name == "prometheus.yml":
                text = re.sub(r"(scrape_interval|evaluation_interval|refresh_interval): \S+", r"\1: 1s", text)
            if source.name == "vps-agent-alerts.yml":
                rule = text.index("alert: VpsAgentControlNonCompliant")
                text = text[:rule] + text[rule:].replace("for: 15m", "for: 5s", 1)
            (workdir / source.name).write_text(text)
        shutil.copy(targets, workdir / "vps-agent-targets.yml")
        check = subprocess.run(["promtool", "check", "config", str(workdir / "prometheus.yml")],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = ["nsenter", "-t", str(self.netns_pid), "-n", "prometheus",
                f"--config.file={self.workdir / 'prometheus.yml'}", f"--storage.tsdb.path={self.workdir / 'data'}",
                "--web.listen-address=127.0.0.1:9090"]  # fmt: skip
        log = (self.workdir / "prometheus.log").open("ab")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for("prometheus ready", lambda: self.get("/-/ready") is not None, 30, self.log)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)

    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")[-3000:]

    def get(self, path: str) -> Any:
        """GET http://127.0.0.1:9090PATH from inside the box: the decoded JSON (None while it is not up)."""
        fetched = in_netns_of(self.netns_pid, "python3", "-c", FETCH, f"http://127.0.0.1:9090{path}")
        return json.loads(fetched.stdout) if fetched.returncode == 0 else None

    def value(self, expr: str) -> float | None:
        answer = self.get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        result = answer["data"]["result"] if answer else []
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def firing(self) -> list[dict[str, str]]:
        answer = self.get("/api/v1/alerts")
        alerts = answer["data"]["alerts"] if answer else []
        return [alert["labels"] for alert in alerts if alert["state"] == "firing"]


FETCH = """import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as answer:
    body = answer.read()
print(json.dumps(json.loads(body)) if body.strip()[:1] in (b"{", b"[") else json.dumps(body.decode()))
"""


def test_prometheus_scrapes_the_hosts_node_exporter_counts_a_heal_and_fires_an_alert(fleet: Controller) -> None:
    """The agent's textfile through Debian's node_exporter on the VPS (this machine's binary, run as a
    transient unit: the VPS has no route to a mirror), the role opening 9100 to the Prometheus box only,
    scraped by a real Prometheus: a heal is vps_agent_heals_total up by one for the host, and a guard left
    drifted in report mode fires the shipped alert for that host and guard, which resolves once healed."""
    require_root_and_tools("prometheus", "promtool", "prometheus-node-exporter")
    vps = fleet.vps
    targets = fleet.home / "vps-agent-targets.yml"  # written by the targets playbook's test
    assert targets.exists(), "the prometheus_targets playbook's test did not run"
    shutil.copy("/usr/bin/prometheus-node-exporter", vps.root / "usr/local/sbin/node_exporter")
    # what the package would leave: its textfile directory; the agent, started before it existed, is
    # restarted to get it writable, as docs/operations.md says of node_exporter installed after the agent
    vps.exec(["install", "-d", "-m", "0755", "/var/lib/prometheus/node-exporter"])
    vps.exec(["systemctl", "restart", "vps-agent"], timeout=RESTART_TIMEOUT)
    vps.exec(["systemd-run", "--unit=node-exporter", "/usr/local/sbin/node_exporter", "--web.listen-address=:9100",
              "--collector.disable-defaults", "--collector.textfile",
              "--collector.textfile.directory=/var/lib/prometheus/node-exporter"])  # fmt: skip
    open_9100 = {"vps_agent_firewall_allow_tcp": [{"port": 9100, "from": [f"{CLIENT_ADDR}/32"]}]}
    report_mode = {**open_9100, "vps_agent_config_extra": {"sysctl": {"mode": "report"}}}
    with collector_box(vps) as box:
        prometheus = Prometheus(fleet.home / "prometheus", box, targets)
        try:
            run = fleet.playbook("deploy", json.dumps(open_9100))
            assert run.returncode == 0, explain(run)
            prometheus.start()
            heals = 'vps_agent_heals_total{job="vps-agent",instance="vps",control="ssh"}'

            def scraping() -> str:
                answer = prometheus.get("/api/v1/targets")
                unit = vps.exec(["systemctl", "status", "--no-pager", "node-exporter"], check=False).stdout
                rules = vps.exec(["nft", "list", "ruleset"], check=False).stdout
                sockets = vps.exec(["ss", "-tan"], check=False).stdout
                direct = in_netns_of(box, "python3", "-c", FETCH, f"http://{VPS_ADDR}:9100/metrics")
                textfile = vps.exec(["ls", "-la", "/var/lib/prometheus/node-exporter"], check=False).stdout
                seen = f"{direct.returncode} {direct.stdout[:300]} {direct.stderr[-300:]}"
                return f"{answer}\n{unit}\n{rules}\n{sockets}\n{seen}\n{textfile}"

            wait_for("the first scrape", lambda: prometheus.value(heals) is not None, 30, scraping)
            assert prometheus.value('up{instance="vps"}') == 1
            before = prometheus.value(heals)
            assert before == int(control(vps, "ssh")["heals"])  # type: ignore[call-overload]
            vps.exec(["sed", "-i", "1i PermitRootLogin yes", "/etc/ssh/sshd_config"])
            assert before is not None
            wait_for("the heal in Prometheus", lambda: prometheus.value(heals) == before + 1, 30, prometheus.log)

            run = fleet.playbook("deploy", json.dumps(report_mode))
            assert run.returncode == 0, explain(run)
            vps.exec(["sysctl", "-q", "-w", "net.ipv4.conf.all.log_martians=0"])
            alert = {"alertname": "VpsAgentControlNonCompliant", "instance": "vps", "control": "sysctl"}
            fired = lambda: any(alert.items() <= labels.items() for labels in prometheus.firing())  # noqa: E731
            wait_for("the alert firing", fired, 60, lambda: str(prometheus.firing()))
            names = [labels["alertname"] for labels in prometheus.firing()]
            assert names.count(alert["alertname"]) == 1, prometheus.firing()  # only the guard left drifted
            run = fleet.playbook("deploy", json.dumps(open_9100))  # enforce again: healed, the alert resolves
            assert run.returncode == 0, explain(run)
            wait_for("the alert resolved", lambda: not fired(), 60, lambda: str(prometheus.firing()))
        finally:
            prometheus.stop()
            vps.exec(["systemctl", "stop", "node-exporter"], check=False)
            fleet.playbook("deploy")  # 9100 closed again


def _in_netns(pid: int) -> bool:
    net = Path(f"/proc/{pid}/ns/net")
    return net.exists() and os.readlink(net) != os.readlink("/proc/self/ns/net")


def _syslog_connected(vps: Sandbox) -> bool:
    outputs: dict[str, dict[str, object]] = status(vps).get("outputs") or {}  # type: ignore[assignment]
    return bool((outputs.get("syslog") or {}).get("connected"))

"""Events and metrics into the collectors admins run, for real: Debian's rsyslogd (the shipped snippet)
receives the agent's RFC 5424 events over TCP and UDP, and Debian's prometheus-node-exporter serves the
agent's textfile. Both run in the agent's private network namespace, on their own config, pidfile and
work directory; nothing of this host's own rsyslog or node exporter is touched."""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_root_and_tools
from tests.fakeroot import CONFIG, make_root
from tests.integration.harness import REPO, Agent, StartAgent, in_netns_of, wait_for

DROPIN = "etc/ssh/sshd_config.d/00-vps-agent.conf"
SNIPPET = REPO / "packaging/collectors/rsyslog-vps-agent.conf"
TEXTFILE_DIR = "var/lib/prometheus/node-exporter"
# many heals in a row must not be taken for flapping here
MANY_HEALS = CONFIG.replace("engine:\n", "engine:\n  flap_max_heals: 1000\n")


@pytest.fixture(autouse=True)
def _needs_the_collectors() -> None:
    require_root_and_tools("rsyslogd", "prometheus-node-exporter", "ip")


class Rsyslog:
    """Debian's rsyslogd on the shipped snippet (port and output directory replaced), in the netns of `pid`."""

    def __init__(self, workdir: Path, netns_pid: int, port: int) -> None:
        self.workdir, self.netns_pid, self.port = workdir, netns_pid, port
        self.out = workdir / "out"
        self.pidfile = workdir / "rsyslogd.pid"
        workdir.mkdir(parents=True, exist_ok=True)
        snippet = SNIPPET.read_text().replace('port="514"', f'port="{port}"')
        (workdir / "vps-agent.conf").write_text(snippet.replace("/var/log/vps-agent-remote", str(self.out)))
        self.conf = workdir / "rsyslog.conf"
        self.conf.write_text(f'global(workDirectory="{workdir}")\ninclude(file="{workdir / "vps-agent.conf"}")\n')
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        in_netns_of(self.netns_pid, "ip", "link", "set", "lo", "up")
        argv = [
            "nsenter",
            "-t",
            str(self.netns_pid),
            "-n",
            "rsyslogd",
            "-n",
            "-f",
            str(self.conf),
            "-i",
            str(self.pidfile),
        ]
        self.process = subprocess.Popen(
            argv, stdout=(self.workdir / "rsyslogd.log").open("ab"), stderr=subprocess.STDOUT
        )

        def listening() -> bool:
            sockets = in_netns_of(self.netns_pid, "ss", "-Hltn", f"sport = :{self.port}").stdout
            return bool(sockets.strip())

        wait_for(listening, 10, f"rsyslogd listening on {self.port}")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def received(self) -> list[dict[str, Any]]:
        lines = []
        for path in sorted(self.out.glob("*.jsonl")) if self.out.is_dir() else []:
            # complete lines only: rsyslogd may be half way through writing the last one
            lines += [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]
        return lines

    def structured(self) -> list[dict[str, str]]:
        """The structured data of every message received, as rsyslog's mmpstrucdata parsed it."""
        return [m["rfc5424-sd"]["vps-agent@32473"] for m in self.received()]


@pytest.fixture
def collectors() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for collector in started:
        collector.stop()


def heal_latency(agent: Agent, root: Path) -> float:
    """Seconds from deleting the agent's drop-in to its drift-reverted event in the events file."""
    mark = agent.mark()
    started = time.monotonic()
    (root / DROPIN).unlink()
    agent.wait_event("drift-reverted", mark, timeout=15)
    return time.monotonic() - started


def test_rsyslog_receives_rfc5424_with_structured_data_and_healing_goes_on_while_it_is_down(
    tmp_path: Path, start_agent: StartAgent, collectors: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    port = 10514
    config = MANY_HEALS + f"events:\n  syslog:\n    target: tcp://127.0.0.1:{port}\n    buffer: 20\n"
    root = make_root(tmp_path / "root", config=config)
    agent = start_agent(root)
    rsyslog = Rsyslog(tmp_path / "rsyslog", agent.process.pid, port)
    collectors.append(rsyslog)
    rsyslog.start()  # after the agent: what it emitted meanwhile waited in the buffer

    # the start-up events arrive once rsyslog is up, with the structured data intact
    started = wait_for(
        lambda: [sd for sd in rsyslog.structured() if sd["event.action"] == "agent-started"], 20, "agent-started"
    )[0]
    assert started["event.outcome"] == "success" and json.loads(started["event.category"]) == ["process"]
    assert started["message_id"] == "280818f655cc4064933c051ae9cba4c1"

    mark = agent.mark()
    (root / DROPIN).unlink()
    reverted = agent.wait_event("drift-reverted", mark)

    def delivered(transaction: str, action: str = "drift-reverted") -> list[dict[str, Any]]:
        return [
            m
            for m in rsyslog.received()
            if m["msgid"] == action and m["rfc5424-sd"]["vps-agent@32473"].get("transaction.id") == transaction
        ]

    [message] = wait_for(lambda: delivered(reverted["transaction"]["id"]), 10, "the heal at rsyslog")
    sd = message["rfc5424-sd"]["vps-agent@32473"]
    assert sd["event.action"] == "drift-reverted" and sd["event.outcome"] == "success" and sd["control"] == "ssh"
    assert sd["file.path"] == reverted["file"]["path"] and sd["host.name"] == reverted["host"]["name"]
    assert float(sd["duration_ms"]) == reverted["duration_ms"]
    assert json.loads(sd["event.category"]) == ["configuration"] and json.loads(sd["event.type"]) == ["change"]
    assert message["message"] == reverted["message"] and message["severity"] == "info"
    assert message["timestamp"] == reverted["@timestamp"]

    baseline = [heal_latency(agent, root) for _ in range(5)]

    # rsyslog dies: heals go on as fast, the events wait in the buffer, the oldest are dropped and counted
    rsyslog.stop()
    down = [heal_latency(agent, root) for _ in range(15)]  # 30+ events into a buffer of 20
    status = json.loads(agent.ctl("status", "--json").stdout)["outputs"]["syslog"]
    assert not status["connected"] and status["buffered"] == 20 and status["dropped"] >= 10, status
    text = agent.ctl("status").stdout
    assert f"syslog tcp://127.0.0.1:{port}: unreachable since" in text and f"{status['dropped']} dropped" in text
    failed = agent.wait_event("output-failed", mark, control=None)
    assert failed["output"] == "syslog" and "127.0.0.1" in failed["error"]
    assert max(down) < 2.0, f"heals while rsyslog is down took {down}"
    assert statistics.median(down) < statistics.median(baseline) + 0.5

    # it comes back: what the buffer held is delivered, the last heal included
    last = [e for e in agent.events() if e["event"]["action"] == "drift-reverted"][-1]
    rsyslog.start()
    wait_for(lambda: delivered(last["transaction"]["id"]), 45, "the buffered heal at rsyslog after its return")
    wait_for(lambda: agent.status() and _syslog(agent)["connected"] and _syslog(agent)["buffered"] == 0, 10, "empty")

    # a hung collector (stopped, its socket still open): heals are not slowed either
    rsyslog.signal(signal.SIGSTOP)
    hung = [heal_latency(agent, root) for _ in range(3)]
    assert max(hung) < 2.0, f"heals while rsyslog is stopped took {hung}"
    last = [e for e in agent.events() if e["event"]["action"] == "drift-reverted"][-1]
    rsyslog.signal(signal.SIGCONT)
    wait_for(lambda: delivered(last["transaction"]["id"]), 20, "the heal made while rsyslog was stopped")
    with capsys.disabled():
        print(
            f"\n[syslog] heal latency (drift -> drift-reverted in the events file): rsyslog up median "
            f"{statistics.median(baseline) * 1000:.0f} ms; "
            f"rsyslog down median {statistics.median(down) * 1000:.0f} ms, "
            f"max {max(down) * 1000:.0f} ms; rsyslog stopped (SIGSTOP) max {max(hung) * 1000:.0f} ms; "
            f"dropped {status['dropped']} of the events emitted while down (buffer 20)"
        )


def _syslog(agent: Agent) -> dict[str, Any]:
    syslog: dict[str, Any] = json.loads(agent.ctl("status", "--json").stdout)["outputs"]["syslog"]
    return syslog


def test_rsyslog_receives_the_events_over_udp(tmp_path: Path, start_agent: StartAgent, collectors: list[Any]) -> None:
    port = 10515
    config = CONFIG + f"events:\n  syslog:\n    target: udp://127.0.0.1:{port}\n    facility: local3\n"
    root = make_root(tmp_path / "root", config=config)
    agent = start_agent(root)
    rsyslog = Rsyslog(tmp_path / "rsyslog", agent.process.pid, port)
    collectors.append(rsyslog)
    in_netns_of(agent.process.pid, "ip", "link", "set", "lo", "up")
    rsyslog.start()
    mark = agent.mark()
    (root / DROPIN).unlink()
    reverted = agent.wait_event("drift-reverted", mark)

    def arrived() -> list[dict[str, str]]:
        return [sd for sd in rsyslog.structured() if sd.get("transaction.id") == reverted["transaction"]["id"]]

    actions = {sd["event.action"] for sd in wait_for(lambda: len(arrived()) >= 2 and arrived(), 10, "udp")}
    assert actions == {"drift-detected", "drift-reverted"}


def test_a_bad_syslog_target_on_reload_is_rejected_and_the_agent_stays_up(
    fake_root: Path, start_agent: StartAgent
) -> None:
    agent = start_agent(fake_root)
    config = fake_root / "etc/vps-agent/config.yaml"
    config.write_text(CONFIG + 'events:\n  syslog:\n    target: "syslog.example.net:514"\n')
    result = agent.ctl("reload")
    assert result.returncode == 2
    assert f'{config}:10:13: events.syslog.target: expected a URL "udp://HOST[:PORT]"' in result.stderr
    assert agent.alive() and "config REJECTED" in agent.ctl("status").stdout
    mark = agent.mark()
    (fake_root / DROPIN).unlink()
    agent.wait_event("drift-reverted", mark)


# --- Prometheus ------------------------------------------------------------------------------------


class NodeExporter:
    """Debian's prometheus-node-exporter with only the textfile collector, in a network namespace of its own."""

    def __init__(self, textfile_dir: Path, log: Path) -> None:
        script = (
            "ip link set lo up && exec prometheus-node-exporter --web.listen-address=127.0.0.1:9100 "
            f"--collector.disable-defaults --collector.textfile --collector.textfile.directory={textfile_dir} "
            "--web.disable-exporter-metrics"
        )
        self.process = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", script], stdout=log.open("w"), stderr=subprocess.STDOUT
        )
        wait_for(lambda: self.scrape() is not None, 10, "node exporter serving /metrics")

    def scrape(self) -> str | None:
        code = (
            "import urllib.request, sys; "
            "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=5).read().decode())"
        )
        result = in_netns_of(self.process.pid, sys.executable, "-c", code)
        return result.stdout if result.returncode == 0 else None

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def parse_exposition(text: str) -> dict[str, float]:
    """A strict reading of the text format: every sample line is NAME{LABELS} VALUE, every family typed."""
    samples: dict[str, float] = {}
    typed = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            assert name.split("{")[0] in typed, f"untyped sample: {line}"
            samples[name] = float(value)
    return samples


def test_node_exporter_serves_the_agents_textfile(
    tmp_path: Path, start_agent: StartAgent, collectors: list[Any]
) -> None:
    root = make_root(tmp_path / "root", config=CONFIG)
    (root / TEXTFILE_DIR).mkdir(parents=True)
    # what the upgrade scheduler (issue 6) leaves in the state dir, and a package asking for a reboot
    state = {"last_started": 1700000000.0, "last_finished": 1700000420.0, "last_outcome": "success", "next_run": None}
    (root / "var/lib/vps-agent").mkdir(parents=True, exist_ok=True)
    (root / "var/lib/vps-agent/updates.json").write_text(json.dumps(state))
    (root / "run").mkdir(exist_ok=True)
    (root / "run/reboot-required").write_text("*** System restart required ***\n")
    agent = start_agent(root)
    exporter = NodeExporter(root / TEXTFILE_DIR, tmp_path / "node-exporter.log")
    collectors.append(exporter)

    def scraped() -> dict[str, float]:
        text = exporter.scrape() or ""
        return parse_exposition(text)

    compliant = 'vps_agent_control_compliant{control="ssh"}'
    metrics = wait_for(lambda: (m := scraped()) and compliant in m and m, 15, "the start-up reconcile in a scrape")
    assert metrics["node_textfile_scrape_error"] == 0
    assert metrics[compliant] == 1
    assert metrics['vps_agent_control_status{control="ssh",status="healed"}'] == 1
    assert metrics["vps_agent_last_upgrade_timestamp_seconds"] == 1700000420
    assert metrics["vps_agent_last_upgrade_success"] == 1
    assert metrics["vps_agent_reboot_required"] == 1
    assert abs(metrics['vps_agent_last_converge_timestamp_seconds{control="ssh"}'] - time.time()) < 60
    # node_exporter sorts the labels
    assert any(name.startswith('vps_agent_build_info{python="3.') and 'version="' in name for name in metrics)
    heals = metrics['vps_agent_heals_total{control="ssh"}']

    mark = agent.mark()
    (root / DROPIN).unlink()
    agent.wait_event("drift-reverted", mark)
    wait_for(lambda: scraped().get('vps_agent_heals_total{control="ssh"}') == heals + 1, 10, "the heal counted")
    (root / "run/reboot-required").unlink()
    wait_for(lambda: scraped().get("vps_agent_reboot_required") == 0, 45, "reboot no longer required")
    textfile = root / TEXTFILE_DIR / "vps_agent.prom"
    assert [p.name for p in textfile.parent.iterdir()] == ["vps_agent.prom"]
    assert oct(textfile.stat().st_mode & 0o777) == "0o644"


def test_an_unwritable_textfile_directory_is_reported_with_file_and_line(
    tmp_path: Path, start_agent: StartAgent
) -> None:
    config = CONFIG + "events:\n  prometheus_textfile: /srv/metrics/vps_agent.prom\n"
    root = make_root(tmp_path / "root", config=config)
    (root / "srv").mkdir()
    (root / "srv/metrics").write_text("a file where the directory should be\n")
    agent = start_agent(root)
    failed = agent.wait_event("output-failed", control=None)
    config_file = root / "etc/vps-agent/config.yaml"
    expected = f"{config_file}:9: events.prometheus_textfile: expected a file in a directory the agent can write"
    assert failed["error"].startswith(expected) and "Not a directory" in failed["error"]
    status = agent.ctl("status")
    assert status.returncode == 0 and f"metrics NOT written: {expected}" in status.stdout
    mark = agent.mark()
    (root / DROPIN).unlink()
    agent.wait_event("drift-reverted", mark)  # the daemon is up and healing
    assert agent.alive()


# --- vps-agentctl events ---------------------------------------------------------------------------


def test_events_verb_from_the_ring_buffer(fake_root: Path, start_agent: StartAgent) -> None:
    agent = start_agent(fake_root)
    follow = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "--root",
            str(fake_root),
            "events",
            "-f",
            "-n",
            "0",
            "--json",
            "--control",
            "ssh",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)
        mark = agent.mark()
        (fake_root / DROPIN).unlink()
        reverted = agent.wait_event("drift-reverted", mark)
        assert follow.stdout is not None
        streamed = [json.loads(follow.stdout.readline()) for _ in range(2)]
        assert [e["event"]["action"] for e in streamed] == ["drift-detected", "drift-reverted"]
        assert streamed[1]["transaction"]["id"] == reverted["transaction"]["id"]
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(10)
    recent = agent.ctl("events", "-n", "2", "--json", "--control", "ssh")
    assert [json.loads(line)["event"]["action"] for line in recent.stdout.splitlines()] == [
        "drift-detected",
        "drift-reverted",
    ]
    human = agent.ctl("events", "-n", "1").stdout
    assert "ssh" in human and "drift-reverted" in human and "success" in human
    assert agent.ctl("events", "-n", "-1").returncode == 2

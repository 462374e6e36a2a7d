"""The firewall guard on native nftables (nft, no iptables), for real: the daemon in a private netns
is told to use the nftables backend through the test hook (VPS_AGENT_TEST_FIREWALL_BACKEND); on a
system without iptables it is what gets detected. Never this machine's own ruleset."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.system.netfilter import BACKEND_TEST_HOOK
from tests.conftest import require_root_and_tools
from tests.integration.harness import Agent, StartAgent, wait_for
from tests.integration.test_firewall import Netns

HEAL_TIMEOUT = 5.0
TABLE = ("inet", "vps_agent")
HOST_VIEWS = (["iptables", "-S"], ["ip6tables", "-S"], ["iptables-legacy", "-S"], ["nft", "list", "ruleset"])
OTHERS = """table inet f2b-table {
  set addr-set-sshd { type ipv4_addr; elements = { 192.0.2.7 } }
  chain f2b-chain {
    type filter hook input priority filter - 1; policy accept;
    tcp dport 2222 ip saddr @addr-set-sshd reject
  }
}
"""


@pytest.fixture(autouse=True)
def _needs_nft() -> None:
    require_root_and_tools("nft", "unshare", "nsenter")


@pytest.fixture(autouse=True)
def _host_ruleset_untouched() -> Iterator[None]:
    before = [subprocess.run(argv, capture_output=True, text=True).stdout for argv in HOST_VIEWS]
    yield
    assert [subprocess.run(argv, capture_output=True, text=True).stdout for argv in HOST_VIEWS] == before


def _chain(ns: Netns) -> dict[str, Any] | None:
    """Our base chain as `nft -j` describes it (parsed JSON), with its rules' expressions; None: no table."""
    result = subprocess.run(
        ["nsenter", "-t", str(ns.pid), "-n", "nft", "-j", "list", "table", *TABLE], capture_output=True, text=True
    )
    if result.returncode != 0:
        return None
    items = json.loads(result.stdout)["nftables"]
    chains = [i["chain"] for i in items if "chain" in i]
    rules = [i["rule"]["expr"] for i in items if "rule" in i]
    if len(chains) != 1:
        return {"chains": chains}
    return {**chains[0], "rules": rules}


def _compliant(ns: Netns) -> bool:
    chain = _chain(ns)
    if not chain or chain.get("name") != "input":
        return False
    return (
        chain.get("hook") == "input"
        and chain.get("policy") == "drop"
        and chain.get("prio") == 0
        and len(chain["rules"]) == 7
        and '"dport"}}, "right": 2222' in json.dumps(chain["rules"])
    )


@pytest.fixture
def native(fake_root: Path, start_agent: StartAgent) -> tuple[Agent, Netns]:
    config = fake_root / "etc/vps-agent/config.yaml"
    config.write_text(config.read_text().replace("engine:\n", "engine:\n  flap_max_heals: 50\n"))
    agent = start_agent(fake_root, netns=True, env={BACKEND_TEST_HOOK: "nftables"})
    ns = Netns(agent)
    wait_for(lambda: _compliant(ns), HEAL_TIMEOUT, "the start-up reconcile to create table inet vps_agent")
    return agent, ns


def test_start_up_creates_our_table_only_and_status_says_nftables(native: tuple[Agent, Netns]) -> None:
    agent, ns = native
    text = ns.run("nft", "list", "table", *TABLE)
    assert "type filter hook input priority filter; policy drop;" in text
    assert "ct state established,related accept" in text and 'iif "lo" accept' in text
    assert "ip6 hoplimit 255 accept" in text and "limit rate 10/second" in text
    tables = ns.run("nft", "list", "tables").split()
    assert tables == ["table", "inet", "vps_agent"]  # no iptables tables made on the side
    wait_for(lambda: agent.status()["firewall"]["status"] in ("healed", "compliant"), 5, "firewall compliant")
    facts = agent.status()["firewall"]["facts"]
    assert facts["backend"] == "nftables" and facts["table"] == "inet vps_agent"
    assert facts["policy"] == "DROP" and facts["rules"] == 7
    assert facts["ssh_ports_accepted"] == "2222"


@pytest.mark.parametrize(
    "drift",
    [
        ("nft", "flush", "ruleset"),
        ("nft", "delete", "table", *TABLE),
        ("nft", "add", "rule", *TABLE, "input", "tcp", "dport", "23", "accept"),
        ("nft", "insert", "rule", *TABLE, "input", "tcp", "dport", "23", "accept"),
        ("nft", "chain", *TABLE, "input", "{ policy accept; }"),
        ("nft", "flush", "chain", *TABLE, "input"),
    ],
    ids=["flush-ruleset", "delete-table", "rule-added", "rule-inserted", "policy-accept", "flush-chain"],
)
def test_drift_is_healed_within_milliseconds(
    native: tuple[Agent, Netns], drift: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    agent, ns = native
    since = agent.mark()
    started = time.monotonic()
    ns.run(*drift)
    event = agent.wait_event("drift-reverted", since, HEAL_TIMEOUT, control="firewall")
    wait_for(lambda: _compliant(ns), HEAL_TIMEOUT, f"the heal of {drift}")
    latency = (time.monotonic() - started) * 1000
    with capsys.disabled():
        print(f"\n[nftables] {' '.join(drift[1:3])}: healed {latency:.0f} ms, transaction {event['duration_ms']} ms")
    assert float(event["duration_ms"]) < 1000
    assert "dport 23" not in ns.run("nft", "list", "table", *TABLE)


def test_others_tables_survive_every_heal(native: tuple[Agent, Netns]) -> None:
    agent, ns = native
    subprocess.run(["nsenter", "-t", str(ns.pid), "-n", "nft", "-f", "-"], input=OTHERS, text=True, check=True)
    ns.run("nft", "add", "table", "ip", "docker-like")
    ns.run("nft", "add", "chain", "ip", "docker-like", "DOCKER")
    ns.run(
        "nft", "add", "rule", "ip", "docker-like", "DOCKER", "ip", "daddr", "172.17.0.2", "tcp", "dport", "80", "accept"
    )

    def theirs() -> list[str]:
        return [
            ns.run("nft", "list", "table", "inet", "f2b-table"),
            ns.run("nft", "list", "table", "ip", "docker-like"),
        ]

    before = theirs()
    assert "192.0.2.7" in before[0] and "172.17.0.2" in before[1]
    for drift in [("nft", "delete", "table", *TABLE), ("nft", "chain", *TABLE, "input", "{ policy accept; }")]:
        since = agent.mark()
        ns.run(*drift)
        agent.wait_event("drift-reverted", since, HEAL_TIMEOUT, control="firewall")
        wait_for(lambda: _compliant(ns), HEAL_TIMEOUT, f"the heal of {drift}")
        assert theirs() == before
    assert agent.status()["firewall"]["drift"] == []


def test_a_check_that_fails_changes_nothing_and_report_mode_only_reports(
    fake_root: Path, start_agent: StartAgent
) -> None:
    config = fake_root / "etc/vps-agent/config.yaml"
    config.write_text(config.read_text() + "firewall:\n  mode: report\n")
    agent = start_agent(fake_root, netns=True, env={BACKEND_TEST_HOOK: "nftables"})
    ns = Netns(agent)
    status = agent.status()["firewall"]
    assert status["status"] == "drifted" and "report mode" in status["why"]
    assert "vps_agent" not in ns.run("nft", "list", "tables")

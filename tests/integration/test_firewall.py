"""The firewall guard through the real daemon loop and the real iptables, always in a private network
namespace (`unshare --net`): this machine's own ruleset is never touched."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_root_and_tools
from tests.integration.harness import Agent, StartAgent, in_netns_of, wait_for

CHAIN = "vps-agent-input"
HEAL_TIMEOUT = 5.0


@pytest.fixture(autouse=True)
def _needs_iptables() -> None:
    require_root_and_tools("iptables", "ip6tables", "unshare", "ip", "nsenter", "nft")


@pytest.fixture(autouse=True)
def _host_ruleset_untouched() -> Iterator[None]:
    before = _host_rules()
    yield
    assert _host_rules() == before, "the host's own ruleset changed"


def _host_rules() -> list[str]:
    return [subprocess.run([tool, "-S"], capture_output=True, text=True).stdout for tool in ("iptables", "ip6tables")]


class Netns:
    """iptables and friends in the daemon's network namespace."""

    def __init__(self, agent: Agent) -> None:
        self.pid = agent.process.pid

    def run(self, *argv: str) -> str:
        result = in_netns_of(self.pid, *argv)
        assert result.returncode == 0, f"{argv}: {result.stderr}"
        return result.stdout

    def rules(self, tool: str = "iptables") -> list[str]:
        return self.run(tool, "-S").splitlines()


def baseline_in_place(ns: Netns, tools: tuple[str, str] = ("iptables", "ip6tables")) -> Callable[[], bool]:
    """A check: DROP policy, the jump and the SSH accept, for both families as `tools` see them."""

    def check() -> bool:
        for tool in tools:
            rules = ns.rules(tool)
            if "-P INPUT DROP" not in rules or f"-A INPUT -j {CHAIN}" not in rules:
                return False
            if not any(r.startswith(f"-A {CHAIN} ") and "--dport 2222" in r for r in rules):
                return False
        return True

    return check


@pytest.fixture
def guarded(fake_root: Path, start_agent: StartAgent) -> tuple[Agent, Netns]:
    agent = start_agent(fake_root, netns=True)
    ns = Netns(agent)
    wait_for(baseline_in_place(ns), HEAL_TIMEOUT, "the start-up reconcile to install the firewall")
    return agent, ns


def _heals(agent: Agent, ns: Netns, *drift: str) -> dict[str, Any]:
    since = agent.mark()
    ns.run(*drift)
    event = agent.wait_event("drift-reverted", since, HEAL_TIMEOUT, control="firewall")
    wait_for(baseline_in_place(ns), HEAL_TIMEOUT, f"the firewall healed after {drift}")
    return event


def test_start_up_installs_the_baseline_and_status_says_so(guarded: tuple[Agent, Netns]) -> None:
    agent, ns = guarded
    rules = ns.rules()
    assert f"-A {CHAIN} -i lo -j ACCEPT" in rules
    assert f"-A {CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT" in rules
    v6 = ns.rules("ip6tables")
    assert any("--icmpv6-type 135" in r and "--hl-eq 255" in r for r in v6)
    wait_for(lambda: agent.status()["firewall"]["status"] in ("healed", "compliant"), 5, "firewall compliant")
    facts = agent.status()["firewall"]["facts"]
    assert facts["backend"] == "iptables-nft"
    assert facts["ipv4_policy"] == "DROP" and facts["ipv6_policy"] == "DROP"
    assert facts["ssh_ports_accepted"] == "2222"
    assert facts["ipv4_rules"] == 4


@pytest.mark.parametrize(
    "drift",
    [
        ("iptables", "-F"),
        ("iptables", "-P", "INPUT", "ACCEPT"),
        ("iptables", "-D", "INPUT", "-j", CHAIN),
        ("iptables", "-I", CHAIN, "1", "-p", "tcp", "--dport", "23", "-j", "ACCEPT"),
        ("ip6tables", "-F"),
        ("nft", "flush", "ruleset"),
    ],
    ids=["flush", "policy-accept", "jump-deleted", "rule-inserted", "ip6tables-flush", "nft-flush-ruleset"],
)
def test_drift_is_healed_within_seconds(guarded: tuple[Agent, Netns], drift: tuple[str, ...]) -> None:
    agent, ns = guarded
    event = _heals(agent, ns, *drift)
    assert event["control"] == "firewall"
    assert float(event["duration_ms"]) < 2000
    assert not any("--dport 23" in r for r in ns.rules())


LEFTOVER = """table inet vps_agent {
  chain input {
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    tcp dport 22 accept
  }
}
table inet someone_else {
  chain input { type filter hook input priority filter + 5; policy accept; }
}
"""


def test_its_own_nftables_table_left_from_native_nftables_is_removed_and_no_other(
    guarded: tuple[Agent, Netns],
) -> None:
    """nftables was there before iptables (`apt install nftables`, later iptables with Docker, or the
    .deb's Recommends): the agent ran on native nftables, then on iptables-nft. Its old table still drops
    every port it did not list (a newly allowed one, the SSH port moved since): seen on a booted VPS,
    node_exporter's allowed port timed out. It is removed; another tool's table stays."""
    agent, ns = guarded
    since = agent.mark()
    ns.run("sh", "-c", f"printf '%s' '{LEFTOVER}' | nft -f -")
    event = agent.wait_event("drift-reverted", since, HEAL_TIMEOUT, control="firewall")
    assert "inet vps_agent" in json.dumps(event)
    wait_for(lambda: "vps_agent" not in ns.run("nft", "list", "tables"), HEAL_TIMEOUT, "the leftover table removed")
    assert "table inet someone_else" in ns.run("nft", "list", "tables")
    assert baseline_in_place(ns)()


def test_others_chains_survive_every_heal(guarded: tuple[Agent, Netns]) -> None:
    agent, ns = guarded
    ns.run("iptables", "-N", "f2b-sshd")
    ns.run("iptables", "-A", "f2b-sshd", "-s", "192.0.2.7/32", "-j", "REJECT")
    ns.run("iptables", "-A", "f2b-sshd", "-j", "RETURN")
    ns.run("iptables", "-I", "INPUT", "1", "-p", "tcp", "-m", "multiport", "--dports", "2222", "-j", "f2b-sshd")
    ns.run("iptables", "-N", "DOCKER")
    ns.run("iptables", "-A", "DOCKER", "-d", "172.17.0.2/32", "-p", "tcp", "--dport", "80", "-j", "ACCEPT")
    ns.run("iptables", "-A", "INPUT", "-j", "DOCKER")
    theirs = [r for r in ns.rules() if "f2b-sshd" in r or "DOCKER" in r]
    assert len(theirs) == 7
    for drift in [("iptables", "-P", "INPUT", "ACCEPT"), ("iptables", "-D", "INPUT", "-j", CHAIN)]:
        _heals(agent, ns, *drift)
        assert [r for r in ns.rules() if "f2b-sshd" in r or "DOCKER" in r] == theirs
    # others' rules never count as drift, and a fail2ban ban still comes before the agent's SSH accept
    assert agent.status()["firewall"]["drift"] == []
    input_rules = [r for r in ns.rules() if r.startswith("-A INPUT ")]
    assert input_rules.index(f"-A INPUT -j {CHAIN}") > next(i for i, r in enumerate(input_rules) if "f2b-sshd" in r)


def test_a_flush_storm_is_damped_and_healed_within_a_second_after_it(guarded: tuple[Agent, Netns]) -> None:
    """`iptables -F` ~100 times a second for 3 s: flap damping engages and says so, and the machine is
    compliant again about a second after the last flush (not at the end of the 5-minute back-off),
    though flushing chains that are already empty tells the kernel's listeners nothing."""
    agent, ns = guarded
    mark = agent.mark()
    storm = (
        "end=$(( $(date +%s%N) + 3000000000 )); n=0; "
        "while [ $(date +%s%N) -lt $end ]; do iptables -w -F 2>/dev/null; n=$((n+1)); sleep 0.01; done; echo $n"
    )
    flushes = int(ns.run("sh", "-c", storm))
    ended = time.monotonic()
    assert flushes >= 100
    wait_for(baseline_in_place(ns), 10.0, "the firewall healed after the storm")
    after = time.monotonic() - ended
    flapping = agent.wait_event("flapping", mark, 5, control="firewall")
    assert "backing off 5m" in str(flapping["message"])
    assert agent.status()["firewall"]["status"] == "flapping"
    # about a second after it (FLAP_SETTLE of quiet, then the heal), with room for a loaded CI machine
    assert after < 3.0, f"compliant {after:.1f}s after the storm"


def test_a_fake_root_in_the_host_netns_is_blocked(fake_root: Path, start_agent: StartAgent) -> None:
    agent = start_agent(fake_root, netns=False)  # the host's network namespace
    status = agent.status()["firewall"]
    assert status["status"] == "blocked"
    assert "host's network namespace" in status["why"]
    assert agent.wait_event("remediation-blocked", 0, 5, control="firewall")


def test_report_mode_reports_and_changes_nothing(fake_root: Path, start_agent: StartAgent) -> None:
    config = fake_root / "etc/vps-agent/config.yaml"
    config.write_text(config.read_text() + "firewall:\n  mode: report\n")
    agent = start_agent(fake_root, netns=True)
    ns = Netns(agent)
    status = agent.status()["firewall"]
    assert status["status"] == "drifted" and "report mode" in status["why"]
    assert "-P INPUT ACCEPT" in ns.rules()
    assert not any(CHAIN in r for r in ns.rules())
    assert agent.wait_event("drift-detected", 0, 5, control="firewall")
    assert os.path.exists(agent.events_file)

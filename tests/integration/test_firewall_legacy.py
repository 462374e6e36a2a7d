"""The firewall guard on iptables-legacy, for real: the daemon in a private netns is told to use the
legacy backend through the test hook (VPS_AGENT_TEST_FIREWALL_BACKEND; Debian's iptables alternative
is per-system, so a test cannot switch it for one netns). Legacy sends no netlink events: the guard
polls, and these tests measure what that costs."""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.system.netfilter import BACKEND_TEST_HOOK
from tests.conftest import require_root_and_tools
from tests.integration.harness import Agent, StartAgent, wait_for
from tests.integration.test_firewall import CHAIN, Netns, baseline_in_place

HEAL_TIMEOUT = 5.0
HOST_VIEWS = (["iptables", "-S"], ["ip6tables", "-S"], ["iptables-legacy", "-S"], ["nft", "list", "ruleset"])


@pytest.fixture(autouse=True)
def _needs_both_flavours() -> None:
    require_root_and_tools("iptables-legacy", "ip6tables-legacy", "iptables-nft", "unshare", "nsenter", "nft")


@pytest.fixture(autouse=True)
def _host_ruleset_untouched() -> Iterator[None]:
    before = [subprocess.run(argv, capture_output=True, text=True).stdout for argv in HOST_VIEWS]
    yield
    assert [subprocess.run(argv, capture_output=True, text=True).stdout for argv in HOST_VIEWS] == before


def _compliant(ns: Netns) -> Callable[[], bool]:
    return baseline_in_place(ns, ("iptables-legacy", "ip6tables-legacy"))


@pytest.fixture
def legacy(fake_root: Path, start_agent: StartAgent) -> tuple[Agent, Netns]:
    config = fake_root / "etc/vps-agent/config.yaml"
    # many drifts for one agent: no flap damping in the way
    config.write_text(config.read_text().replace("engine:\n", "engine:\n  flap_max_heals: 50\n"))
    agent = start_agent(fake_root, netns=True, env={BACKEND_TEST_HOOK: "iptables-legacy"})
    ns = Netns(agent)
    wait_for(_compliant(ns), HEAL_TIMEOUT, "the start-up reconcile to install the legacy firewall")
    return agent, ns


def test_start_up_installs_the_baseline_with_iptables_legacy_only(legacy: tuple[Agent, Netns]) -> None:
    agent, ns = legacy
    assert not any(CHAIN in r for r in ns.rules("iptables-nft") + ns.rules("ip6tables-nft"))
    wait_for(lambda: agent.status()["firewall"]["status"] in ("healed", "compliant"), 5, "firewall compliant")
    facts = agent.status()["firewall"]["facts"]
    assert facts["backend"] == "iptables-legacy"
    assert facts["ipv4_policy"] == facts["ipv6_policy"] == "DROP"
    assert facts["ssh_ports_accepted"] == "2222"
    assert "polling every 1s" in facts["detection"]
    assert "warning" not in facts


def test_legacy_drift_is_healed_by_polling(legacy: tuple[Agent, Netns], capsys: pytest.CaptureFixture[str]) -> None:
    agent, ns = legacy
    drifts = [
        ("iptables-legacy", "-F"),
        ("iptables-legacy", "-P", "INPUT", "ACCEPT"),
        ("iptables-legacy", "-D", "INPUT", "-j", CHAIN),
        ("ip6tables-legacy", "-F"),
    ] * 3
    latencies = []
    for drift in drifts:
        since = agent.mark()
        ns.run(*drift)
        started = time.monotonic()
        assert not _compliant(ns)()  # iptables-legacy returned: the drift is in place
        wait_for(_compliant(ns), HEAL_TIMEOUT, f"the heal of {drift}")
        latencies.append((time.monotonic() - started) * 1000)
        event = agent.wait_event("drift-reverted", since, HEAL_TIMEOUT, control="firewall")
        assert float(event["duration_ms"]) < 1000
    with capsys.disabled():
        print(
            f"\n[legacy] drift -> healed by polling: p50 {statistics.median(latencies):.0f} ms, "
            f"max {max(latencies):.0f} ms over {len(latencies)} drifts (poll interval 1 s)"
        )
    assert max(latencies) < 2500  # one poll interval plus one transaction, with room for a slow CI


def test_rules_split_across_legacy_and_nft_are_reported(legacy: tuple[Agent, Netns]) -> None:
    agent, ns = legacy
    ns.run("iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "9999", "-j", "ACCEPT")

    def warned() -> str:
        return str(agent.status()["firewall"]["facts"].get("warning", ""))

    wait_for(lambda: "iptables-nft" in warned(), HEAL_TIMEOUT, "the split ruleset in status")
    assert "split ruleset" in warned() and "ip6tables-nft" not in warned()
    ns.run("iptables-nft", "-F", "INPUT")
    wait_for(lambda: warned() == "", HEAL_TIMEOUT, "the warning to clear")


def test_legacy_rules_beside_the_nft_backend_are_reported(fake_root: Path, start_agent: StartAgent) -> None:
    agent = start_agent(fake_root, netns=True, env={BACKEND_TEST_HOOK: "iptables-nft"})
    ns = Netns(agent)
    ns.run("ip6tables-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "9999", "-j", "ACCEPT")
    # iptables-legacy announces nothing, and the nft backend does not poll: the next converge sees it
    assert agent.ctl("converge", "firewall").returncode == 0
    facts = agent.status()["firewall"]["facts"]
    assert facts["backend"] == "iptables-nft"
    assert "ip6tables-legacy" in facts["warning"] and "split ruleset" in facts["warning"]

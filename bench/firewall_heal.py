"""Firewall: `iptables -F` (iptables-nft) and `nft flush ruleset` (native nftables) -> the ruleset right again.

The daemon runs in a private network namespace (`unshare --net`): the host's ruleset is never touched.
The tamper runs in that namespace through nsenter; t0 is taken before nsenter is spawned, so each latency
includes nsenter's and the tool's own start-up (a few ms): conservative. Each heal is checked afterwards
with `iptables -S` / `nft list table inet vps_agent`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from common import NO_FLAP, Daemon, DriftKind, Section, bench_config, heal_report, measure_heals, running_daemon

from agent.system.netfilter import BACKEND_TEST_HOOK

TARGET_P99_MS = 100.0
CHAIN = "vps-agent-input"


def _tamper(*argv: str) -> Callable[[Daemon], float]:
    def tamper(daemon: Daemon) -> float:
        t0 = time.time()
        result = daemon.in_netns(*argv)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
        return t0

    return tamper


def verify_iptables(daemon: Daemon) -> str:
    rules = daemon.in_netns("iptables", "-S").stdout.splitlines()
    ok = "-P INPUT DROP" in rules and f"-A INPUT -j {CHAIN}" in rules
    ok = ok and any(r.startswith(f"-A {CHAIN} ") and "--dport 2222" in r for r in rules)
    return "" if ok else "iptables -S: " + "; ".join(rules)


def verify_nft(daemon: Daemon) -> str:
    text = daemon.in_netns("nft", "list", "table", "inet", "vps_agent").stdout
    ok = "type filter hook input priority filter; policy drop;" in text and "tcp dport 2222 accept" in text
    return "" if ok else f"nft list table inet vps_agent: {text!r}"


IPTABLES_F = DriftKind("iptables -F", "", _tamper("iptables", "-F"), verify_iptables)
NFT_FLUSH = DriftKind("nft flush ruleset", "", _tamper("nft", "flush", "ruleset"), verify_nft)


def run(runs: int) -> Section:
    section = Section("Firewall: `iptables -F` / `nft flush ruleset` -> healed")
    with running_daemon(bench_config(**NO_FLAP), env={BACKEND_TEST_HOOK: "iptables-nft"}) as daemon:
        heals = measure_heals(daemon, "firewall", [IPTABLES_F], runs)
    with running_daemon(bench_config(**NO_FLAP), env={BACKEND_TEST_HOOK: "nftables"}) as daemon:
        heals += measure_heals(daemon, "firewall", [NFT_FLUSH], runs)
    section.add(
        "Method: the real daemon in a private network namespace, twice: once on iptables-nft (Debian 12's"
        " default), once on native nftables (the test hook `VPS_AGENT_TEST_FIREWALL_BACKEND=nftables`, as on a"
        f" host without the iptables command). {runs} tampers each, 100 ms apart, each run in the daemon's"
        " namespace with `nsenter -t PID -n`; t0 is taken before nsenter is spawned (so its start-up counts)."
        " Detection is the kernel's NFNLGRP_NFTABLES netlink message; healed = the `drift-reverted` event, emitted"
        " after the agent re-read the ruleset (`iptables-save` / `nft list table`) and found it right; every heal"
        " is checked afterwards with `iptables -S` / `nft list table inet vps_agent`.",
        "",
    )
    heal_report(section, heals, "firewall drift heal", TARGET_P99_MS)
    return section

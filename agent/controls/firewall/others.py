"""What else is in this network namespace's ruleset besides the agent's chain: rules under the other
iptables flavour (a warning), and the agent's own native nftables table left from a time it ran without
iptables (a drift: it still drops). Read through agent/system/netfilter.py; nothing is changed here."""

from __future__ import annotations

from agent.controls.base import ObserveError
from agent.controls.firewall.rules import parse_filter
from agent.system import netfilter
from agent.system.netfilter import FAMILIES, Backend


def split_rules(backend: Backend) -> str:
    """Rules in filter INPUT under the other iptables flavour too: both apply to every packet, and
    each tool (and each admin) sees only half the firewall."""
    other = {"nft": "legacy", "legacy": "nft"}.get(backend.name)
    if other is None:
        return ""
    found = []
    for family in FAMILIES:
        if other == "legacy" and not netfilter.legacy_filter_present(family):
            continue  # asking iptables-legacy would load its modules
        saved = netfilter.save_filter_with(other, family)
        try:
            if saved.ok and parse_filter(family, saved.stdout).input_rules:
                found.append(f"{netfilter.tool_name(family)}-{other}")
        except ObserveError:
            continue  # only a warning is at stake: the other flavour's garbled output does not fail the observe
    if not found:
        return ""
    return (
        f"split ruleset: {' and '.join(found)} also has rules in filter INPUT besides the agent's "
        f"iptables-{backend.name} (both apply; each tool sees half)"
    )


def leftover_nft() -> tuple[str, ...] | None:
    """Our native nftables table, on an iptables backend: the lines of a leftover, or None (none, or no
    nft to ask: a failed look is no drift)."""
    result = netfilter.nft_list_table()
    if not result.ok:
        return None
    return tuple(line.strip() for line in result.stdout.splitlines() if line.strip()) or None

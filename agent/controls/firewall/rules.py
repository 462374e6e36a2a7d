"""The firewall guard's rules as text: what the agent writes (iptables-restore lines per family, or the
nft table), how it reads what the tools print back (iptables-save, nft list), and the scripts that apply
and undo them. No process, no file: agent/controls/firewall/control.py runs them through system/netfilter."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from agent.config import FirewallConfig, PortRule
from agent.controls.base import ObserveError
from agent.system import netfilter
from agent.system.netfilter import NFT_TABLE, Backend

CHAIN = "vps-agent-input"
JUMP = f"-A INPUT -j {CHAIN}"
POLICY = "DROP"
_ICMP_LIMIT = "-m limit --limit 10/second --limit-burst 20"
ESTABLISHED = f"-A {CHAIN} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"


@dataclass(frozen=True)
class FamilyObserved:
    family: str
    policy: str  # INPUT's policy
    chain: tuple[str, ...] | None  # the agent's chain as iptables-save prints it; None: no chain
    input_rules: tuple[str, ...]  # INPUT's rules, everyone's

    @property
    def jumps(self) -> int:
        return sum(1 for rule in self.input_rules if rule == JUMP)


@dataclass(frozen=True)
class NftObserved:
    """`nft list table inet vps_agent`, each line stripped, empty ones dropped; None: no table."""

    lines: tuple[str, ...] | None

    @property
    def policy(self) -> str:
        for line in self.lines or ():
            if line.startswith("type filter hook input ") and "policy " in line:
                return line.split("policy ", 1)[1].rstrip(";").strip().upper()
        return "ACCEPT" if self.lines is None else "NONE"

    @property
    def rules(self) -> tuple[str, ...]:
        """The rules of our input chain (a chain added beside it shows in lines, not here)."""
        rules: list[str] = []
        in_input = False
        for line in self.lines or ():
            if line == "chain input {":
                in_input = True
            elif in_input and line == "}":
                break
            elif in_input and not line.startswith("type "):
                rules.append(line)
        return tuple(rules)


@dataclass(frozen=True)
class FirewallObserved:
    backend: Backend
    families: tuple[FamilyObserved, ...]
    split: str  # rules in both iptables-legacy and iptables-nft: a warning, empty when fine
    nft: NftObserved | None = None  # the native nftables backend's view; None on iptables
    # on iptables: the agent's own `table inet vps_agent` left from a time it ran on native nftables (nft was
    # there before iptables): it still drops what it does not list, so it goes; None: there is none
    leftover_nft: tuple[str, ...] | None = None

    def family(self, name: str) -> FamilyObserved:
        return next(f for f in self.families if f.family == name)


@dataclass(frozen=True)
class FirewallDesired:
    rules: dict[str, tuple[str, ...]]  # family -> the agent's chain as the agent writes it
    ssh_ports: tuple[int, ...]
    open_tcp: dict[str, frozenset[int]]  # family -> TCP ports accepted from anywhere
    mode: str
    nft_rules: tuple[str, ...] = ()  # the same policy as nft rules for `table inet vps_agent`
    sshd_listening: frozenset[int] = frozenset()  # what sshd listens on now (the engine's SshPorts)
    config: FirewallConfig = field(default_factory=FirewallConfig)  # the section it came from (status facts)
    # "ipv4"/"ipv6" (a chain) or "inet" (our nft table) -> as the tool prints what the agent applied, once
    # learned (agent state, read by desired(); not part of the intent)
    learned: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False, compare=False)


def render_rules(
    family: str, ssh_ports: Sequence[int], tcp: Sequence[PortRule], udp: Sequence[PortRule]
) -> tuple[str, ...]:
    """The agent's chain for one family, in the order packets meet it."""
    rules = [f"-A {CHAIN} -i lo -j ACCEPT", ESTABLISHED]
    if family == "ipv4":
        rules.append(f"-A {CHAIN} -p icmp --icmp-type echo-request {_ICMP_LIMIT} -j ACCEPT")
    else:
        # neighbour discovery (router/neighbour solicitation and advertisement) only from on-link
        for icmp_type in (133, 134, 135, 136):
            rules.append(f"-A {CHAIN} -p ipv6-icmp --icmpv6-type {icmp_type} -m hl --hl-eq 255 -j ACCEPT")
        for icmp_type in (1, 2, 3, 4):  # unreachable, packet-too-big, time-exceeded, parameter-problem
            rules.append(f"-A {CHAIN} -p ipv6-icmp --icmpv6-type {icmp_type} -j ACCEPT")
        rules.append(f"-A {CHAIN} -p ipv6-icmp --icmpv6-type echo-request {_ICMP_LIMIT} -j ACCEPT")
    for port in ssh_ports:
        rules.append(f"-A {CHAIN} -p tcp --dport {port} -j ACCEPT")
    for protocol, rule, source in _allowances(tcp, udp):
        dport = f"{rule.port}:{rule.port_end}" if rule.port_end else str(rule.port)
        if source is None:
            rules.append(f"-A {CHAIN} -p {protocol} --dport {dport} -j ACCEPT")
        elif family_of(source) == family:
            rules.append(f"-A {CHAIN} -p {protocol} -s {source} --dport {dport} -j ACCEPT")
    return tuple(rules)


def _allowances(tcp: Sequence[PortRule], udp: Sequence[PortRule]) -> Iterator[tuple[str, PortRule, str | None]]:
    """firewall.allow_tcp/allow_udp, one entry per source (None: from anywhere), for every backend."""
    for protocol, port_rules in (("tcp", tcp), ("udp", udp)):
        for rule in port_rules:
            for source in rule.sources or (None,):
                yield protocol, rule, source


NFT_NAME = " ".join(NFT_TABLE)  # "inet vps_agent"
NFT_HOOK = "type filter hook input priority filter; policy drop;"
NFT_ESTABLISHED = "ct state established,related accept"
_NFT_LIMIT = "limit rate 10/second burst 20 packets"


def render_nft(ssh_ports: Sequence[int], tcp: Sequence[PortRule], udp: Sequence[PortRule]) -> tuple[str, ...]:
    """The agent's input chain for native nftables: render_rules' policy, one chain for both families."""
    rules = [
        'iif "lo" accept',
        NFT_ESTABLISHED,
        f"icmp type echo-request {_NFT_LIMIT} accept",
        "icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert } "
        "ip6 hoplimit 255 accept",
        "icmpv6 type { destination-unreachable, packet-too-big, time-exceeded, parameter-problem } accept",
        f"icmpv6 type echo-request {_NFT_LIMIT} accept",
    ]
    rules += [f"tcp dport {port} accept" for port in ssh_ports]
    for protocol, rule, source in _allowances(tcp, udp):
        dport = f"{rule.port}-{rule.port_end}" if rule.port_end else str(rule.port)
        if source is None:
            rules.append(f"{protocol} dport {dport} accept")
        else:
            ip = "ip" if family_of(source) == "ipv4" else "ip6"
            rules.append(f"{ip} saddr {source} {protocol} dport {dport} accept")
    return tuple(rules)


def nft_table_lines(rules: Sequence[str]) -> tuple[str, ...]:
    """Our table as `nft list table` prints it, stripped: the shape nft_script defines."""
    return (f"table {NFT_NAME} {{", "chain input {", NFT_HOOK, *rules, "}", "}")


def nft_script(table: Sequence[str] | None) -> str:
    """One `nft -f` batch (one kernel transaction): make sure our table exists, delete it, define it
    again. Nothing outside `table inet vps_agent` is named, so others' tables are never touched.
    table None: just remove ours (the undo when there was none)."""
    lines = [f"table {NFT_NAME}", f"delete table {NFT_NAME}", *(table or ())]
    return "\n".join(lines) + "\n"


def parse_filter(family: str, saved: str) -> FamilyObserved:
    """iptables-save -t filter -> INPUT's policy and rules, and the agent's chain. An output cut short inside
    the filter table (no COMMIT) or a chain line without its policy is an ObserveError, never a guess."""
    policy = "ACCEPT"
    chain_declared = False
    chain: list[str] = []
    input_rules: list[str] = []
    in_filter = unfinished = False
    for line in saved.splitlines():
        if line.startswith("*"):
            in_filter = unfinished = line == "*filter"
        elif not in_filter or line.startswith("#"):
            continue
        elif line == "COMMIT":
            in_filter = unfinished = False
        elif line.startswith(":INPUT "):
            words = line.split()
            if len(words) < 3:
                tool = f"{netfilter.tool_name(family)}-save"
                raise ObserveError(f"{tool}: INPUT without its policy and counters: {line!r}")
            policy = words[1]
        elif line.startswith(f":{CHAIN} "):
            chain_declared = True
        elif line.startswith(f"-A {CHAIN} "):
            chain.append(line)
        elif line.startswith("-A INPUT "):
            input_rules.append(line)
    if unfinished:
        raise ObserveError(f"{netfilter.tool_name(family)}-save: the output ends inside the filter table (no COMMIT)")
    return FamilyObserved(family, policy, tuple(chain) if chain_declared else None, tuple(input_rules))


def restore_input(rules: tuple[str, ...], policy: str, jump_at: int | None) -> str:
    lines = ["*filter", f":{CHAIN} - [0:0]", f"-F {CHAIN}", *rules, f":INPUT {policy} [0:0]"]
    if jump_at is not None:
        lines.append(f"-I INPUT {jump_at} -j {CHAIN}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def undo_input(before: FamilyObserved) -> str:
    """Back to what the agent owned before: its chain's rules, the jump, INPUT's policy."""
    lines = ["*filter", f":{CHAIN} - [0:0]", f"-F {CHAIN}", *(before.chain or ()), f":INPUT {before.policy} [0:0]"]
    if not before.jumps:
        lines.append(f"-D INPUT -j {CHAIN}")
        if before.chain is None:
            lines.append(f"-X {CHAIN}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def jump_position(seen: FamilyObserved) -> int:
    """First in INPUT, but after fail2ban's jumps: a ban must still beat the agent's SSH accept."""
    position = 1
    for index, rule in enumerate(seen.input_rules, start=1):
        if " -j f2b-" in rule:
            position = index + 1
    return position


def family_of(source: str) -> str:
    return "ipv4" if ipaddress.ip_network(source, strict=False).version == 4 else "ipv6"


def open_ports(rules: Sequence[str]) -> frozenset[int]:
    """TCP ports the rules accept from anywhere (no -s), ranges expanded; reads the agent's form and
    iptables-save's alike."""
    ports: set[int] = set()
    for rule in rules:
        words = rule.split()
        protocol = words[words.index("-p") + 1] if "-p" in words[:-1] else ""
        if protocol != "tcp" or "-s" in words or "--dport" not in words[:-1] or not rule.endswith("-j ACCEPT"):
            continue
        low, _, high = words[words.index("--dport") + 1].partition(":")
        ports.update(range(int(low), int(high or low) + 1))
    return frozenset(ports)


def owned_text(policy: str, jump: bool, chain: Sequence[str]) -> str:
    """What the agent owns in one family, as iptables-save lines: INPUT's policy, the jump, its chain."""
    lines = [f"-P INPUT {policy}", *([JUMP] if jump else []), *chain]
    return "".join(line + "\n" for line in lines)


def lines_text(lines: Sequence[str]) -> str:
    return "".join(line + "\n" for line in lines)

"""What enforcing the firewall would cut off: the sockets that take packets from the network (a
listening TCP socket, an unconnected bound UDP one, on an address other than loopback) on a port neither
firewall.allow_tcp/allow_udp nor the SSH ports keep open. In report mode `status` and `check` name
them, and `vps-agentctl enforce` refuses to cut them without --yes: a listener is never cut silently."""

from __future__ import annotations

import pwd
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from agent.config import FirewallConfig, PortRule
from agent.system import netfilter
from agent.system.netfilter import OpenSocket

ENFORCE_COMMAND = "sudo vps-agentctl enforce"


@dataclass(frozen=True)
class WouldCut:
    """One port the enforced ruleset would drop while something listens on it."""

    port: int
    proto: str  # "tcp" or "udp"
    process: str | None  # the processes holding it ("nginx"), None where their fds cannot be read
    user: str  # the socket's owner
    unit: str | None = None  # the systemd unit (or the cgroup) whose process made it ("nginx.service")

    def describe(self) -> str:
        """e.g. "80/tcp (nginx)"; where the agent may not read the process's fds (another user's, or root's
        with capabilities the agent lacks: no CAP_SYS_PTRACE) its unit, "80/tcp (nginx.service)"; else its user."""
        return f"{self.port}/{self.proto} ({self.process or self.unit or f'user {self.user}'})"

    def as_fact(self) -> dict[str, Any]:
        return {"port": self.port, "proto": self.proto, "process": self.process, "unit": self.unit, "user": self.user}


def allows(rules: Iterable[PortRule], port: int) -> bool:
    """Whether an allow rule names the port (one limited to some sources counts: the admin chose it)."""
    return any(rule.port <= port <= (rule.port_end or rule.port) for rule in rules)


def would_cut(
    firewall: FirewallConfig,
    ssh_ports: Iterable[int],
    sockets: Iterable[OpenSocket],
    processes: Callable[[set[int]], dict[int, set[str]]],
    cgroups: Callable[[set[int]], dict[int, str]] = lambda ids: {},
) -> tuple[WouldCut, ...]:
    """The open sockets enforcing `firewall` would cut off, one per port and protocol, in port order."""
    ssh = set(ssh_ports)
    exposed = [
        s
        for s in sockets
        if not s.loopback
        and not allows(firewall.allow_tcp if s.proto == "tcp" else firewall.allow_udp, s.port)
        and not (s.proto == "tcp" and s.port in ssh)
    ]
    names = processes({s.inode for s in exposed})
    paths = cgroups({s.cgroup for s in exposed if s.inode not in names})
    merged: dict[tuple[str, int], tuple[set[str], set[str], str]] = {}
    for s in exposed:
        held, units, user = merged.setdefault((s.proto, s.port), (set(), set(), _user(s.uid)))
        held |= names.get(s.inode, set())
        if s.cgroup in paths:
            units.add(paths[s.cgroup].rsplit("/", 1)[-1])
    return tuple(
        WouldCut(port, proto, ", ".join(sorted(held)) or None, user, ", ".join(sorted(units)) or None)
        for (proto, port), (held, units, user) in sorted(merged.items(), key=lambda item: (item[0][1], item[0][0]))
    )


def read_would_cut(firewall: FirewallConfig, ssh_ports: Iterable[int]) -> tuple[WouldCut, ...]:
    """would_cut for this network namespace, now."""
    return would_cut(firewall, ssh_ports, netfilter.open_sockets(), netfilter.socket_processes, netfilter.cgroup_paths)


def cut_text(cuts: Iterable[WouldCut]) -> str:
    """e.g. "80/tcp (nginx), 443/tcp (nginx)", or "nothing"."""
    return ", ".join(cut.describe() for cut in cuts) or "nothing"


def report_note(cuts: Iterable[WouldCut]) -> str:
    """The firewall row's detail in report mode, with the command that ends it."""
    return f"report mode, would cut {cut_text(cuts)}; {ENFORCE_COMMAND}"


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)

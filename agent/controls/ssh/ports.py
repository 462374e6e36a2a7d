"""The SSH ports: what sshd listens on now, in this network namespace, and the SSH guard's port(s).

The engine works them out once per converge (`ports_now`, bound by agent/wiring.py) and hands them to
every guard's desired() as one SshPorts value (agent/controls/base.py): the firewall keeps them open,
fail2ban guards them, and neither imports this package. The port move (portmove.py, proofs.py) reads
what sshd listens on from the same SshdPorts.

sshd makes itself non-dumpable, and reading a non-dumpable process's /proc/PID/fd takes
CAP_SYS_PTRACE, which vps-agent.service does not grant. Where sshd's sockets can be read, they are
the answer; where they cannot, the ports of sshd's effective configuration (`sshd -T`) that a socket
owned by root listens on here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from agent.config import Config
from agent.controls.base import SshPorts
from agent.controls.ssh.portmove import PortMoves
from agent.controls.ssh.sshd_config import configured_ports
from agent.paths import SystemRoot
from agent.system import netfilter

# what sshd's listener runs (Debian's, and where OpenSSH 9.8+ puts the per-connection sshd-session)
SSHD_EXECUTABLES = frozenset(
    {
        "/usr/sbin/sshd",
        "/usr/lib/openssh/sshd-session",
        "/usr/libexec/openssh/sshd-session",
        "/usr/libexec/sshd-session",
    }
)


class SshdPorts:
    """What sshd listens on, read when asked; shared by the engine's ports_now and the port move (wiring.py)."""

    def __init__(
        self,
        root: SystemRoot,
        configured: Callable[[], frozenset[int] | None] | None = None,
        listening: Callable[[], netfilter.Listening] = lambda: netfilter.tcp_listening("sshd", SSHD_EXECUTABLES),
    ) -> None:
        self._configured = configured or (lambda: configured_ports(root))
        self._listening = listening
        self._lock = threading.Lock()
        self._config_ports: frozenset[int] = frozenset()  # sshd -T's ports, last time it answered
        self._config_under: frozenset[int] | None = None  # the root-owned listening ports it was asked under

    def __call__(self) -> frozenset[int]:
        """Read now: once per converge (the engine), and while the port move waits for sshd to let go of a port."""
        with self._lock:
            seen = self._listening()
            ports = seen.ports
            if seen.hidden:
                # The intersection: the configuration alone names ports sshd may not listen on (files
                # changed, sshd not reloaded; a bind that failed), the listening sockets alone are
                # everyone's (a web server's 443 is not sshd's to keep open); sshd binds as root.
                ports |= self._configured_ports(seen.root_ports) & seen.root_ports
            return ports

    def _configured_ports(self, root_ports: frozenset[int]) -> frozenset[int]:
        # sshd -T costs ~7 ms, so it is asked again only when the root-owned listening ports change, as
        # they do when a reload moves sshd; a failure keeps the last answer and asks again next time
        if root_ports != self._config_under:
            answer = self._configured()
            if answer is not None:
                self._config_ports, self._config_under = answer, root_ports
        return self._config_ports


def ssh_ports(config: Config, listening: frozenset[int], moves: PortMoves | None = None) -> tuple[int, ...]:
    """The one source of truth for "the SSH port(s)" (the firewall keeps them open, fail2ban guards
    them): the SSH guard's port(s) — both while a port move is open (agent/controls/ssh/portmove.py) — plus
    whatever sshd listens on now."""
    ports = set(listening)
    if config.ssh.enabled:
        ports.update(moves.ports(config) if moves is not None else (config.ssh.port,))
    return tuple(sorted(ports))


def ports_now(listening: Callable[[], frozenset[int]], moves: PortMoves, config: Config) -> SshPorts:
    """What the engine hands every guard at the start of a converge: one read of sshd's sockets, one answer."""
    now = listening()
    return SshPorts(now, ssh_ports(config, now, moves))

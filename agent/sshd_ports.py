"""The TCP ports sshd listens on now, in this network namespace: one answer for the firewall (which
keeps them open), fail2ban (which watches them) and the SSH port move (which moves from them).

sshd makes itself non-dumpable, and reading a non-dumpable process's /proc/PID/fd takes
CAP_SYS_PTRACE, which vps-agent.service does not grant. Where sshd's sockets can be read, they are
the answer; where they cannot, the ports of sshd's effective configuration (`sshd -T`) that a socket
owned by root listens on here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from agent.config import Config
from agent.controls.sshd_config import configured_ports
from agent.paths import SystemRoot
from agent.portmove import PortMoves
from agent.system import netfilter

LISTENING_TTL = 0.2  # seconds: longer than one transaction, far shorter than any sshd port move
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
    """Shared by the firewall, fail2ban and the daemon (build_controls, agent/wiring.py): they agree, share the cost."""

    def __init__(
        self,
        root: SystemRoot,
        configured: Callable[[], frozenset[int] | None] | None = None,
        listening: Callable[[], netfilter.Listening] = lambda: netfilter.tcp_listening("sshd", SSHD_EXECUTABLES),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._configured = configured or (lambda: configured_ports(root))
        self._listening = listening
        self._clock = clock
        self._lock = threading.Lock()
        self._read: tuple[float, frozenset[int]] | None = None  # (when, ports) of the last read
        self._config_ports: frozenset[int] = frozenset()  # sshd -T's ports, last time it answered
        self._config_under: frozenset[int] | None = None  # the root-owned listening ports it was asked under

    def __call__(self) -> frozenset[int]:
        """Read at most once per LISTENING_TTL: a transaction's observe, desired and preconditions all ask."""
        with self._lock:
            if self._read is not None and self._clock() - self._read[0] <= LISTENING_TTL:
                return self._read[1]
        return self.fresh()

    def fresh(self) -> frozenset[int]:
        """Read now (the port move waits on this for sshd to let go of a port)."""
        with self._lock:
            seen = self._listening()
            ports = seen.ports
            if seen.hidden:
                # The intersection: the configuration alone names ports sshd may not listen on (files
                # changed, sshd not reloaded; a bind that failed), the listening sockets alone are
                # everyone's (a web server's 443 is not sshd's to keep open); sshd binds as root.
                ports |= self._configured_ports(seen.root_ports) & seen.root_ports
            self._read = (self._clock(), ports)
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
    them): the SSH guard's port(s) — both while a port move is open (agent/portmove.py) — plus
    whatever sshd listens on now."""
    ports = set(listening)
    if config.ssh.enabled:
        ports.update(moves.ports(config) if moves is not None else (config.ssh.port,))
    return tuple(sorted(ports))

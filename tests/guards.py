"""The guards as the tests build them: the SSH ports a converge hands its guard (the engine's SshPorts,
agent/controls/base.py) and the SSH guard with the shared objects it requires."""

from __future__ import annotations

from agent.config import Config
from agent.controls.base import SshPorts
from agent.controls.ssh.control import SshdControl
from agent.controls.ssh.keylogins import KeyLogins
from agent.controls.ssh.portmove import PortMoves
from agent.paths import SystemRoot
from agent.system.services import ServiceManager

NO_SSH = SshPorts()  # a guard that does not look at the SSH ports (sysctl, accounts, strict, a test control)


def ssh_at(*ports: int) -> SshPorts:
    """sshd listening on `ports`, and those the SSH ports (no port move open)."""
    return SshPorts(frozenset(ports), tuple(sorted(ports)))


def no_ssh_ports(config: Config) -> SshPorts:
    """The engine's ports_now for a runner whose guard ignores them."""
    return NO_SSH


def ssh_guard(root: SystemRoot, moves: PortMoves | None = None, services: ServiceManager | None = None) -> SshdControl:
    """The SSH guard with its own port move state and key-login proofs (the daemon shares them: SshShared)."""
    return SshdControl(root, moves or PortMoves(root), KeyLogins(root), services)


# the firewall's and fail2ban's tests: sshd listens on 22, the config asks for ssh.port 2222 (both are kept)
SSH_ON_22_FOR_2222 = SshPorts(frozenset({22}), (22, 2222))
SSH_2222 = SshPorts(frozenset(), (2222,))  # sshd not running (a fake root), ssh.port 2222

"""Builds what the daemon and the console both run: the guards, sharing what they must, and the converge
transaction's context. `vps-agent run` and `vps-agentctl check` wire them the same way from here, so the
console never imports the daemon."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent import events as ev
from agent.config import Config
from agent.controls.accounts import AccountsControl
from agent.controls.base import Control, SshPorts
from agent.controls.fail2ban import Fail2banControl
from agent.controls.firewall import FirewallControl
from agent.controls.ssh.control import SshdControl
from agent.controls.ssh.keylogins import KeyLogins
from agent.controls.ssh.portmove import PortMoves
from agent.controls.ssh.ports import SshdPorts, ports_now
from agent.controls.ssh.sshd_config import password_logins
from agent.controls.strict import StrictControl
from agent.controls.sysctl import SysctlControl
from agent.engine import transaction as tx
from agent.paths import SystemRoot
from agent.system import backups, dpkg, fs


@dataclass(frozen=True)
class SshShared:
    """What the SSH guard, the port move and the engine share: one port move's state, one reader of what
    sshd listens on, the proven key logins. Made once per process (the daemon, one console command)."""

    moves: PortMoves
    listening: SshdPorts
    keylogins: KeyLogins

    @classmethod
    def of(cls, root: SystemRoot) -> SshShared:
        return cls(PortMoves(root), SshdPorts(root), KeyLogins(root))

    def ports_now(self, config: Config) -> SshPorts:
        """The engine's SSH ports for one converge (agent/controls/ssh/ports.py)."""
        return ports_now(self.listening, self.moves, config)


def build_controls(root: SystemRoot, shared: SshShared, ssh_guard_heals: Callable[[], bool]) -> list[Control]:
    """The guards. Only the SSH guard knows the port move (agent/controls/ssh/portmove.py) and the proven key
    logins (keylogins.py); the firewall and fail2ban get the SSH ports from the engine (SshShared.ports_now).
    fail2ban's jail mode follows whether sshd takes passwords: what the SSH guard holds sshd to while it
    heals (`ssh_guard_heals`: enabled, not paused), else what sshd -T says."""
    ssh = SshdControl(root, moves=shared.moves, keylogins=shared.keylogins)

    def passwords(config: Config) -> bool | None:
        if ssh_guard_heals():
            return ssh.password_logins_held_to(config)
        return password_logins(root)

    return [
        ssh,
        FirewallControl(root),
        Fail2banControl(root, password_logins=passwords),
        AccountsControl(root),
        SysctlControl(root),
        StrictControl(root),  # profile: strict alone
    ]


def transaction_context(root: SystemRoot, config: Config, events: ev.Events) -> tx.TransactionContext:
    store = backups.BackupStore(root.backups_dir, config.backups.keep, root.system_name, root.path)

    def package_manager_busy() -> str | None:
        holder = dpkg.holder(root)
        return holder.describe() if holder else None

    return tx.TransactionContext(events, store, fs.EchoFilter(), package_manager_busy)

"""Builds what the daemon and the console both run: the guards, sharing what they must, and the converge
transaction's context. `vps-agent run` and `vps-agentctl check` wire them the same way from here, so the
console never imports the daemon."""

from __future__ import annotations

from collections.abc import Callable

from agent import events as ev
from agent.config import Config
from agent.controls.accounts import AccountsControl
from agent.controls.base import Control
from agent.controls.fail2ban import Fail2banControl
from agent.controls.firewall import FirewallControl
from agent.controls.sshd import SshdControl
from agent.controls.sshd_config import password_logins
from agent.controls.strict import StrictControl
from agent.controls.sysctl import SysctlControl
from agent.engine import transaction as tx
from agent.keylogins import KeyLogins
from agent.paths import SystemRoot
from agent.portmove import PortMoves
from agent.sshd_ports import SshdPorts
from agent.system import backups, dpkg, fs


def build_controls(
    root: SystemRoot,
    moves: PortMoves | None = None,
    sshd_ports: SshdPorts | None = None,
    keylogins: KeyLogins | None = None,
    ssh_guard_heals: Callable[[], bool] = lambda: False,
) -> list[Control]:
    """The guards; ssh, firewall and fail2ban share the SSH port move's state (agent/portmove.py), and
    the firewall and fail2ban what sshd listens on (agent/sshd_ports.py); the SSH guard reads the
    proven key logins (agent/keylogins.py) the daemon records. fail2ban's jail mode follows whether sshd
    takes passwords: what the SSH guard holds sshd to while it heals (`ssh_guard_heals`: enabled, not
    paused), else what sshd -T says."""
    moves = moves or PortMoves(root)
    sshd_ports = sshd_ports or SshdPorts(root)
    ssh = SshdControl(root, moves=moves, keylogins=keylogins or KeyLogins(root))

    def passwords(config: Config) -> bool | None:
        if ssh_guard_heals():
            return ssh.password_logins_held_to(config)
        return password_logins(root)

    return [
        ssh,
        FirewallControl(root, sshd_ports, moves=moves),
        Fail2banControl(root, listening_ports=sshd_ports, moves=moves, password_logins=passwords),
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

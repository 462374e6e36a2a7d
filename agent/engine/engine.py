"""The engine: the controls' runners, the watches that feed them, the config they all read."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from agent.config import Config
from agent.controls.base import Control, SshPorts
from agent.engine import transaction as tx
from agent.engine.runner import ControlRunner
from agent.engine.watch import DirectoryWatcher, NetlinkWatcher

STUCK_AFTER = 120.0  # a transaction running longer than this means the agent is wedged


# guard -> the guards whose desired state depends on what it applies: the admin the accounts guard creates is
# the SSH guard's way in (its lockout check), whether sshd takes passwords sets fail2ban's jail mode
FOLLOWS: dict[str, tuple[str, ...]] = {"accounts": ("ssh",), "ssh": ("fail2ban",)}


class Engine:
    def __init__(
        self,
        controls: Sequence[Control],
        config: Config,
        ctx: tx.TransactionContext,
        ssh_ports: Callable[[Config], SshPorts],
    ) -> None:
        """`ssh_ports` works out the SSH ports (agent/wiring.py: SshShared.ports_now); each converge asks it once
        and hands the answer to the guard's desired(): the firewall keeps them open, fail2ban guards them."""
        self._config = config
        self._config_lock = threading.Lock()
        self.ctx = ctx
        self.watcher = DirectoryWatcher(ctx.echo)
        self.netlink = NetlinkWatcher()
        self.runners = {
            c.name: ControlRunner(c, self.config, ctx, ssh_ports, self._after_converge, on_heal=self._healed)
            for c in controls
        }
        # called after every converge (the metrics textfile); each must return at once
        self.converge_listeners: list[Callable[[], None]] = []
        self.started_at = time.time()

    def config(self) -> Config:
        with self._config_lock:
            return self._config

    def replace_config(self, config: Config) -> None:
        with self._config_lock:
            self._config = config
        self.refresh_watches()
        for runner in self.runners.values():
            runner.trigger("config reloaded", immediate=True, admin=True)

    def start(self) -> None:
        self.refresh_watches()
        self.watcher.start()
        self.netlink.start()
        for runner in self.runners.values():
            runner.start()

    def reconcile_all(
        self, reason: str, timeout: float = 120.0, *, admin: bool = False
    ) -> dict[str, tx.Outcome | None]:
        """Converge every control now and wait (the start-up reconcile: drift that built up while the
        agent was down counts toward flap damping like any other; admin=True for the admin's asks)."""
        results: dict[str, tx.Outcome | None] = {}
        done = {name: threading.Event() for name in self.runners}
        leaders = {f: [n for n, after in FOLLOWS.items() if f in after and n in self.runners] for f in self.runners}
        deadline = time.monotonic() + timeout
        threads = []
        for name, runner in self.runners.items():

            def work(n: str = name, r: ControlRunner = runner) -> None:
                try:
                    # a guard that follows another converges once that one has: fail2ban sees what sshd ends up with
                    for leader in leaders[n]:
                        done[leader].wait(max(deadline - time.monotonic(), 0.0))
                    results[n] = r.converge_and_wait(reason, max(deadline - time.monotonic(), 1.0), admin=admin)
                finally:
                    done[n].set()

            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        self.refresh_watches()
        return results

    def heals(self, name: str) -> bool:
        """Whether the guard `name` heals what it guards now: enabled, remediating, not paused (backing off from
        flapping still counts: it heals once the changes stop)."""
        runner = self.runners.get(name)
        if runner is None:
            return False
        config = self.config()
        meta = runner.control.meta(config)
        return meta.enabled and meta.remediates and runner.state.paused_until is None

    def _healed(self, name: str) -> None:
        """A heal of one guard can change another's desired state (FOLLOWS). The agent's own writes are no
        inotify event (echo filter), so say it here."""
        for dependent in FOLLOWS.get(name, ()):
            runner = self.runners.get(dependent)
            if runner is not None:
                runner.trigger(f"the {name} guard changed", immediate=True, admin=True)

    def _after_converge(self) -> None:
        self.refresh_watches()
        for listener in self.converge_listeners:
            listener()

    def refresh_watches(self) -> None:
        """(Re)arm each control's directory watches; runs after every converge, so a directory deleted
        and made again (sshd_config.d) or a new Include target gets watched."""
        config = self.config()
        for name, runner in self.runners.items():
            control = runner.control
            enabled = control.meta(config).enabled
            directories = control.watches(config) if enabled else []
            self.watcher.set_watches(name, directories, runner.trigger)
            self.netlink.set_watches(name, control.netlink_groups(config) if enabled else [], runner.trigger)
        self.watcher.forget_move_records()

    def stuck_runners(self) -> list[str]:
        now = time.monotonic()
        return [n for n, r in self.runners.items() if r.busy_since is not None and now - r.busy_since > STUCK_AFTER]

    def status(self) -> list[dict[str, Any]]:
        return [r.state.snapshot(n) for n, r in self.runners.items()]

    def watched(self) -> list[str]:
        return self.watcher.watched() + self.netlink.watched()

    def stop(self, timeout: float = 30.0) -> None:
        """Every worker is told at once and all share one deadline: a stop waits for the slowest worker,
        not for the sum of them (five guards each finishing a heal took up to 5 x 30 s, past systemd's
        TimeoutStopSec)."""
        for runner in self.runners.values():
            runner.request_stop()
        self.watcher.stop()
        self.netlink.stop()
        deadline = time.monotonic() + timeout
        for runner in self.runners.values():
            runner.stop(max(deadline - time.monotonic(), 0.0))

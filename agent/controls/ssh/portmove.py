"""Moving SSH to another port without locking anyone out: two phases, across three guards.

Done in one step, a port move locks the admin out whenever something between them and the VPS (a
provider's firewall, a corporate proxy, a typo) does not let the new port through. So when
`ssh.port` changes, the move opens first: sshd listens on the old *and* the new port, the firewall
accepts both, fail2ban watches both. The old port closes only once the new one is proven: a
successful login on it (sshd's log, `LogLevel VERBOSE` for the move's duration, names the local port
of each connection) or `vps-agentctl confirm`. Without proof within `ssh.confirm_timeout`, the move
rolls back: sshd, the firewall and fail2ban return to the old port, and stay there (the config's
port is refused, and status says so) until the admin changes the config again.

This module holds the state (kept in /var/lib/vps-agent/port-move.json, so a restart or a reboot
in the middle keeps the old port open) and decides; the guards only ask `ports(config)`.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from agent.config import Config, format_duration
from agent.paths import SystemRoot
from agent.system import fs
from agent.system.journal import SshdLogin

STARTED, CANCELLED = "started", "cancelled"
OPEN = "open"  # both ports open, waiting for proof
ROLLED_BACK = "rolled-back"  # no proof in time: the old port stays, the config's port is refused


@dataclass
class MoveState:
    phase: str
    old: list[int]
    new: int
    started: float
    deadline: float
    digest: str  # the config file that asked for it: a rolled-back move is retried only when it changes
    confirmed_by: str = ""

    def seconds_left(self, now: float) -> float:
        return max(0.0, self.deadline - now)


def config_digest(config: Config) -> str:
    """What identifies "the admin asked again": the ssh section as loaded."""
    return hashlib.sha256(repr(config.ssh).encode()).hexdigest()[:16]


def confirming_login(logins: Iterable[SshdLogin], port: int) -> str | None:
    """The first login sshd accepted on `port` (agent/system/journal.py: trusted entries only), as "user
    from address (method)", or None."""
    for login in logins:
        if login.local_port == port:
            return f"{login.user} from {login.address} ({login.method})"
    return None


class PortMoves:
    """The state of the SSH port move, shared by the SSH, firewall and fail2ban guards."""

    def __init__(self, root: SystemRoot) -> None:
        self.root = root
        self._lock = threading.Lock()
        self.state, self.problem = self._load()

    # what the guards ask ------------------------------------------------------------------------------

    def ports(self, config: Config) -> tuple[int, ...]:
        """The ports sshd must listen on now (and the firewall keep open, and fail2ban watch)."""
        with self._lock:
            state = self.state
        if state is not None and state.new == config.ssh.port:
            if state.phase == OPEN:
                return tuple(sorted({*state.old, state.new}))
            if state.phase == ROLLED_BACK:
                return tuple(sorted(state.old))
        return (config.ssh.port,)

    def verbose_logging(self, config: Config) -> bool:
        """While a move is open sshd logs each connection's local port (LogLevel VERBOSE)."""
        with self._lock:
            return self.state is not None and self.state.phase == OPEN and self.state.new == config.ssh.port

    def take_problem(self) -> str | None:
        """What went wrong with port-move.json (unreadable at start-up, not saved), once: the daemon and
        the port-move thread both report it, and only one of them may."""
        with self._lock:
            problem, self.problem = self.problem, None
        return problem

    def current(self) -> MoveState | None:
        with self._lock:
            return self.state

    # the decisions ------------------------------------------------------------------------------------

    def on_config(self, config: Config, listening: frozenset[int], now: float) -> tuple[str, str] | None:
        """A config was loaded (start-up, reload) and sshd listens on `listening`: start, keep, cancel
        or retry a move. Returns (STARTED or CANCELLED, what happened) for the event, or None."""
        if not config.ssh.enabled or not listening:
            return None  # sshd is not running (or not ours): nothing to move from, the port just applies
        wanted, digest = config.ssh.port, config_digest(config)
        with self._lock:
            state = self.state
            if state is not None and state.phase == OPEN:
                if wanted == state.new:
                    return None
                # the admin changed their mind: from the old port(s) to the newest wish
                if wanted in state.old:
                    self._set(None)
                    return CANCELLED, f"port move to {state.new} cancelled: ssh.port is {wanted} again"
                old = state.old
            elif state is not None and state.phase == ROLLED_BACK and wanted == state.new and digest == state.digest:
                return None  # still refused: the same config that was not confirmed in time
            else:
                if wanted in listening and len(listening) == 1:
                    self._set(None)
                    return None
                old = sorted(listening - {wanted}) or sorted(listening)
                if wanted in listening:
                    # sshd already listens on the wanted port too (a move finished by hand, a crash in
                    # the middle of one): nothing to prove, the extra ports just close
                    self._set(None)
                    return None
            timeout = config.ssh.confirm_timeout
            self._set(MoveState(OPEN, list(old), wanted, now, now + timeout, digest))
        olds = ", ".join(str(p) for p in old)
        return STARTED, (
            f"port move {olds} -> {wanted} started: sshd, the firewall and fail2ban keep both until a login "
            f"on {wanted} or `vps-agentctl confirm`; otherwise back to {olds} in {format_duration(timeout)}"
        )

    def confirm(self, how: str) -> MoveState | None:
        """Proof the new port works: the old one may close. Returns the finished move."""
        with self._lock:
            state = self.state
            if state is None or state.phase != OPEN:
                return None
            state.confirmed_by = how
            self._set(None)
            return state

    def expire(self, now: float) -> MoveState | None:
        """Past the deadline without proof: roll back to the old port. Returns the rolled-back move."""
        with self._lock:
            state = self.state
            if state is None or state.phase != OPEN or now < state.deadline:
                return None
            state.phase = ROLLED_BACK
            self._set(state)
            return state

    # persistence --------------------------------------------------------------------------------------

    def _set(self, state: MoveState | None) -> None:
        self.state = state
        path = self.root.port_move_state
        try:
            if state is None:
                path.unlink(missing_ok=True)
            else:
                fs.ensure_dir(path.parent, 0o755)
                data = json.dumps(asdict(state), indent=1, sort_keys=True) + "\n"
                fs.atomic_write(path, data.encode(), mode=0o644)
        except OSError as exc:
            self.problem = f"cannot save {self.root.system_name(path)}: {exc}"

    def _load(self) -> tuple[MoveState | None, str | None]:
        path = self.root.port_move_state
        try:
            raw = fs.read_regular(path)
            if raw is None:
                return None, None
            data: dict[str, Any] = json.loads(raw)
            known = set(MoveState.__dataclass_fields__)
            return MoveState(**{k: v for k, v in data.items() if k in known}), None
        except (fs.UnsafeFile, OSError, ValueError, TypeError) as exc:
            # unreadable: the safe reading is "no move in flight"; sshd -T still shows what listens
            return None, f"{self.root.system_name(path)}: unreadable ({exc})"

    def status(self, config: Config, now: float | None = None) -> dict[str, Any] | None:
        state = self.current()
        if state is None:
            return None
        now = time.time() if now is None else now
        return {
            "phase": state.phase,
            "old": state.old,
            "new": state.new,
            "started": state.started,
            "deadline": state.deadline,
            "seconds_left": round(state.seconds_left(now)) if state.phase == OPEN else None,
            "applies": state.new == config.ssh.port,
        }

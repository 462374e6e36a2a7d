"""What sshd's own journal proves, and what follows from it: a login on the new port ends a port move (or
its deadline rolls it back), a sudo admin's key login lets password logins go off; `vps-agentctl confirm`
vouches for both. One thread, reading the journal every 2 s only while a proof is awaited."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from agent import events as ev
from agent.config import Config, format_duration
from agent.controls.ssh import portmove
from agent.controls.ssh.keylogins import CONFIRMED, KeyLogins, KeyProof, proofs_from
from agent.controls.ssh.portmove import PortMoves
from agent.controls.ssh.ports import SshdPorts
from agent.engine.engine import Engine
from agent.paths import SystemRoot
from agent.system import journal

KEY_LOGIN_LOOKBACK = 86400.0  # seconds: a key login this long before the agent looks still proves the key
SSHD_RELEASE_WAIT = 5.0  # seconds: how long a finished port move waits for sshd to let go of a port


class Proofs:
    def __init__(
        self,
        root: SystemRoot,
        events: ev.Events,
        engine: Engine,
        moves: PortMoves,
        keylogins: KeyLogins,
        sshd_ports: SshdPorts,
        stopping: threading.Event,
    ) -> None:
        self.root = root
        self.ssh_events = events.of("ssh")  # every event here is the SSH guard's
        self.engine = engine
        self.moves = moves
        self.keylogins = keylogins
        self.sshd_ports = sshd_ports
        self.stopping = stopping
        self.wake = keylogins.awaiting_changed  # a new wait for a key login wakes the watcher too
        self._key_cursor: str | None = None  # sshd's journal, read up to here for key logins
        self._thread = threading.Thread(target=self._watch, name="login-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def port_move_for(self, config: Config) -> None:
        """A config is about to apply: does it move sshd's port? Judged against what sshd listens on."""
        change = self.moves.on_config(config, self.sshd_ports(), time.time())
        if change is not None:
            action, message = change
            state = self.moves.current()
            self.ssh_events.emit(
                ev.PORT_MOVE_STARTED if action == portmove.STARTED else ev.PORT_MOVE_CANCELLED,
                message,
                outcome="success",
                old_ports=state.old if state else None,
                new_port=state.new if state else config.ssh.port,
                deadline=state.deadline if state else None,
            )
        self.report_move_state_problem()
        self.wake.set()

    def report_move_state_problem(self) -> None:
        """port-move.json was unreadable at start-up (no move in flight, then) or could not be saved."""
        self._state_problem(ev.PORT_MOVE_STATE_RESET, self.root.port_move_state, self.moves.take_problem())

    def _state_problem(self, action: str, state_file: Path, problem: str | None) -> None:
        """A state file of the proofs was unreadable (so it starts afresh) or could not be saved."""
        if problem:
            self.ssh_events.emit(
                action, problem, outcome="failure", level="warning", file_path=self.root.system_name(state_file)
            )

    def confirm(self) -> dict[str, Any]:
        """`vps-agentctl confirm`: the admin vouches for what waits for proof: the new SSH port works (the
        old one closes), and a sudo admin's key logs in (password logins go off)."""
        confirmed: list[str] = []
        done = self.moves.confirm(CONFIRMED)
        if done is not None:
            self.port_move_done(ev.PORT_MOVE_CONFIRMED, f"port move to {done.new} confirmed by {CONFIRMED}", done)
            confirmed.append(f"port move to {done.new}: the old port closes")
        keyed = sorted(self.keylogins.awaiting_with_keys)
        for user in keyed:
            self.key_login_proven(KeyProof(user, CONFIRMED, time.time()))
        if keyed:
            ssh = self.engine.runners.get("ssh")
            if ssh is not None:
                ssh.converge_and_wait(f"key login of {', '.join(keyed)} confirmed by {CONFIRMED}")
            confirmed.append(f"key login of {', '.join(keyed)}: password logins go off")
        if not confirmed:
            keyless = sorted(self.keylogins.awaiting - self.keylogins.awaiting_with_keys)
            why = "nothing waits for confirmation: no port move is open and no key login is awaited"
            if keyless:
                why = (
                    f"{', '.join(keyless)} has no key sshd accepts yet: add one (ssh-copy-id), log in with it "
                    "once (that alone turns passwords off), or then run confirm"
                )
            return {"confirmed": False, "why": why}
        return {"confirmed": True, "what": confirmed}

    def key_login_proven(self, proof: KeyProof) -> None:
        known = self.keylogins.proof(proof.user)
        if not self.keylogins.record(proof):
            return
        told = "password logins may go off"
        if known is not None and known.fingerprint == proof.fingerprint:  # only facts of its client are new
            told = "what its client offers and negotiates is recorded (profile: strict)"
        self.ssh_events.emit(
            ev.KEY_LOGIN_PROVEN,
            f"{proof.user}'s key login proven by {proof.how}: {told}",
            outcome="success",
            user_name=proof.user,
            key_fingerprint=proof.fingerprint or None,
            file_path=self.root.system_name(self.root.key_logins_state),
        )
        self.report_key_state_problem()

    def report_key_state_problem(self) -> None:
        for proof in self.keylogins.take_forgotten():
            self.ssh_events.emit(
                ev.KEY_LOGIN_FORGOTTEN,
                f"the key that proved {proof.user}'s login is gone from authorized_keys: password "
                "logins that are on stay on until a key logs in again",
                outcome="success",
                level="warning",
                user_name=proof.user,
                key_fingerprint=proof.fingerprint or None,
            )
        self._state_problem(ev.KEY_LOGIN_FORGOTTEN, self.root.key_logins_state, self.keylogins.take_problem())

    def port_move_done(self, action: str, message: str, move: portmove.MoveState) -> None:
        self.ssh_events.emit(
            action,
            message,
            outcome="success" if action == ev.PORT_MOVE_CONFIRMED else "failure",
            level="info" if action == ev.PORT_MOVE_CONFIRMED else "warning",
            old_ports=move.old,
            new_port=move.new,
        )
        self.report_move_state_problem()
        # sshd first: the firewall and fail2ban follow the ports sshd really listens on
        ssh = self.engine.runners.get("ssh")
        if ssh is not None:
            ssh.converge_and_wait(message)
        self._wait_for_sshd_to_release(move)
        for name, runner in self.engine.runners.items():
            if name != "ssh":
                runner.trigger(message, immediate=True, admin=True)

    def _wait_for_sshd_to_release(self, move: portmove.MoveState) -> None:
        """sshd re-executes after its reload returned, so it still listens on the port(s) the move
        closes for a moment, and the firewall keeps every port sshd listens on open: wait until it
        has let go of them (milliseconds), or SSHD_RELEASE_WAIT if it keeps them (they then stay open)."""
        closing = {*move.old, move.new} - set(self.moves.ports(self.engine.config()))
        deadline = time.monotonic() + SSHD_RELEASE_WAIT
        while closing & self.sshd_ports() and time.monotonic() < deadline:
            time.sleep(0.02)

    def _watch(self) -> None:
        """sshd's journal, read every 2 s while a login there can prove something: a login on the new port
        of an open port move (else it rolls back at the deadline), or a sudo admin's key login the SSH
        guard waits for before password logins go off. Idle otherwise."""
        while not self.stopping.is_set():
            self.report_key_state_problem()
            move = self.moves.current()
            moving = move is not None and move.phase == portmove.OPEN
            awaiting = self.keylogins.awaiting
            if not moving and not awaiting:
                self.wake.wait(60.0)
                self.wake.clear()
                continue
            try:
                if move is not None and moving and self._check_port_move(move):
                    continue
                if awaiting and self.root.is_host:
                    self._look_for_key_logins(awaiting)
            except Exception as exc:  # the deadline must still be kept: log and look again
                self.ssh_events.emit(
                    ev.REMEDIATION_FAILED,
                    f"reading sshd's logins: {type(exc).__name__}: {exc}",
                    outcome="unknown",
                    level="error",
                )
            self.wake.wait(2.0)
            self.wake.clear()

    def _check_port_move(self, move: portmove.MoveState) -> bool:
        """A login on the new port confirms the move; the deadline rolls it back. True: it ended."""
        who = self._login_on(move) if self.root.is_host else None
        if who is not None:
            done = self.moves.confirm(f"a login on port {move.new}: {who}")
            if done is not None:
                self.port_move_done(
                    ev.PORT_MOVE_CONFIRMED, f"port move to {done.new} confirmed by {done.confirmed_by}", done
                )
                return True
        expired = self.moves.expire(time.time())
        if expired is not None:
            olds = ", ".join(str(p) for p in expired.old)
            self.port_move_done(
                ev.PORT_MOVE_ROLLED_BACK,
                f"port move to {expired.new} rolled back to {olds}: no login on {expired.new} and no "
                f"`vps-agentctl confirm` within {format_duration(expired.deadline - expired.started)}; "
                f"ssh.port {expired.new} is refused until the config changes",
                expired,
            )
            return True
        return False

    def _look_for_key_logins(self, awaiting: frozenset[str]) -> None:
        """The newest publickey login sshd logged for each awaited admin: proof its key works. The first
        look reaches back KEY_LOGIN_LOOKBACK (a login made before the agent started counts), later ones
        go on from the last entry read."""
        since = None if self._key_cursor else time.time() - KEY_LOGIN_LOOKBACK
        logins, self._key_cursor = journal.sshd_logins(since=since, after_cursor=self._key_cursor)
        proofs = proofs_from(logins, awaiting)
        for proof in proofs:
            self.key_login_proven(proof)
        if proofs:
            ssh = self.engine.runners.get("ssh")
            if ssh is not None:
                users = ", ".join(proof.user for proof in proofs)
                ssh.trigger(f"key login of {users}", immediate=True, admin=True)

    def _login_on(self, move: portmove.MoveState) -> str | None:
        """sshd's log since the move began (journald; LogLevel VERBOSE names each connection's port)."""
        logins, _ = journal.sshd_logins(since=move.started)
        return portmove.confirming_login(logins, move.new)

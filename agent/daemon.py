"""`vps-agent run`: wires config, controls, engine, IPC and sd_notify, then keeps the watchdog fed."""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent import __version__, portmove
from agent import events as ev
from agent.config import Config, ConfigError, format_duration, load_config, parse_duration
from agent.engine import faults, recovery
from agent.engine.engine import Engine
from agent.ipc import IpcError, IpcServer, Request
from agent.keylogins import CONFIRMED, KeyLogins, KeyProof, proofs_from
from agent.paths import SystemRoot
from agent.portmove import PortMoves
from agent.sinks.outputs import Outputs
from agent.sshd_ports import SshdPorts
from agent.system import fs, journal, namespace
from agent.system.sdnotify import Notifier
from agent.updates import UpgradeScheduler
from agent.wiring import build_controls, transaction_context

LAST_GOOD_CONFIG = "config.last-good.yaml"
KEY_LOGIN_LOOKBACK = 86400.0  # seconds: a key login this long before the agent looks still proves the key
SSHD_RELEASE_WAIT = 5.0  # seconds: how long a finished port move waits for sshd to let go of a port


class Daemon:
    def __init__(self, root: SystemRoot, config_path: Path) -> None:
        self.root = root
        self.config_path = config_path
        self.notifier = Notifier()
        self.stopping = threading.Event()
        self.reload_requested = False
        self._stop_requested = False
        self._reload_lock = threading.Lock()
        # self-pipe: a signal handler may not take locks (Event.set could deadlock the main thread)
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.config_error: str | None = None
        config = self._initial_config()
        self.events = ev.Events(
            ev.EventSinks(
                root.path(config.events.file), to_stdout=config.events.stdout, ring_size=config.events.ring_size
            )
        )
        self.moves = PortMoves(root)
        self.sshd_ports = SshdPorts(root)
        self.keylogins = KeyLogins(root)
        ctx = transaction_context(root, config, self.events)
        ctx.fault = faults.from_environment(not root.is_host)  # tests only; refused on a real host
        self.engine = Engine(
            build_controls(root, self.moves, self.sshd_ports, self.keylogins, lambda: self.engine.heals("ssh")),
            config,
            ctx,
        )
        self._move_wake = self.keylogins.awaiting_changed  # a new wait for a key login wakes the watcher too
        self._key_cursor: str | None = None  # sshd's journal, read up to here for key logins
        self._move_thread = threading.Thread(target=self._watch_logins, name="login-watch", daemon=True)
        self.upgrades = UpgradeScheduler(root, self.engine.config, self.events)
        self.ipc = IpcServer(root.socket, self.handle)  # before the outputs: the metrics render status(), ipc too
        # events: the journal, remote syslog and the metrics textfile (agent/sinks)
        self.outputs = Outputs(root, self.events, self.status)
        self.outputs.apply(config)
        self.engine.converge_listeners.append(self.outputs.changed)

    def _initial_config(self) -> Config:
        """The config file, or the last good one when the file is broken: the guards never go unmanned."""
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            fallback = self.root.state_dir / LAST_GOOD_CONFIG
            if not fallback.is_file():
                raise
            self.config_error = str(exc)
            return load_config(fallback)
        self._remember_good_config()
        return config

    def _remember_good_config(self) -> None:
        if self.config_path.is_file():
            fs.ensure_dir(self.root.state_dir, 0o755)
            data = fs.read_regular(self.config_path, follow_symlinks=True) or b""
            fs.atomic_write(self.root.state_dir / LAST_GOOD_CONFIG, data, mode=0o600)

    # lifecycle ----------------------------------------------------------------------------------------

    def run(self) -> int:
        # A signal may land on any of the daemon's threads; then the main thread's select() is not
        # interrupted and the Python handler waits for it (up to a minute): the C handler writes to the
        # pipe instead, from whichever thread took the signal.
        signal.set_wakeup_fd(self._wake_write, warn_on_full_buffer=False)
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        for directory in (self.root.state_dir, self.root.backups_dir):
            fs.ensure_dir(directory, 0o700 if directory == self.root.backups_dir else 0o755)
        self.events.emit(
            ev.AGENT_STARTED,
            outcome="success",
            message=f"vps-agent {__version__} started (root {self.root.prefix})",
            version=__version__,
            root=str(self.root.prefix),
            pid=os.getpid(),
        )
        if self.config_error:
            self.events.emit(
                ev.CONFIG_REJECTED,
                outcome="failure",
                level="error",
                file_path=str(self.config_path),
                message=f"config rejected, running on the last good config: {self.config_error}",
                error=self.config_error,
            )
        recovery.at_start_up(self.root, self.engine.ctx, [r.control for r in self.engine.runners.values()])
        self.ipc.start()
        self.engine.start()
        self._port_move_for(self.engine.config())
        self._move_thread.start()
        self.engine.reconcile_all("start-up reconcile")
        self.upgrades.start()
        self.notifier.ready(self.summary())
        interval = self.notifier.watchdog_interval()
        last_status = ""
        try:
            while not self.stopping.is_set():
                select.select([self._wake_read], [], [], interval if interval else 60.0)
                self._drain_wakeups()
                if self.stopping.is_set():
                    break
                if self.reload_requested:
                    self.reload_requested = False
                    self.reload_config()
                # feed the watchdog only while every control's worker is alive and not wedged
                if interval and not self.engine.stuck_runners():
                    self.notifier.watchdog()
                summary = self.summary()
                if summary != last_status:
                    self.notifier.status(summary)
                    last_status = summary
        finally:
            self.notifier.stopping()
            self.events.emit(ev.AGENT_STOPPING, outcome="success", message="vps-agent stopping")
            self.ipc.stop()
            self._move_wake.set()
            self.upgrades.stop()
            self.engine.ctx.stopping.set()  # a transaction in its write phase rolls back
            self.engine.stop()
            self.outputs.close()
            self.events.sinks.close()
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self._stop_requested = True
        try:
            os.write(self._wake_write, b"x")  # once more, should the main loop have drained the C handler's byte
        except BlockingIOError:
            pass  # the pipe is full: the main loop is already awake

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_read, 512):
                pass
        except BlockingIOError:
            pass
        if self._stop_requested:
            self.stopping.set()

    def reload_config(self) -> dict[str, Any]:
        """SIGHUP and `vps-agentctl reload`: re-read the config (keep the old on error), reopen the log."""
        with self._reload_lock:
            return self._reload_config()

    def _reload_config(self) -> dict[str, Any]:
        self.notifier.reloading()
        self.events.sinks.reopen()
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            self.config_error = str(exc)
            self.events.emit(
                ev.CONFIG_REJECTED,
                outcome="failure",
                level="error",
                file_path=str(self.config_path),
                message=f"new config rejected, the previous one stays in force: {exc}",
                error=str(exc),
            )
            self.notifier.ready(self.summary())
            return {"ok": False, "error": str(exc)}
        self.config_error = None
        self._remember_good_config()
        self.engine.ctx.backups.keep = config.backups.keep
        self._port_move_for(config)
        self.engine.replace_config(config)
        self.upgrades.config_changed()
        self.outputs.apply(config)
        self.events.emit(
            ev.CONFIG_RELOADED, outcome="success", file_path=str(self.config_path), message="config reloaded"
        )
        self.notifier.ready(self.summary())
        return {"ok": True}

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for item in self.engine.status():
            counts[item["status"]] = counts.get(item["status"], 0) + 1
        text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        return f"{text}" + (" (config rejected: running on the previous one)" if self.config_error else "")

    # IPC ----------------------------------------------------------------------------------------------

    def handle(self, request: Request) -> Any:
        verb, args = request.verb, request.args
        if verb == "status":
            return self.status()
        if verb == "events":
            return self._events(args)
        if verb == "pause":
            return self._pause(args)
        if verb == "resume":
            selected = self._select(args)
            for runner in selected:
                runner.resume()
                self.events.emit(ev.RESUMED, outcome="success", control=runner.name, message=f"{runner.name}: resumed")
            return {"resumed": [r.name for r in selected]}
        if verb == "converge":
            outcomes = {}
            for runner in self._select(args):
                outcome = runner.converge_and_wait("vps-agentctl converge")
                outcomes[runner.name] = outcome.status if outcome else "timeout"
            return {"outcomes": outcomes, "status": self.status()}
        if verb == "reload":
            return self.reload_config()
        if verb == "upgrade":
            return self._upgrade(args)
        if verb == "confirm":
            return self._confirm()
        raise IpcError(f"unknown verb {verb!r}")

    def status(self) -> dict[str, Any]:
        config = self.engine.config()
        return {
            "host": socket.gethostname(),
            "version": __version__,
            "pid": os.getpid(),
            "root": str(self.root.prefix),
            "started_at": self.engine.started_at,
            "config": {"path": str(self.config_path), "error": self.config_error},
            "reconcile_interval": format_duration(config.engine.reconcile_interval),
            "watched": self.engine.watched(),
            "events_file_error": self.events.sinks.file_error,
            "events_file_unwritten": self.events.sinks.file_unwritten,  # a full or read-only disk's toll
            "outputs": self.outputs.status(),
            "event_counts": self.events.sinks.counts_by_action(),
            "controls": self.engine.status(),
            "updates": self.upgrades.status(),
            "port_move": self.moves.status(config),
            "ipc": self.ipc.stats(),  # what clients hold on the control socket, and what its caps refused
        }

    # the SSH port move (agent/portmove.py) ---------------------------------------------------------------

    def _port_move_for(self, config: Config) -> None:
        """A config is about to apply: does it move sshd's port? Judged against what sshd listens on."""
        change = self.moves.on_config(config, self.sshd_ports(), time.time())
        if change is not None:
            action, message = change
            state = self.moves.current()
            self.events.emit(
                ev.PORT_MOVE_STARTED if action == portmove.STARTED else ev.PORT_MOVE_CANCELLED,
                outcome="success",
                control="ssh",
                message=message,
                old_ports=state.old if state else None,
                new_port=state.new if state else config.ssh.port,
                deadline=state.deadline if state else None,
            )
        self._report_move_state_problem()
        self._move_wake.set()

    def _report_move_state_problem(self) -> None:
        """port-move.json was unreadable at start-up (no move in flight, then) or could not be saved."""
        problem = self.moves.take_problem()
        if problem:
            self.events.emit(
                ev.PORT_MOVE_STATE_RESET,
                outcome="failure",
                level="warning",
                control="ssh",
                file_path=self.root.system_name(self.root.port_move_state),
                message=problem,
            )

    def _confirm(self) -> dict[str, Any]:
        """`vps-agentctl confirm`: the admin vouches for what waits for proof: the new SSH port works (the
        old one closes), and a sudo admin's key logs in (password logins go off)."""
        confirmed: list[str] = []
        done = self.moves.confirm(CONFIRMED)
        if done is not None:
            self._port_move_done(ev.PORT_MOVE_CONFIRMED, f"port move to {done.new} confirmed by {CONFIRMED}", done)
            confirmed.append(f"port move to {done.new}: the old port closes")
        keyed = sorted(self.keylogins.awaiting_with_keys)
        for user in keyed:
            self._key_login_proven(KeyProof(user, CONFIRMED, time.time()))
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
        return {"confirmed": True, "what": confirmed, "status": self.status()}

    def _key_login_proven(self, proof: KeyProof) -> None:
        known = self.keylogins.proof(proof.user)
        if not self.keylogins.record(proof):
            return
        told = "password logins may go off"
        if known is not None and known.fingerprint == proof.fingerprint:  # only facts of its client are new
            told = "what its client offers and negotiates is recorded (profile: strict)"
        self.events.emit(
            ev.KEY_LOGIN_PROVEN,
            outcome="success",
            control="ssh",
            message=f"ssh: {proof.user}'s key login proven by {proof.how}: {told}",
            user_name=proof.user,
            key_fingerprint=proof.fingerprint or None,
            file_path=self.root.system_name(self.root.key_logins_state),
        )
        self._report_key_state_problem()

    def _report_key_state_problem(self) -> None:
        for proof in self.keylogins.take_forgotten():
            self.events.emit(
                ev.KEY_LOGIN_FORGOTTEN,
                outcome="success",
                level="warning",
                control="ssh",
                message=f"ssh: the key that proved {proof.user}'s login is gone from authorized_keys: password "
                "logins that are on stay on until a key logs in again",
                user_name=proof.user,
                key_fingerprint=proof.fingerprint or None,
            )
        problem = self.keylogins.take_problem()
        if problem:
            self.events.emit(
                ev.KEY_LOGIN_FORGOTTEN,
                outcome="failure",
                level="warning",
                control="ssh",
                file_path=self.root.system_name(self.root.key_logins_state),
                message=problem,
            )

    def _port_move_done(self, action: str, message: str, move: portmove.MoveState) -> None:
        self.events.emit(
            action,
            outcome="success" if action == ev.PORT_MOVE_CONFIRMED else "failure",
            level="info" if action == ev.PORT_MOVE_CONFIRMED else "warning",
            control="ssh",
            message=message,
            old_ports=move.old,
            new_port=move.new,
        )
        self._report_move_state_problem()
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
        while closing & self.sshd_ports.fresh() and time.monotonic() < deadline:
            time.sleep(0.02)

    def _watch_logins(self) -> None:
        """sshd's journal, read every 2 s while a login there can prove something: a login on the new port
        of an open port move (else it rolls back at the deadline), or a sudo admin's key login the SSH
        guard waits for before password logins go off. Idle otherwise."""
        while not self.stopping.is_set():
            self._report_key_state_problem()
            move = self.moves.current()
            moving = move is not None and move.phase == portmove.OPEN
            awaiting = self.keylogins.awaiting
            if not moving and not awaiting:
                self._move_wake.wait(60.0)
                self._move_wake.clear()
                continue
            try:
                if move is not None and moving and self._check_port_move(move):
                    continue
                if awaiting and self.root.is_host:
                    self._look_for_key_logins(awaiting)
            except Exception as exc:  # the deadline must still be kept: log and look again
                self.events.emit(
                    ev.REMEDIATION_FAILED,
                    outcome="unknown",
                    level="error",
                    control="ssh",
                    message=f"ssh: reading sshd's logins: {type(exc).__name__}: {exc}",
                )
            self._move_wake.wait(2.0)
            self._move_wake.clear()

    def _check_port_move(self, move: portmove.MoveState) -> bool:
        """A login on the new port confirms the move; the deadline rolls it back. True: it ended."""
        who = self._login_on(move) if self.root.is_host else None
        if who is not None:
            done = self.moves.confirm(f"a login on port {move.new}: {who}")
            if done is not None:
                self._port_move_done(
                    ev.PORT_MOVE_CONFIRMED, f"port move to {done.new} confirmed by {done.confirmed_by}", done
                )
                return True
        expired = self.moves.expire(time.time())
        if expired is not None:
            olds = ", ".join(str(p) for p in expired.old)
            self._port_move_done(
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
            self._key_login_proven(proof)
        if proofs:
            ssh = self.engine.runners.get("ssh")
            if ssh is not None:
                users = ", ".join(proof.user for proof in proofs)
                ssh.trigger(f"key login of {users}", immediate=True, admin=True)

    def _login_on(self, move: portmove.MoveState) -> str | None:
        """sshd's log since the move began (journald; LogLevel VERBOSE names each connection's port)."""
        logins, _ = journal.sshd_logins(since=move.started)
        return portmove.confirming_login(logins, move.new)

    def _upgrade(self, args: Any) -> dict[str, Any]:
        """`vps-agentctl upgrade --now`: run one now; with wait, answer when it has finished."""
        if self.upgrades.running:
            return {"started": False, "why": "an upgrade is already running", "updates": self.upgrades.status()}
        if not args.get("wait", True):
            threading.Thread(target=self.upgrades.run, args=("vps-agentctl upgrade --now",), daemon=True).start()
            return {"started": True, "updates": self.upgrades.status()}
        result = self.upgrades.run("vps-agentctl upgrade --now")
        if result is None:
            return {"started": False, "why": "an upgrade is already running", "updates": self.upgrades.status()}
        for runner in self.engine.runners.values():  # the guards that waited for this run's dpkg
            runner.dpkg_finished()
        return {
            "started": True,
            "outcome": result.outcome,
            "detail": result.detail,
            "changes": list(result.changes),
            "updates": self.upgrades.status(),
        }

    def _select(self, args: Any) -> list[Any]:
        name = args.get("control")
        if name is None:
            return list(self.engine.runners.values())
        if name not in self.engine.runners:
            raise IpcError(f"no control named {name!r}; controls: {', '.join(self.engine.runners)}")
        return [self.engine.runners[name]]

    def _pause(self, args: Any) -> dict[str, Any]:
        duration = args.get("for")
        if duration is None:
            until = float("inf")
        else:
            try:
                until = time.time() + parse_duration(duration)
            except ValueError as exc:
                raise IpcError(f"--for {duration!r}: expected a duration like 30m, 1h, 1d ({exc})") from exc
        names = []
        for runner in self._select(args):
            runner.pause(until)
            names.append(runner.name)
            self.events.emit(
                ev.PAUSED,
                outcome="success",
                control=runner.name,
                message=f"{runner.name}: paused " + ("until resumed" if until == float("inf") else f"for {duration}"),
                paused_until=None if until == float("inf") else until,
            )
        return {"paused": names, "until": None if until == float("inf") else until}

    def _events(self, args: Any) -> Any:
        count = int(args.get("n", 20))
        control = args.get("control")
        if args.get("follow"):
            return self._follow(count, control)
        return self.events.sinks.recent(count, control)

    def _follow(self, count: int, control: str | None) -> Iterator[dict[str, Any] | None]:
        yield from self.events.sinks.follow(control, self.stopping, backlog=count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vps-agent",
        description="Keep this VPS at its hardened baseline and heal drift within milliseconds.",
    )
    parser.add_argument("--version", action="version", version=f"vps-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the resident daemon (systemd starts this as vps-agent.service)")
    run.add_argument(
        "--root", default="/", metavar="DIR", help="guard the system under DIR instead of / (tests, demos)"
    )
    run.add_argument("--config", metavar="FILE", help="config file (default: ROOT/etc/vps-agent/config.yaml)")
    args = parser.parse_args(argv)
    root = SystemRoot.at(args.root)
    config_path = Path(args.config) if args.config else root.config_file
    try:
        namespace.isolate_fake_root(root)
        daemon = Daemon(root, config_path)
    except (ConfigError, namespace.NamespaceError, faults.FaultSpecError) as exc:
        print(f"vps-agent: {exc}", file=sys.stderr)
        return 2
    return daemon.run()


if __name__ == "__main__":
    sys.exit(main())

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

from agent import __version__
from agent import events as ev
from agent.config import Config, ConfigError, format_duration, load_config, parse_duration
from agent.controls.ssh.proofs import Proofs
from agent.engine import faults, recovery
from agent.engine.engine import Engine
from agent.ipc import IpcError, IpcServer, Request
from agent.paths import SystemRoot
from agent.sinks.outputs import Outputs
from agent.system import fs, namespace, outside
from agent.system.sdnotify import Notifier
from agent.updates import UpgradeScheduler
from agent.wiring import SshShared, build_controls, transaction_context

LAST_GOOD_CONFIG = "config.last-good.yaml"


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
        self.config_missing = False  # started with no config file: on the defaults
        config = self._initial_config()
        self.events = ev.Events(
            ev.EventSinks(
                root.path(config.events.file), to_stdout=config.events.stdout, ring_size=config.events.ring_size
            )
        )
        self.ssh = SshShared.of(root)  # the port move, what sshd listens on, the proven key logins
        ctx = transaction_context(root, config, self.events)
        ctx.fault = faults.from_environment(not root.is_host)  # tests only; refused on a real host
        self.engine = Engine(
            build_controls(root, self.ssh, lambda: self.engine.heals("ssh")), config, ctx, self.ssh.ports_now
        )
        ssh = self.ssh
        self.proofs = Proofs(root, self.events, self.engine, ssh.moves, ssh.keylogins, ssh.listening, self.stopping)
        self.upgrades = UpgradeScheduler(root, self.engine.config, self.events)
        self.ipc = IpcServer(root.socket, self.handle)  # before the outputs: the metrics render status(), ipc too
        # events: the journal, remote syslog and the metrics textfile (agent/sinks)
        self.outputs = Outputs(root, self.events, self.status)
        self.outputs.apply(config)
        self.engine.converge_listeners.append(self.outputs.changed)

    def _initial_config(self) -> Config:
        """The config file, or the last good one when the file is broken: the guards never go unmanned.
        No file at all (the admin removed it) means the defaults, as for `vps-agentctl check`, and a warning."""
        if not os.path.lexists(self.config_path):
            self.config_missing = True
            return Config(source=str(self.config_path))
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
        if self.config_missing:
            self.events.emit(
                ev.CONFIG_MISSING,
                outcome="unknown",
                level="warning",
                file_path=str(self.config_path),
                message=f"{self.missing_note()} (write it, then `vps-agentctl reload`)",
            )
        recovery.at_start_up(self.root, self.engine.ctx, [r.control for r in self.engine.runners.values()])
        self.ipc.start()
        self.engine.start()
        self.proofs.port_move_for(self.engine.config())
        self.proofs.start()
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
            self.proofs.wake.set()
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
        self.config_missing = False
        self._remember_good_config()
        self.engine.ctx.backups.keep = config.backups.keep
        self.proofs.port_move_for(config)
        self.engine.replace_config(config)
        self.upgrades.config_changed()
        self.outputs.apply(config)
        self.events.emit(
            ev.CONFIG_RELOADED, outcome="success", file_path=str(self.config_path), message="config reloaded"
        )
        self.notifier.ready(self.summary())
        return {"ok": True}

    def missing_note(self) -> str:
        return f"no {self.config_path}: running on the defaults"

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
                self.events.of(runner.name).emit(ev.RESUMED, "resumed", outcome="success")
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
            "config": {
                "path": str(self.config_path),
                "error": self.config_error,
                "missing": self.missing_note() if self.config_missing else None,
            },
            "reconcile_interval": format_duration(config.engine.reconcile_interval),
            "watched": self.engine.watched(),
            "events_file_error": self.events.sinks.file_error,
            "events_file_unwritten": self.events.sinks.file_unwritten,  # a full or read-only disk's toll
            "outputs": self.outputs.status(),
            "event_counts": self.events.sinks.counts_by_action(),
            "controls": self.engine.status(),
            "updates": self.upgrades.status(),
            "port_move": self.ssh.moves.status(config),
            "ipc": self.ipc.stats(),  # what clients hold on the control socket, and what its caps refused
        }

    # what sshd's journal proves: the port move and key logins (agent/controls/ssh/proofs.py) ----------------------

    def _confirm(self) -> dict[str, Any]:
        answer = self.proofs.confirm()
        if answer["confirmed"]:
            answer["status"] = self.status()
        return answer

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
            self.events.of(runner.name).emit(
                ev.PAUSED,
                "paused " + ("until resumed" if until == float("inf") else f"for {duration}"),
                outcome="success",
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
    write = sub.add_parser(
        "write-file",
        help="(internal) write /etc/login.defs, /etc/issue or /etc/issue.net for the daemon, outside its sandbox",
    )
    write.add_argument("path", metavar="PATH", help="one of the files the strict guard edits in /etc")
    write.add_argument("--mode", default="644", help="octal file mode (default 644)")
    write.add_argument("--owner", default="0:0", metavar="UID:GID", help="owner (default 0:0)")
    args = parser.parse_args(argv)
    if args.command == "write-file":  # the new content, base64, on stdin (agent/system/outside.py)
        return outside.write_file_main(args.path, args.mode, args.owner)
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

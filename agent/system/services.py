"""The one door to services: systemctl when systemd runs the system, signals to a pidfile otherwise."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from agent.paths import SystemRoot
from agent.system import fs
from agent.system.run import Completed, run

PIDFILE_SETTLE = 0.5  # seconds a missing pid is looked for again (sshd rewrites its pidfile on a reload)


@dataclass(frozen=True)
class ServiceResult:
    ok: bool
    action: str
    detail: str


@dataclass(frozen=True)
class Service:
    """A service as both service managers know it: its systemd unit and its pidfile."""

    unit: str
    pidfile: str  # absolute, as the guarded system names it
    process_name: str
    start_argv: tuple[str, ...]


class ServiceManager:
    """Reload, start and query services of the guarded system.

    In a fake root the agent never starts anything and only signals a process whose pidfile lives
    inside that root: a test can run a real daemon in a namespace; the host's daemons stay untouched.
    """

    def __init__(self, root: SystemRoot) -> None:
        self.root = root
        self.use_systemd = root.is_host and root.systemd_run_dir.is_dir()

    def is_running(self, service: Service, settle: float = PIDFILE_SETTLE) -> bool:
        """The pidfile answers without a fork (this runs on every converge); actions go through systemd.
        sshd rewrites its pidfile as it re-executes on a reload (truncated, then written): a look in between
        finds it empty, so a missing pid is looked for again for `settle` seconds before it counts as
        stopped (a CI run on Debian 12 saw sshd 'not running' right after the agent's own reload, healed
        it with a no-op start, and that heal tipped the guard into flapping)."""
        deadline = time.monotonic() + settle
        while self._pid(service) is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def reload(self, service: Service) -> ServiceResult:
        if self.use_systemd:
            if not self.is_running(service):
                return self._systemctl("start", service)
            return self._systemctl("reload", service)
        pid = self._pid(service)
        if pid is None:
            if not self.root.is_host:
                return ServiceResult(True, "none", f"{service.process_name} is not running in this fake root")
            return self._start_without_systemd(service)
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            return ServiceResult(False, "reload", f"{service.process_name} (pid {pid}) vanished before SIGHUP")
        return ServiceResult(True, "reload", f"sent SIGHUP to {service.process_name} (pid {pid})")

    def is_active(self, unit: str) -> bool | None:
        """systemd's word on a unit; None where systemd does not run this system (a fake root)."""
        if not self.use_systemd:
            return None
        return run(["systemctl", "is-active", "--quiet", unit], timeout=15).ok

    def enable_now(self, unit: str) -> ServiceResult:
        """Enable and start a unit (a dead or never-started service); only where systemd runs the system."""
        if not self.use_systemd:
            return ServiceResult(True, "none", f"{unit} is never started in a fake root")
        result = run(["systemctl", "enable", "--now", unit], timeout=90)
        detail = f"systemctl enable --now {unit}" if result.ok else result.error_text()
        return ServiceResult(result.ok, "start", detail)

    def restart(self, unit: str) -> ServiceResult:
        """Stop and start a unit that runs (for what its reload cannot do); only where systemd runs the system."""
        if not self.use_systemd:
            return ServiceResult(True, "none", f"{unit} is never restarted in a fake root")
        result = run(["systemctl", "restart", unit], timeout=90)
        return ServiceResult(result.ok, "restart", f"systemctl restart {unit}" if result.ok else result.error_text())

    def restart_units(self, units: tuple[str, ...]) -> ServiceResult:
        """A daemon-reload (their drop-ins changed), then each unit restarted: a socket's new ListenStream=.
        Nothing where systemd does not run the system; the first failure stops it and is the result."""
        if not units or not self.use_systemd:
            return ServiceResult(True, "none", "")
        for argv in (["systemctl", "daemon-reload"], *(["systemctl", "restart", unit] for unit in units)):
            result = run(argv, timeout=60)
            if not result.ok:
                return ServiceResult(False, "restart", f"{' '.join(argv)}: {result.error_text()}")
        return ServiceResult(True, "restart", ", ".join(units) + " restarted")

    def _systemctl(self, verb: str, service: Service) -> ServiceResult:
        result: Completed = run(["systemctl", verb, service.unit], timeout=60)
        return ServiceResult(result.ok, verb, f"systemctl {verb} {service.unit}" if result.ok else result.error_text())

    def _start_without_systemd(self, service: Service) -> ServiceResult:
        result = run(list(service.start_argv), timeout=30)
        return ServiceResult(
            result.ok, "start", "started " + service.process_name if result.ok else result.error_text()
        )

    def _pid(self, service: Service) -> int | None:
        """The live pid named by the service's pidfile, if that process is really the service."""
        pidfile: Path = self.root.path(service.pidfile)
        try:
            text = fs.read_text(pidfile, limit=64)
        except fs.UnsafeFile:
            return None
        if not text or not text.strip().isdigit():
            return None
        pid = int(text.strip())
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return None
        return pid if comm == service.process_name else None


def needing_restart(root: SystemRoot) -> list[str] | None:
    """`needrestart -b` (batch mode) when it is installed: services still running old code."""
    if not root.is_host:
        return None
    result = run(["needrestart", "-b"], timeout=120, env={"NEEDRESTART_SUSPEND": "1"})
    if result.returncode == 127:
        return None
    return sorted(
        line.split(":", 1)[1].strip() for line in result.stdout.splitlines() if line.startswith("NEEDRESTART-SVC:")
    )


def reboot() -> Completed:
    """`systemctl reboot`: the upgrades' reboot inside its window (the caller checks it is the host)."""
    return run(["systemctl", "reboot"], timeout=60)

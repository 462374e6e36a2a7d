"""Scheduled apt upgrades: `apt-get update` then `apt-get upgrade`, on a schedule, reported, never
wedging dpkg and never undoing the hardening.

Where apt runs. Not inside the daemon's process tree: vps-agent.service is sandboxed
(ProtectSystem=strict, a narrow capability set) so that a bug in the agent cannot rewrite /usr, and
dpkg needs exactly that. More important still, an upgrade that includes vps-agent itself restarts
vps-agent.service, and systemd stops a service by killing its whole cgroup: an apt-get child of the
daemon would die half way and leave dpkg interrupted. So each apt step runs as a transient systemd
service of its own (`systemd-run --wait`, see agent/system/apt.py), with its own cgroup, its own
RuntimeMaxSec, and no sandbox; it survives the agent's restart. The daemon only decides when, waits,
and reports; `updates.json` in the state directory says a run was under way, so a restarted agent
reports how it ended. Where systemd does not run the host (a container), apt runs as a child.

Hardened conffiles are kept (confdef/confold: the admin's version of a changed conffile wins, with no
prompt), held packages stay held (apt honours holds), and while dpkg runs the guards wait for it
(engine/runner.py) and converge once after: the upgrade never has to fight the agent, nor the agent
the upgrade.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from agent import events as ev
from agent.config import Config
from agent.paths import SystemRoot
from agent.schedule import Schedule, ScheduleError, Window
from agent.system import apt, dpkg, services
from agent.updates.apt_run import run_apt
from agent.updates.host import logged_in_users, reboot_required
from agent.updates.state import (
    CATCH_UP_MAX_DELAY,
    FAILURE,
    INTERRUPTED,
    REBOOT_RETRY,
    SKIPPED,
    SUCCESS,
    TIMEOUT,
    RunResult,
    UpgradeState,
    changes_between,
)

_ECS_OUTCOME = {SUCCESS: "success", FAILURE: "failure", TIMEOUT: "failure", INTERRUPTED: "unknown"}


# ---- the scheduler ----------------------------------------------------------------------------------


class UpgradeScheduler:
    """One thread: sleeps until the next run (or a reboot window), runs, reports. `tick(now)` holds the
    decisions, so tests drive it with a fake clock."""

    def __init__(
        self,
        root: SystemRoot,
        get_config: Callable[[], Config],
        events: ev.Events,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        users: Callable[[], int] = lambda: logged_in_users(),
    ) -> None:
        self.root = root
        self.get_config = get_config
        self.events = events
        self.clock = clock
        self.rng = rng or random.Random()
        self.users = users
        self.state, problem = UpgradeState.load(root)
        self.state_problem = problem
        self.schedule_error: str | None = None
        self.catch_up = False
        self.reboot_retry_at: float | None = None
        self._cond = threading.Condition()
        self._run_lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="upgrades", daemon=True)

    # scheduling decisions (no threads, no sleeps) -----------------------------------------------------

    def start_up(self, now: float) -> None:
        """At daemon start: a run the schedule missed while the agent was down runs soon (catch-up)."""
        if self.state_problem:
            self.events.emit(ev.UPGRADE_STATE_RESET, outcome="failure", level="warning", message=self.state_problem)
        updates = self.get_config().updates
        missed = (
            updates.enabled
            and self.state.next_run is not None
            and self.state.schedule == updates.schedule
            and now >= self.state.next_run
        )
        if missed:
            self.catch_up = True
            self.state.next_run = now + self.rng.uniform(0, min(updates.randomized_delay, CATCH_UP_MAX_DELAY))
            self._save()
        else:
            self.replan(now)

    def replan(self, now: float, *, after_run: bool = False) -> None:
        """Compute the next run when there is none, the schedule changed, or a run just ended."""
        updates = self.get_config().updates
        if not updates.enabled:
            self.state.next_run, self.state.schedule, self.catch_up = None, None, False
            self._save()
            return
        if not after_run and self.state.next_run is not None and self.state.schedule == updates.schedule:
            return
        try:
            moment = Schedule(updates.schedule).next_after(now)
        except ScheduleError as exc:
            self.schedule_error = str(exc)
            self.state.next_run = None
            self.events.emit(ev.UPGRADE_FINISHED, outcome="failure", level="error", result=FAILURE, message=str(exc))
            return
        self.schedule_error = None
        self.catch_up = False
        self.state.schedule = updates.schedule
        self.state.next_run = moment + self.rng.uniform(0, updates.randomized_delay)
        self._save()

    def due(self, now: float) -> str | None:
        """Why a run is due now ("schedule", "catch-up"), or None."""
        updates = self.get_config().updates
        if not updates.enabled or self.state.next_run is None or now < self.state.next_run or self.running:
            return None
        return "catch-up" if self.catch_up else "schedule"

    def reboot_due(self, now: float) -> str | None:
        """Why the machine should reboot now, or None; a deferral (users logged in) is reported."""
        updates = self.get_config().updates
        required, packages = reboot_required(self.root)
        if not required or updates.reboot_window is None:
            return None
        window = Window.parse(updates.reboot_window)
        if not window.contains(now) or (self.reboot_retry_at is not None and now < self.reboot_retry_at):
            return None
        logged_in = self.users()
        if logged_in and not updates.reboot_with_users:
            self.reboot_retry_at = now + REBOOT_RETRY
            self.events.emit(
                ev.REBOOT_DEFERRED,
                outcome="unknown",
                message=f"reboot required ({', '.join(packages) or 'no package named'}) but {logged_in} "
                f"user session(s) open: not rebooting (updates.reboot_with_users is false)",
                users=logged_in,
            )
            return None
        return f"reboot required by {', '.join(packages) or 'an upgrade'}, inside the window {window}"

    def wake_at(self, now: float) -> float:
        """When the thread must look again."""
        moments = [now + 3600.0]
        if self.running:
            moments.append(now + 5.0)  # `upgrade --now` is under way: the schedule waits for it
        elif self.state.next_run is not None and self.get_config().updates.enabled:
            moments.append(self.state.next_run)
        updates = self.get_config().updates
        if updates.reboot_window is not None and reboot_required(self.root)[0]:
            opening = Window.parse(updates.reboot_window).next_opening(now)
            moments.append(max(opening, self.reboot_retry_at or opening))
        return min(moments)

    def tick(self, now: float) -> None:
        """Do what is due at `now`: a run, then perhaps a reboot."""
        trigger = self.due(now)
        if trigger is not None:
            self.run(trigger)
        why = self.reboot_due(self.clock())
        if why is not None:
            self.reboot(why)

    # the run ------------------------------------------------------------------------------------------

    def run(self, trigger: str) -> RunResult | None:
        """One upgrade run; None when one is already under way."""
        if not self._run_lock.acquire(blocking=False):
            return None
        try:
            result = self._run(trigger)
            self.replan(self.clock(), after_run=True)
            return result
        finally:
            self._run_lock.release()

    @property
    def running(self) -> bool:
        return self._run_lock.locked()

    def _run(self, trigger: str) -> RunResult:
        config = self.get_config()
        updates = config.updates
        started = self.clock()
        run_id = uuid.uuid4().hex[:12]
        if not self.root.is_host:
            detail = "a fake root: apt never runs there"
            self.events.emit(
                ev.UPGRADE_FINISHED, outcome="unknown", result=SKIPPED, message=f"upgrade skipped: {detail}"
            )
            return RunResult(SKIPPED, detail, (), started, started)
        before = dpkg.installed_packages() or {}
        held = apt.held_packages()
        self.state.running = {"id": run_id, "started": started, "trigger": trigger, "before": before}
        self.state.last_started = started
        self._save()
        self.events.emit(
            ev.UPGRADE_STARTED,
            outcome="unknown",
            message=f"upgrade started ({updates.mode}, {trigger})" + (f"; held: {', '.join(held)}" if held else ""),
            upgrade_id=run_id,
            mode=updates.mode,
            trigger=trigger,
            held=held,
        )
        outcome, detail = run_apt(self.root, updates.mode, updates.lock_timeout, updates.time_limit)
        return self._finish(run_id, outcome, detail, before, held, started)

    def _finish(
        self, run_id: str, outcome: str, detail: str, before: dict[str, str], held: list[str], started: float
    ) -> RunResult:
        after = dpkg.installed_packages()
        changes = changes_between(before, after) if before and after else []
        finished = self.clock()
        required, reboot_packages = reboot_required(self.root)
        stale_services = services.needing_restart(self.root)
        summary = f"{len(changes)} package(s) changed" if changes else "nothing to upgrade"
        message = f"upgrade {outcome}: {summary}"
        if changes:
            message += ": " + ", ".join(changes[:20]) + (" ..." if len(changes) > 20 else "")
        if detail:
            message += f" ({detail})"
        if required:
            message += "; reboot required"
        self.state.running = None
        self.state.last_finished = finished
        self.state.last_outcome = outcome
        self.state.last_detail = detail
        self.state.last_changes = changes
        self._save()
        self.events.emit(
            ev.UPGRADE_FINISHED,
            outcome=_ECS_OUTCOME.get(outcome, "unknown"),
            level="info" if outcome == SUCCESS else "error",
            message=message,
            upgrade_id=run_id,
            result=outcome,
            packages=changes,
            held=held,
            duration_s=round(finished - started, 1),
            reboot_required=required,
            services_need_restart=stale_services,
            error=detail if outcome != SUCCESS else None,
        )
        if required:
            self.events.emit(
                ev.REBOOT_REQUIRED,
                outcome="unknown",
                level="warning",
                message=f"reboot required by {', '.join(reboot_packages) or 'an upgrade'}",
                packages=reboot_packages,
            )
        return RunResult(outcome, detail, tuple(changes), started, finished)

    def recover(self) -> None:
        """A run was under way when the agent stopped (e.g. it upgraded itself): wait for dpkg to
        finish, then report how the packages changed."""
        running = self.state.running
        if not running:
            return
        deadline = time.monotonic() + self.get_config().updates.time_limit
        while dpkg.holder(self.root) is not None and time.monotonic() < deadline and not self._stop:
            time.sleep(1.0)
        broken = dpkg.interrupted(self.root)
        detail = "the agent was restarted during the run (an upgrade of vps-agent itself does that)"
        detail += "; dpkg was left interrupted: the next run finishes it" if broken else "; dpkg finished its work"
        saved = running.get("before")
        before: dict[str, str] = saved if isinstance(saved, dict) else {}
        self._finish(
            str(running.get("id", "")),
            FAILURE if broken else INTERRUPTED,
            detail,
            before,
            [],
            running.get("started") or self.clock(),
        )

    def reboot(self, why: str) -> None:
        if not self.root.is_host:
            return
        self.events.emit(ev.REBOOTING, outcome="unknown", level="warning", message=f"rebooting: {why}")
        result = services.reboot()
        if not result.ok:
            self.events.emit(
                ev.REBOOTING, outcome="failure", level="error", message=f"reboot failed: {result.error_text()}"
            )

    # status -------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        updates = self.get_config().updates
        required, packages = reboot_required(self.root)
        return {
            "enabled": updates.enabled,
            "schedule": updates.schedule,
            "mode": updates.mode,
            "next_run": self.state.next_run,
            "catch_up": self.catch_up,
            "running_since": self.state.running.get("started") if self.state.running else None,
            "last_started": self.state.last_started,
            "last_finished": self.state.last_finished,
            "last_outcome": self.state.last_outcome,
            "last_detail": self.state.last_detail,
            "last_changes": self.state.last_changes,
            "reboot_required": required,
            "reboot_packages": packages,
            "reboot_window": updates.reboot_window,
            "error": self.schedule_error,
        }

    # the thread ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self.start_up(self.clock())
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def config_changed(self) -> None:
        with self._cond:
            self.replan(self.clock())
            self._cond.notify_all()

    def _loop(self) -> None:
        try:
            self.recover()
        except Exception as exc:  # a report that cannot be made must not stop the schedule
            self.events.emit(ev.UPGRADE_FINISHED, outcome="failure", level="error", message=f"recovery failed: {exc}")
            self.state.running = None
            self._save()
        while True:
            with self._cond:
                if self._stop:
                    return
                now = self.clock()
                wait = self.wake_at(now) - now
                if wait > 0:
                    self._cond.wait(timeout=min(wait, 3600.0))
                    continue
            try:
                self.tick(self.clock())
            except Exception as exc:  # a bug must not end the schedule
                self.events.emit(
                    ev.UPGRADE_FINISHED, outcome="failure", level="error", message=f"internal error: {exc}"
                )
                with self._cond:
                    self._cond.wait(timeout=60.0)

    def _save(self) -> None:
        try:
            self.state.save(self.root)
        except OSError as exc:
            self.state_problem = f"cannot save {self.root.system_name(self.root.updates_state)}: {exc}"

"""One thread per control: debounce triggers, run one transaction at a time, damp flapping, honour pauses."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent import events as ev
from agent.config import Config, format_duration
from agent.controls.base import Control, SshPorts
from agent.engine import transaction as tx
from agent.engine.flaps import FLAP_SETTLE, Flap, FlapDamper
from agent.engine.reports import OutcomeReporter

# Status words `vps-agentctl status` shows; COMPLIANT/HEALED count as in compliance.
PAUSED = "paused"
FLAPPING = "flapping"
DISABLED = "disabled"
STARTING = "starting"
WAITING = "waiting"  # dpkg is at work: converging once it has finished
DPKG_RECHECK = 1.0  # seconds between looks at the dpkg locks while waiting
DPKG_MAX_WAIT = 1800.0  # a dpkg holding its lock longer than this is wedged: converge anyway
_MAX_DEBOUNCE_FACTOR = 10  # a storm of events still converges after 10x the debounce
RESOURCE_RETRY = 2.0  # seconds before the first retry of a heal a full or read-only filesystem refused
__all__ = ["FLAP_SETTLE", "ControlRunner", "ControlState"]  # FLAP_SETTLE: the damping rules are engine/flaps.py


@dataclass
class ControlState:
    status: str = STARTING
    since: float = field(default_factory=time.time)
    why: str = ""
    last_transaction: str = ""
    last_heal_at: float | None = None
    last_converge_at: float | None = None  # monotonic, for scheduling
    converged_at: float | None = None  # wall clock, for status and metrics
    heals: int = 0
    paused_until: float | None = None  # wall clock; float("inf") = until resumed
    facts: dict[str, Any] = field(default_factory=dict)
    drift: list[str] = field(default_factory=list)
    # settings the lockout invariants hold back: {"setting", "reason", "unblock", "needs"}
    held: list[dict[str, str]] = field(default_factory=list)

    def snapshot(self, name: str) -> dict[str, Any]:
        paused = "until resumed" if self.paused_until == float("inf") else self.paused_until
        return {
            "control": name,
            "status": self.status,
            "since": self.since,
            "why": self.why,
            "heals": self.heals,
            "last_heal_at": self.last_heal_at,
            "last_converge_at": self.last_converge_at,
            "converged_at": self.converged_at,
            "last_transaction": self.last_transaction,
            "paused_until": paused,
            "facts": self.facts,
            "drift": self.drift,
            "held": self.held,
        }


class ControlRunner:
    def __init__(
        self,
        control: Control,
        get_config: Callable[[], Config],
        ctx: tx.TransactionContext,
        ssh_ports: Callable[[Config], SshPorts],
        after_converge: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        on_heal: Callable[[str], None] = lambda name: None,
    ) -> None:
        self._after_converge, self._on_heal = after_converge, on_heal
        self._ssh_ports = ssh_ports  # the engine's: the SSH ports worked out once per converge
        self.control = control
        self.get_config = get_config
        self.ctx = ctx
        self.state = ControlState()
        self.heartbeat = time.monotonic()
        self.busy_since: float | None = None
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: str | None = None  # why a converge is wanted
        self._pending_admin = False  # the admin asked for it (reload, converge, resume): not drift
        self._waiting_since: float | None = None  # when this control began waiting for dpkg
        self._first_trigger = 0.0
        self._last_trigger = 0.0
        self._deadline = 0.0
        self.flaps = FlapDamper(clock)  # heals of drift lately, and the back-off they caused
        self._reports = OutcomeReporter(control.name, ctx.events, clock)
        self._last_intent = ""  # the last converge's Outcome.intent
        self._resource_retries = 0  # retries of a heal a full or read-only filesystem refused, in a row
        self._polled: object | None = None  # the control's poll fingerprint, read just before the last converge
        self._last_poll = 0.0  # when a poll last found nothing changed (self._clock)
        self._waiters: list[tuple[threading.Event, list[tx.Outcome]]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=f"control-{control.name}", daemon=True)

    @property
    def name(self) -> str:
        return self.control.name

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the worker to end after what it is doing (a transaction rolls back on ctx.stopping)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        self.request_stop()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def trigger(self, reason: str, *, immediate: bool = False, admin: bool = False) -> None:
        """Something this control watches may have changed; converge after the debounce. `admin`: the
        admin asked for it (a config reload, `converge`): what it changes is not drift to damp."""
        now = self._clock()
        debounce = 0.0 if immediate else self.get_config().engine.debounce
        with self._cond:
            if self._pending is None:
                self._pending = reason
                self._first_trigger = now
            self._last_trigger = now
            self._pending_admin = self._pending_admin or admin
            latest = self._first_trigger + debounce * _MAX_DEBOUNCE_FACTOR
            self._deadline = min(now + debounce, latest)
            if immediate:
                self.flaps.override()  # an admin's explicit converge overrides flap damping
            self._cond.notify_all()

    def converge_and_wait(self, reason: str, timeout: float = 120.0, *, admin: bool = True) -> tx.Outcome | None:
        done = threading.Event()
        box: list[tx.Outcome] = []
        with self._cond:
            self._waiters.append((done, box))
        self.trigger(reason, immediate=True, admin=admin)
        done.wait(timeout)
        return box[0] if box else None

    def dpkg_finished(self, timeout: float = 30.0) -> tx.Outcome | None:
        """The agent's own apt run has just ended: a guard waiting for dpkg converges now rather than at its
        next look (DPKG_RECHECK), so `vps-agentctl upgrade --now` answers with the guards settled. None when
        this guard was not waiting (or did not answer within `timeout`)."""
        done = threading.Event()
        box: list[tx.Outcome] = []
        with self._cond:
            if self.state.status != WAITING:
                return None
            self._waiters.append((done, box))
            self._deadline = self._clock()
            self._cond.notify_all()
        done.wait(timeout)
        return box[0] if box else None

    def pause(self, until: float) -> None:
        with self._cond:
            self.state.paused_until = until
            self._set_status(PAUSED, "paused by the admin: drift is reported, not reverted")

    def resume(self) -> None:
        with self._cond:
            self.state.paused_until = None
            self.flaps.reset()
            self.state.status = STARTING
        self.trigger("resumed", immediate=True, admin=True)

    def _set_status(self, status: str, why: str) -> None:
        if status != self.state.status or why != self.state.why:
            if status != self.state.status:
                self.state.since = time.time()
            self.state.status = status
            self.state.why = why

    # the loop ---------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                reason = self._wait_for_work()
                if reason is None:
                    return
                admin, self._pending_admin = self._pending_admin, False
            self.busy_since = time.monotonic()
            try:
                if self._wait_for_dpkg(reason, admin):
                    continue
                self._run_once(reason, admin)
                self._after_converge()
            except Exception as exc:  # a bug must not silently end the guarding of this control
                with self._cond:
                    self._set_status(tx.ERROR, f"internal error: {type(exc).__name__}: {exc}")
                why = f"internal error: {type(exc).__name__}: {exc}"
                self._reports.emit(ev.REMEDIATION_FAILED, "failure", why, level="error")
                self._release_waiters(None)
            finally:
                self.busy_since = None
                self.heartbeat = time.monotonic()

    def _wait_for_work(self) -> str | None:
        """Block until a converge is due; returns its reason, or None to stop. Holds self._cond."""
        while not self._stop:
            self.heartbeat = time.monotonic()
            now = self._clock()
            config = self.get_config()
            if self.state.paused_until is not None and self.state.paused_until != float("inf"):
                if time.time() >= self.state.paused_until:
                    self.state.paused_until = None
                    self._pending = self._pending or "pause expired"
                    self._deadline = now
            last = self.state.last_converge_at  # None until the start-up reconcile, which is explicit
            reconcile_due = last + config.engine.reconcile_interval if last is not None else float("inf")
            # a control whose changes nothing can signal (iptables-legacy, /proc/sys) is polled instead
            polls = self.state.paused_until is None and self.control.meta(config).enabled
            poll = self.control.poll_interval(config) if polls else None
            poll_due = max(last, self._last_poll) + poll if poll and last is not None else float("inf")
            due = min(reconcile_due, poll_due)
            wake_at = min(due, self._deadline) if self._pending is not None else due
            paused_until = self.state.paused_until
            if paused_until is not None:
                # while paused, triggers are still looked at (and reported) but never healed
                if paused_until != float("inf"):
                    wake_at = min(wake_at, now + max(paused_until - time.time(), 0.0))
            elif (held_until := self.flaps.hold_until(self._last_trigger)) is not None:
                wake_at = max(wake_at, held_until)
            if now >= wake_at:
                polled = self._fingerprint(config) if self._pending is None and now < reconcile_due else None
                if polled is not None and polled == self._polled:  # the poll finds nothing changed
                    self._last_poll = now
                    continue
                reason = self._pending or ("periodic reconcile" if now >= reconcile_due else "poll: a change")
                self._pending = None
                return reason
            self._cond.wait(timeout=min(max(wake_at - now, 0.001), 3600.0))
        return None

    def _fingerprint(self, config: Config) -> object | None:
        try:
            return self.control.poll_fingerprint(config)
        except Exception:  # None: the poll converges, and that converge reports what is wrong
            return None

    def _wait_for_dpkg(self, reason: str, admin: bool) -> bool:
        """While dpkg changes the system, a guard does not fight it: the converge is put off (looking
        again every DPKG_RECHECK) and runs once dpkg is done. True: put off."""
        config = self.get_config()
        if not self.control.meta(config).enabled or self.state.paused_until is not None:
            return False  # nothing will be written: observe and report now
        holder = self.ctx.package_manager_busy()
        now = self._clock()
        if holder is None:
            if self._waiting_since is not None:
                waited = now - self._waiting_since
                self._waiting_since = None
                done = f"dpkg has finished after {waited:.1f}s: converging once"
                self._reports.emit(ev.PACKAGE_MANAGER_BUSY, "success", done, waited_seconds=round(waited, 1))
            return False
        if self._waiting_since is None:
            self._waiting_since = now
            waiting = f"{holder}: waiting for it to finish before converging"
            self._reports.emit(ev.PACKAGE_MANAGER_BUSY, "unknown", waiting, holder=holder)
        elif now - self._waiting_since > DPKG_MAX_WAIT:
            wedged = f"{holder} for over {format_duration(DPKG_MAX_WAIT)}: converging anyway"
            self._reports.emit(ev.PACKAGE_MANAGER_BUSY, "failure", wedged, level="warning", holder=holder)
            self._waiting_since = now  # the next wait starts a new period
            return False
        with self._cond:
            self._set_status(WAITING, f"{holder}: converging once it has finished")
            self._pending = self._pending or reason
            self._pending_admin = self._pending_admin or admin
            self._first_trigger = now
            self._deadline = now + DPKG_RECHECK
        self._release_waiters(tx.Outcome(self.name, WAITING, f"{holder}: converging once it has finished"))
        return True

    def _run_once(self, reason: str, admin: bool = False) -> None:
        config = self.get_config()
        meta = self.control.meta(config)  # the engine's policies for this guard, from its config section
        if not meta.enabled:
            with self._cond:
                self._set_status(DISABLED, "disabled in the config")
                self.state.last_converge_at = self._clock()
            self._release_waiters(None)
            return
        paused = self.state.paused_until is not None
        report_only = not paused and not meta.remediates
        backing_off = self.flaps.backing_off()
        polled = self._fingerprint(config)  # read before the converge looks: a later change is the next poll's
        ssh, heal = self._ssh_ports(config), not paused and not report_only
        outcome = tx.converge(self.control, config, self.ctx, ssh=ssh, reason=reason, heal=heal)
        # a heal changed what the poll looks at: its look from before is stale (the same tamper again must not
        # read as "nothing changed"), so the next poll converges once and looks afresh
        self._polled = None if outcome.status in (tx.HEALED, tx.PENDING) else polled
        # a heal towards a changed aim (the admin's key login proven, a move confirmed, a reload) applies the
        # agent's own new intent: nobody undid anything, so it does not count towards flapping
        new_intent = bool(outcome.intent) and self._last_intent not in ("", outcome.intent)
        if outcome.intent:
            self._last_intent = outcome.intent
        with self._cond:
            self.state.last_converge_at = self._clock()
            self.state.converged_at = time.time()
            self.state.last_transaction = outcome.transaction_id
            if outcome.facts:
                self.state.facts = outcome.facts
            left = outcome.remaining if outcome.status == tx.HEALED else outcome.drift  # a heal leaves only these
            self.state.drift = [i.describe() for i in left.items] if left else []
            held = outcome.held
            settings = held.settings if held else ()
            self.state.held = [
                {"setting": h.setting, "reason": h.reason, "unblock": h.unblock, "needs": h.needs} for h in settings
            ]
            if paused:
                drifted = outcome.status not in (tx.COMPLIANT,)
                self._set_status(PAUSED, "paused by the admin" + (f"; drift: {outcome.detail}" if drifted else ""))
                self._reports.unreverted_drift(outcome, "while paused")
            elif report_only:
                why = self.control.report_note(outcome.facts) or "report mode: drift is reported, not reverted" + (
                    f"; {outcome.detail}" if outcome.detail else ""
                )
                self._set_status(outcome.status, why)
                self._reports.unreverted_drift(outcome, "in report mode")
            elif outcome.status == tx.HEALED:
                self.state.heals += 1
                self.state.last_heal_at = time.time()
                damped = outcome.drift is not None and any(item.damped for item in outcome.drift.fixable)
                if not admin and damped and not new_intent:
                    self._flapped(self.flaps.record(config.engine))
                if self.state.status != FLAPPING:
                    if held is not None:  # what was safe is applied; the rest still waits
                        self._set_status(tx.BLOCKED if held.blocked else tx.PENDING, held.summary())
                    else:
                        self._set_status(tx.HEALED, outcome.detail)
            elif outcome.status == tx.COMPLIANT:
                if self.state.status == FLAPPING and self.flaps.remembers_heals():
                    pass  # stay flapping until the window has passed
                elif self.state.status != tx.HEALED:
                    self._set_status(tx.COMPLIANT, "")
            else:
                if not (outcome.status == tx.FAILED and backing_off and self.state.status == FLAPPING):
                    # (a heal undone mid-way while backing off leaves it flapping; blocked still says why)
                    self._set_status(outcome.status, outcome.detail)
                if outcome.status == tx.FAILED and self.ctx.package_manager_busy() is not None:
                    # dpkg began meanwhile (the cause, most likely): try again once it has finished
                    self._pending = self._pending or "after dpkg"
                    self._deadline = self._clock() + DPKG_RECHECK
                elif outcome.status == tx.FAILED and outcome.resource is not None:
                    # a full or read-only filesystem: no fight to damp; look again, less and less often
                    self._pending = self._pending or "retry: a filesystem could not take the change"
                    self._deadline = self._clock() + min(RESOURCE_RETRY * 2**self._resource_retries, 300.0)
                    self._resource_retries += 1
                elif outcome.status == tx.FAILED:
                    self._flapped(self.flaps.record(config.engine))  # a failing fix is not retried in a loop
            if outcome.status != tx.FAILED:
                self._resource_retries = 0
            if backing_off and not admin and outcome.status in (tx.HEALED, tx.FAILED):
                self._flapped(self.flaps.spend())
            if self.state.status == FLAPPING and self.flaps.settled(config.engine):
                self._set_status(tx.COMPLIANT, "")
            if not paused and not report_only:
                self._reports.hold(outcome)
                self._report_findings(outcome)
        self._release_waiters(outcome)
        if outcome.status == tx.HEALED and not paused and not report_only:
            self._on_heal(self.name)

    def _report_findings(self, outcome: tx.Outcome) -> None:
        """Findings and warnings (drift the agent never changes) as events (engine/reports.py); status is
        always exact: a finding left after a heal keeps the control `drifted`. Holds self._cond."""
        left = outcome.remaining if outcome.status == tx.HEALED else outcome.drift
        reported = left.reported if left is not None else ()
        if outcome.status == tx.HEALED and reported:
            self.state.drift = [item.describe() for item in reported]
        if left is not None and left.findings and self.state.status in (tx.COMPLIANT, tx.HEALED):
            self._set_status(tx.DRIFTED, left.findings_summary())
        recheck_at = self._reports.findings(reported, outcome.transaction_id)
        if recheck_at is not None and self._pending is None:
            # a flapping item's summary is due then: look again, rather than at the next periodic reconcile
            self._pending, self._first_trigger = "folded findings settle", self._clock()
            self._deadline = recheck_at

    def _flapped(self, flap: Flap | None) -> None:
        """A back-off began, or spent the heals it allows: status and event. Holds self._cond."""
        if flap is not None:
            self._set_status(FLAPPING, flap.why)
            self._reports.flapping(flap)

    def _release_waiters(self, outcome: tx.Outcome | None) -> None:
        with self._cond:
            waiters, self._waiters = self._waiters, []
        for done, box in waiters:
            if outcome is not None:
                box.append(outcome)
            done.set()

"""One thread per control: debounce triggers, run one transaction at a time, damp flapping, honour pauses."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent import events as ev
from agent.config import Config, format_duration
from agent.controls.base import FINDING, WARNING, Control
from agent.engine import transaction as tx
from agent.engine.findings import FindingsReporter

# Status words `vps-agentctl status` shows; COMPLIANT/HEALED count as in compliance.
PAUSED = "paused"
FLAPPING = "flapping"
DISABLED = "disabled"
STARTING = "starting"
WAITING = "waiting"  # dpkg is at work: converging once it has finished
DPKG_RECHECK = 1.0  # seconds between looks at the dpkg locks while waiting
DPKG_MAX_WAIT = 1800.0  # a dpkg holding its lock longer than this is wedged: converge anyway
_MAX_DEBOUNCE_FACTOR = 10  # a storm of events still converges after 10x the debounce
_MAX_BACKOFF = 3600.0
RESOURCE_RETRY = 2.0  # seconds before the first retry of a heal a full or read-only filesystem refused
# While backing off, a change is still healed once nothing has changed for FLAP_SETTLE, up to
# FLAP_RETRIES times a back-off: a storm that has ended must not leave the machine drifted for the whole
# back-off. Some storms go silent while they last (`iptables -F` of chains already empty changes nothing
# the kernel reports), so "quiet" cannot tell a storm that ended from one that goes on: the agent heals
# again after each revert, and the budget bounds what a fight with another tool costs (at most
# FLAP_RETRIES heals, ~15 s of it at two a second, then nothing until the back-off ends).
FLAP_SETTLE = 0.5
FLAP_RETRIES = 30


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
    backoff_until: float | None = None  # monotonic
    facts: dict[str, Any] = field(default_factory=dict)
    drift: list[str] = field(default_factory=list)
    # settings the lockout invariants hold back: {"setting", "reason", "unblock", "needs"}
    held: list[dict[str, str]] = field(default_factory=list)

    def snapshot(self, name: str) -> dict[str, Any]:
        paused = None
        if self.paused_until is not None:
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
        after_converge: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        on_heal: Callable[[str], None] = lambda name: None,
    ) -> None:
        self._after_converge = after_converge
        self._on_heal = on_heal
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
        self._backoff_heals_left = 0  # heals a back-off still allows (after FLAP_SETTLE without a change)
        self._deadline = 0.0
        self._heal_times: collections.deque[float] = collections.deque()
        self._last_intent = ""  # the last converge's Outcome.intent
        self._paused_drift = ""
        self._findings = FindingsReporter()  # findings and warnings as events, rate-limited per item
        self._reported_hold = ""  # the blocked or held state last reported: a re-check of the same says nothing
        self._backoff_level = 0
        self._resource_retries = 0  # retries of a heal a full or read-only filesystem refused, in a row
        self._waiters: list[tuple[threading.Event, list[tx.Outcome]]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=f"control-{control.name}", daemon=True)

    @property
    def name(self) -> str:
        return self.control.name

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
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
                self.state.backoff_until = None  # an admin's explicit converge overrides flap damping
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
            self.state.backoff_until = None
            self._heal_times.clear()
            self._backoff_level = 0
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
                self.ctx.events.emit(
                    ev.REMEDIATION_FAILED,
                    outcome="failure",
                    control=self.name,
                    level="error",
                    message=f"{self.name}: internal error: {type(exc).__name__}: {exc}",
                )
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
            interval = config.engine.reconcile_interval
            if self.state.paused_until is None:
                # a control whose changes nothing can signal (iptables-legacy) is polled instead
                interval = min(interval, self.control.poll_interval(config) or interval)
            reconcile_due = (
                self.state.last_converge_at + interval
                if self.state.last_converge_at is not None
                else float("inf")  # the start-up reconcile is explicit
            )
            wake_at = min(reconcile_due, self._deadline) if self._pending is not None else reconcile_due
            paused_until = self.state.paused_until
            if paused_until is not None:
                # while paused, triggers are still looked at (and reported) but never healed
                if paused_until != float("inf"):
                    wake_at = min(wake_at, now + max(paused_until - time.time(), 0.0))
            elif self.state.backoff_until is not None:
                settled = self._last_trigger + FLAP_SETTLE if self._backoff_heals_left > 0 else float("inf")
                wake_at = max(wake_at, min(self.state.backoff_until, settled))
            if now >= wake_at:
                reason = self._pending or "periodic reconcile"
                self._pending = None
                return reason
            self._cond.wait(timeout=min(max(wake_at - now, 0.001), 3600.0))
        return None

    def _wait_for_dpkg(self, reason: str, admin: bool) -> bool:
        """While dpkg changes the system, a guard does not fight it: the converge is put off (looking
        again every DPKG_RECHECK) and runs once dpkg is done. True: put off."""
        config = self.get_config()
        if not self.control.enabled(config) or self.state.paused_until is not None:
            return False  # nothing will be written: observe and report now
        holder = self.ctx.package_manager_busy()
        now = self._clock()
        if holder is None:
            if self._waiting_since is not None:
                waited = now - self._waiting_since
                self._waiting_since = None
                self.ctx.events.emit(
                    ev.PACKAGE_MANAGER_BUSY,
                    outcome="success",
                    control=self.name,
                    message=f"{self.name}: dpkg has finished after {waited:.1f}s: converging once",
                    waited_seconds=round(waited, 1),
                )
            return False
        if self._waiting_since is None:
            self._waiting_since = now
            self.ctx.events.emit(
                ev.PACKAGE_MANAGER_BUSY,
                outcome="unknown",
                control=self.name,
                message=f"{self.name}: {holder}: waiting for it to finish before converging",
                holder=holder,
            )
        elif now - self._waiting_since > DPKG_MAX_WAIT:
            self.ctx.events.emit(
                ev.PACKAGE_MANAGER_BUSY,
                outcome="failure",
                control=self.name,
                level="warning",
                message=f"{self.name}: {holder} for over {format_duration(DPKG_MAX_WAIT)}: converging anyway",
                holder=holder,
            )
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
        if not self.control.enabled(config):
            with self._cond:
                self._set_status(DISABLED, "disabled in the config")
                self.state.last_converge_at = self._clock()
            self._release_waiters(None)
            return
        paused = self.state.paused_until is not None
        report_only = not paused and not self.control.remediates(config)
        backing_off = self.state.backoff_until is not None and self._clock() < self.state.backoff_until
        outcome = tx.converge(self.control, config, self.ctx, reason=reason, heal=not paused and not report_only)
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
            self.state.held = (
                [
                    {"setting": h.setting, "reason": h.reason, "unblock": h.unblock, "needs": h.needs}
                    for h in held.settings
                ]
                if held
                else []
            )
            if paused:
                drifted = outcome.status not in (tx.COMPLIANT,)
                self._set_status(PAUSED, "paused by the admin" + (f"; drift: {outcome.detail}" if drifted else ""))
                self._report_paused_drift(outcome, "while paused")
            elif report_only:
                why = "report mode: drift is reported, not reverted"
                self._set_status(outcome.status, why + (f"; {outcome.detail}" if outcome.detail else ""))
                self._report_paused_drift(outcome, "in report mode")
            elif outcome.status == tx.HEALED:
                self.state.heals += 1
                self.state.last_heal_at = time.time()
                damped = outcome.drift is not None and any(item.damped for item in outcome.drift.fixable)
                if not admin and damped and not new_intent:
                    self._record_heal(config)
                if self.state.status != FLAPPING:
                    if held is not None:  # what was safe is applied; the rest still waits
                        self._set_status(tx.BLOCKED if held.blocked else tx.PENDING, held.summary())
                    else:
                        self._set_status(tx.HEALED, outcome.detail)
            elif outcome.status == tx.COMPLIANT:
                if self.state.status == FLAPPING and self._heal_times:
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
                    self._record_heal(config)  # a fix that keeps failing must not be retried in a loop
            if outcome.status != tx.FAILED:
                self._resource_retries = 0
            if backing_off and not admin and outcome.status in (tx.HEALED, tx.FAILED):
                self._spend_backoff_heal()
            self._maybe_leave_flapping(config)
            if not paused and not report_only:
                self._report_hold(outcome)
                self._report_findings(outcome)
        self._release_waiters(outcome)
        if outcome.status == tx.HEALED and not paused and not report_only:
            self._on_heal(self.name)

    def _report_hold(self, outcome: tx.Outcome) -> None:
        """A blocked control, or settings held back: one event when the state or its reasons change,
        none for a re-check that finds the same. Holds self._cond."""
        signature = ""
        if outcome.status == tx.BLOCKED and outcome.blocked is not None and outcome.drift is not None:
            signature = f"blocked: {outcome.drift.summary()} / {outcome.blocked}"
        elif outcome.held is not None:
            signature = f"held: {outcome.held}"
        if signature == self._reported_hold:
            return
        self._reported_hold = signature
        if outcome.status == tx.BLOCKED and outcome.blocked is not None and outcome.drift is not None:
            drift = outcome.drift
            self.ctx.events.emit(
                ev.DRIFT_DETECTED,
                outcome="unknown",
                control=self.name,
                level="warning",
                message=f"{self.name}: drift detected: {drift.summary()}",
                file_path=drift.primary_path,
                diff=drift.diff,
                drift=[item.describe() for item in drift.items],
                transaction_id=outcome.transaction_id,
            )
            self.ctx.events.emit(
                ev.REMEDIATION_BLOCKED,
                outcome="failure",
                control=self.name,
                level="error",
                message=f"{self.name}: blocked, nothing changed: {outcome.blocked}",
                reasons=list(outcome.blocked.reasons),
                transaction_id=outcome.transaction_id,
            )
        elif outcome.held is not None:
            held = outcome.held
            self.ctx.events.emit(
                ev.REMEDIATION_BLOCKED if held.blocked else ev.REMEDIATION_PENDING,
                outcome="failure" if held.blocked else "unknown",
                control=self.name,
                level="warning" if held.blocked else "info",
                message=f"{self.name}: applied what is safe; held back: {held}",
                reasons=[item.describe() for item in held.settings],
                held=[item.setting for item in held.settings],
                transaction_id=outcome.transaction_id,
            )

    def _report_findings(self, outcome: tx.Outcome) -> None:
        """Findings and warnings (drift the agent never changes): a drift-detected event with the whole
        set whenever one appears, a findings-cleared event naming each that is gone, at most once per
        item per window while it flaps, the rest summed up once it settles (agent/engine/findings.py);
        status is always exact. A finding left after a heal keeps the control `drifted`."""
        left = outcome.remaining if outcome.status == tx.HEALED else outcome.drift
        reported = left.reported if left is not None else ()
        if outcome.status == tx.HEALED and reported:
            self.state.drift = [item.describe() for item in reported]
        if left is not None and left.findings and self.state.status in (tx.COMPLIANT, tx.HEALED):
            self._set_status(tx.DRIFTED, left.findings_summary())
        items = [item.describe() for item in reported]
        summary = "; ".join(items)
        news = self._findings.update(reported, self._clock())
        if news.recheck_at is not None and self._pending is None:
            # a flapping item's summary is due then: look again, rather than at the next periodic reconcile
            self._pending, self._first_trigger = "folded findings settle", self._clock()
            self._deadline = news.recheck_at
        folded = "".join(
            f" ({what}: changed {n} more time{'s' if n > 1 else ''} since the last event about it, summed up here)"
            for what, n in news.folded.items()
        )
        if news.cleared:
            self.ctx.events.emit(
                ev.FINDINGS_CLEARED,
                outcome="success",
                control=self.name,
                message=f"{self.name}: no longer reported: {'; '.join(news.cleared)}"
                + (f" (still reported: {summary})" if summary else "")
                + folded,
                cleared=list(news.cleared),
                remaining=items or None,
                folded=news.folded or None,
                transaction_id=outcome.transaction_id,
            )
        if news.appeared:
            paths = [item.where for item in reported if item.where.startswith("/")]
            self.ctx.events.emit(
                ev.DRIFT_DETECTED,
                outcome="unknown",
                control=self.name,
                level="warning",
                message=f"{self.name}: reported, never changed by the agent: {summary}" + folded,
                findings=[item.describe() for item in reported if item.kind == FINDING] or None,
                warnings=[item.describe() for item in reported if item.kind == WARNING] or None,
                file_path=paths[0] if paths else None,
                folded=news.folded or None,
                transaction_id=outcome.transaction_id,
            )

    def _report_paused_drift(self, outcome: tx.Outcome, when: str) -> None:
        """While paused (or in report mode), drift is still an event (once per distinct drift), so
        collectors see hand edits."""
        summary = outcome.drift.summary() if outcome.drift else ""
        if summary and summary != self._paused_drift:
            self.ctx.events.emit(
                ev.DRIFT_DETECTED,
                outcome="unknown",
                control=self.name,
                level="warning",
                message=f"{self.name}: drift detected {when}, not reverted: {summary}",
                diff=outcome.drift.diff if outcome.drift else None,
                paused=when == "while paused",
                file_path=outcome.drift.primary_path if outcome.drift else None,
                transaction_id=outcome.transaction_id,
            )
        self._paused_drift = summary

    def _record_heal(self, config: Config) -> None:
        now = self._clock()
        self._heal_times.append(now)
        while self._heal_times and now - self._heal_times[0] > config.engine.flap_window:
            self._heal_times.popleft()
        backing_off = self.state.backoff_until is not None and now < self.state.backoff_until
        if len(self._heal_times) > config.engine.flap_max_heals and not backing_off:
            backoff = min(config.engine.flap_backoff * (2**self._backoff_level), _MAX_BACKOFF)
            self._backoff_level += 1
            self.state.backoff_until = now + backoff
            self._backoff_heals_left = FLAP_RETRIES
            why = (
                f"reverted {len(self._heal_times)} times in {format_duration(config.engine.flap_window)}; "
                f"something keeps changing it: backing off {format_duration(backoff)} "
                f"(meanwhile healed only after {FLAP_SETTLE:g}s without a change, at most {FLAP_RETRIES} times; "
                "every version is in the backups)"
            )
            self._flapping(why, backoff, len(self._heal_times))

    def _spend_backoff_heal(self) -> None:
        """One of the heals a back-off allows was spent; when the last one is, say that the agent now
        leaves the drift alone until the back-off ends. Holds self._cond."""
        self._backoff_heals_left -= 1
        if self._backoff_heals_left > 0 or self.state.backoff_until is None:
            return
        left = max(self.state.backoff_until - self._clock(), 0.0)
        ends = time.strftime("%H:%M:%S", time.localtime(time.time() + left))
        why = (
            f"still changed after {FLAP_RETRIES} heals while backing off: something keeps undoing them; "
            f"not healing until the back-off ends at {ends} "
            "(`vps-agentctl converge` heals now; every version is in the backups)"
        )
        self._flapping(why, round(left), FLAP_RETRIES)

    def _flapping(self, why: str, backoff_seconds: float, heals: int) -> None:
        """Status and event: a back-off began, or spent the heals it allows. Holds self._cond."""
        self._set_status(FLAPPING, why)
        self.ctx.events.emit(
            ev.FLAPPING,
            outcome="failure",
            control=self.name,
            level="error",
            message=f"{self.name}: flapping: {why}",
            backoff_seconds=backoff_seconds,
            heals=heals,
        )

    def _maybe_leave_flapping(self, config: Config) -> None:
        if self.state.status != FLAPPING:
            return
        now = self._clock()
        while self._heal_times and now - self._heal_times[0] > config.engine.flap_window:
            self._heal_times.popleft()
        if not self._heal_times and (self.state.backoff_until is None or now >= self.state.backoff_until):
            self.state.backoff_until = None
            self._backoff_level = 0
            self._set_status(tx.COMPLIANT, "")

    def _release_waiters(self, outcome: tx.Outcome | None) -> None:
        with self._cond:
            waiters, self._waiters = self._waiters, []
        for done, box in waiters:
            if outcome is not None:
                box.append(outcome)
            done.set()

"""What a control's converges tell collectors, once per change: a blocked control or settings held back,
findings and warnings (rate-limited per item: agent/engine/findings.py), drift seen while paused or in
report mode, and flapping. The runner decides the control's status; this module only says it, every
event bound to the control's name (and the transaction's id, where there is one)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from agent import events as ev
from agent.controls.base import FINDING, WARNING, DriftItem
from agent.engine import transaction as tx
from agent.engine.findings import FindingsReporter
from agent.engine.flaps import Flap


class OutcomeReporter:
    def __init__(self, name: str, events: ev.Events, clock: Callable[[], float]) -> None:
        self.name = name
        self._events = events.of(name)
        self._clock = clock
        self._findings = FindingsReporter()
        self._reported_hold = ""  # the blocked or held state last reported: a re-check of the same says nothing
        self._paused_drift = ""  # the drift last reported while paused or in report mode

    def emit(self, action: str, outcome: str, message: str, **fields: Any) -> None:
        """One event of this control: `message` is prefixed with the control's name."""
        self._events.emit(action, message, outcome=outcome, **fields)

    def hold(self, outcome: tx.Outcome) -> None:
        """A blocked control, or settings held back: one event when the state or its reasons change,
        none for a re-check that finds the same."""
        signature = ""
        blocked, drift, held = outcome.blocked, outcome.drift, outcome.held
        if outcome.status == tx.BLOCKED and blocked is not None and drift is not None:
            signature = f"blocked: {drift.summary()} / {blocked}"
        elif held is not None:
            signature = f"held: {held}"
        if signature == self._reported_hold:
            return
        self._reported_hold = signature
        tid = outcome.transaction_id
        if outcome.status == tx.BLOCKED and blocked is not None and drift is not None:
            self.emit(
                ev.DRIFT_DETECTED,
                "unknown",
                f"drift detected: {drift.summary()}",
                level="warning",
                file_path=drift.primary_path,
                diff=drift.diff,
                drift=[item.describe() for item in drift.items],
                transaction_id=tid,
            )
            self.emit(
                ev.REMEDIATION_BLOCKED,
                "failure",
                f"blocked, nothing changed: {blocked}",
                level="error",
                reasons=list(blocked.reasons),
                transaction_id=tid,
            )
        elif held is not None:
            self.emit(
                ev.REMEDIATION_BLOCKED if held.blocked else ev.REMEDIATION_PENDING,
                "failure" if held.blocked else "unknown",
                f"applied what is safe; held back: {held}",
                level="warning" if held.blocked else "info",
                reasons=[item.describe() for item in held.settings],
                held=[item.setting for item in held.settings],
                transaction_id=tid,
            )

    def findings(self, reported: Sequence[DriftItem], transaction_id: str) -> float | None:
        """Findings and warnings (drift the agent never changes): a drift-detected event with the whole set
        whenever one appears, a findings-cleared event naming each that is gone, at most once per item per
        window while it flaps, the rest summed up once it settles. Returns when a folded item's summary is
        due (the runner looks again then), or None."""
        items = [item.describe() for item in reported]
        summary = "; ".join(items)
        news = self._findings.update(reported, self._clock())
        folded = "".join(
            f" ({what}: changed {n} more time{'s' if n > 1 else ''} since the last event about it, summed up here)"
            for what, n in news.folded.items()
        )
        if news.cleared:
            self.emit(
                ev.FINDINGS_CLEARED,
                "success",
                f"no longer reported: {'; '.join(news.cleared)}"
                + (f" (still reported: {summary})" if summary else "")
                + folded,
                cleared=list(news.cleared),
                remaining=items or None,
                folded=news.folded or None,
                transaction_id=transaction_id,
            )
        if news.appeared:
            paths = [item.where for item in reported if item.where.startswith("/")]
            self.emit(
                ev.DRIFT_DETECTED,
                "unknown",
                f"reported, never changed by the agent: {summary}" + folded,
                level="warning",
                findings=[item.describe() for item in reported if item.kind == FINDING] or None,
                warnings=[item.describe() for item in reported if item.kind == WARNING] or None,
                file_path=paths[0] if paths else None,
                folded=news.folded or None,
                transaction_id=transaction_id,
            )
        return news.recheck_at

    def unreverted_drift(self, outcome: tx.Outcome, when: str) -> None:
        """While paused (or in report mode), drift is still an event (once per distinct drift), so
        collectors see hand edits."""
        drift = outcome.drift
        summary = drift.summary() if drift else ""
        if summary and summary != self._paused_drift:
            self.emit(
                ev.DRIFT_DETECTED,
                "unknown",
                f"drift detected {when}, not reverted: {summary}",
                level="warning",
                diff=drift.diff if drift else None,
                paused=when == "while paused",
                file_path=drift.primary_path if drift else None,
                transaction_id=outcome.transaction_id,
            )
        self._paused_drift = summary

    def flapping(self, flap: Flap) -> None:
        """A back-off began, or spent the heals it allows."""
        self.emit(
            ev.FLAPPING,
            "failure",
            f"flapping: {flap.why}",
            level="error",
            backoff_seconds=flap.backoff_seconds,
            heals=flap.heals,
        )

"""The converge transaction: observe -> diff -> preconditions -> backup -> apply -> validate -> reload ->
observe again -> commit, or restore the backups, reload, and report. The only code that writes."""

from __future__ import annotations

import functools
import hashlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent import events as ev
from agent.config import Config
from agent.controls.base import (
    Blocked,
    Changes,
    CommandChange,
    Control,
    Drift,
    Held,
    Invocation,
    ObserveError,
    ValidationError,
)
from agent.events import Events
from agent.system import fs
from agent.system.run import concurrently, run

COMPLIANT = "compliant"
HEALED = "healed"
DRIFTED = "drifted"  # seen but not healed on purpose (check, dry run)
BLOCKED = "blocked"
PENDING = "pending"  # applied what is safe; the rest waits for the admin's proof (a login, `confirm`)
FAILED = "failed"
ERROR = "error"  # the state could not even be observed


@dataclass
class Outcome:
    control: str
    status: str
    detail: str = ""
    drift: Drift | None = None
    changes: Changes | None = None
    blocked: Blocked | None = None
    duration_ms: float = 0.0
    transaction_id: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    # after a heal: the findings and warnings it left (the agent never changes those), or None
    remaining: Drift | None = None
    # the settings the lockout invariants hold back (the rest was applied, or already in place)
    held: Held | None = None
    # a fingerprint of what this converge aimed at (the desired state, after any holds): when it differs
    # from the last converge's, a heal follows a new intent (a proof, a confirmed move, a config reload),
    # not somebody undoing the agent's work, and does not count towards flapping. "" when not known.
    intent: str = ""


def _dpkg_idle() -> str | None:
    return None


@dataclass
class TransactionContext:
    events: Events
    backups: fs.BackupStore
    echo: fs.EchoFilter
    # who is running dpkg right now (None: nobody): the guards wait for it instead of fighting it
    package_manager_busy: Callable[[], str | None] = _dpkg_idle


def converge(control: Control, config: Config, ctx: TransactionContext, *, reason: str, heal: bool = True) -> Outcome:
    """One transaction for one control; heal=False only observes and plans (check, diff, dry run)."""
    aims: list[Any] = []  # the desired state, then the one left once settings are held back
    outcome = _converge(control, config, ctx, reason=reason, heal=heal, aims=aims)
    if aims:
        outcome.intent = hashlib.sha256(repr(aims[-1]).encode()).hexdigest()[:16]
    return outcome


def _converge(
    control: Control, config: Config, ctx: TransactionContext, *, reason: str, heal: bool, aims: list[Any]
) -> Outcome:
    started = time.monotonic()
    txid = uuid.uuid4().hex[:12]

    def elapsed() -> float:
        return round((time.monotonic() - started) * 1000, 2)

    def report(action: str, message: str, outcome: str = "failure", level: str = "error", **fields: Any) -> None:
        """Every event of this transaction: the control, its id and its outcome, named one way."""
        ctx.events.emit(
            action,
            outcome=outcome,
            control=control.name,
            level=level,
            message=f"{control.name}: {message}",
            transaction_id=txid,
            **fields,
        )

    try:
        desired = control.desired(config)
        aims.append(desired)
    except ValidationError as exc:
        if heal:
            report(
                ev.REMEDIATION_FAILED,
                f"the configured settings are refused, nothing changed: {exc}",
                reason=reason,
            )
        return Outcome(control.name, FAILED, str(exc), duration_ms=elapsed(), transaction_id=txid)
    try:
        observed = control.observe()
    except (ObserveError, fs.UnsafeFile, OSError) as exc:
        path = getattr(exc, "path", None)
        if heal:
            report(
                ev.OBSERVE_FAILED,
                f"cannot read the effective state, nothing changed: {exc}",
                file_path=str(path) if path else None,
                reason=reason,
            )
        return Outcome(control.name, ERROR, str(exc), duration_ms=elapsed(), transaction_id=txid)

    facts = control.facts(observed)
    drift = control.diff(observed, desired)
    if drift is None:
        return Outcome(control.name, COMPLIANT, "", duration_ms=elapsed(), transaction_id=txid, facts=facts)
    if not drift.fixable:
        # findings and warnings only: reported (by the runner, once each), never changed; nothing to plan
        status, detail = (DRIFTED, drift.findings_summary()) if drift.findings else (COMPLIANT, "")
        return Outcome(control.name, status, detail, drift, None, None, elapsed(), txid, facts)

    gate = control.preconditions(observed, desired)
    blocked = gate if isinstance(gate, Blocked) else None
    held = gate if isinstance(gate, Held) else None
    if held is not None:
        # what is safe applies now; only the held settings wait
        desired = held.desired
        aims.append(desired)
        drift = control.diff(observed, desired)
        if drift is None or not drift.fixable:
            status = BLOCKED if held.blocked else PENDING
            return Outcome(control.name, status, held.summary(), drift, None, None, elapsed(), txid, facts, held=held)
    try:
        changes = control.plan(observed, desired, drift)
    except fs.UnsafeFile as exc:
        changes = None
        plan_error = str(exc)
    else:
        plan_error = ""
    if not heal:
        status = BLOCKED if blocked else DRIFTED
        return Outcome(
            control.name,
            status,
            str(blocked or drift.summary()),
            drift,
            changes,
            blocked,
            elapsed(),
            txid,
            facts,
            held=held,
        )
    if blocked is not None:
        # reported by the runner, once per distinct drift and reasons: a re-check of the same state says nothing
        return Outcome(control.name, BLOCKED, str(blocked), drift, changes, blocked, elapsed(), txid, facts)

    report(
        ev.DRIFT_DETECTED,
        f"drift detected: {drift.summary()}",
        outcome="unknown",
        level="warning",
        file_path=drift.primary_path,
        diff=drift.diff,
        reason=reason,
        drift=[item.describe() for item in drift.items],
    )
    if changes is None:
        report(
            ev.REMEDIATION_FAILED,
            f"cannot plan a fix, nothing changed: {plan_error}",
            duration_ms=elapsed(),
        )
        return Outcome(control.name, FAILED, plan_error, drift, None, None, elapsed(), txid, facts)

    backup = ctx.backups.begin(control.name, txid)
    applied: list[CommandChange] = []
    try:
        # the checks only test (`iptables-restore --test`, `nft --check`): all at once
        concurrently([functools.partial(_invoke, c.check, "refuses") for c in changes.commands if c.check is not None])
        for change in changes.files:
            backup.save(change.path)
        for change in changes.files:
            if change.content is None:
                fs.remove(change.path, echo=ctx.echo)
            else:
                fs.ensure_dir(change.path.parent)
                fs.atomic_write(change.path, change.content, mode=change.mode, echo=ctx.echo)
        for command in changes.commands:
            _invoke(command.apply, "failed")
            applied.append(command)
        validated = control.validate(changes)
        reloaded = control.reload()
        if not reloaded.ok:
            raise ValidationError(f"reload failed: {reloaded.detail}")
        after = validated if validated is not None else control.observe()
        remaining = control.diff(after, desired)
        if remaining is not None and remaining.fixable:
            still = "; ".join(item.describe() for item in remaining.fixable)
            raise ValidationError(f"still drifted after the change: {still}")
    except (ValidationError, ObserveError, fs.UnsafeFile, OSError) as exc:
        restored = backup.restore(echo=ctx.echo)
        undone = _undo(applied)
        rollback = control.reload() if restored or applied else None
        report(
            ev.REMEDIATION_FAILED,
            f"fix rolled back: {exc}",
            file_path=drift.primary_path,
            diff=changes.diff,
            duration_ms=elapsed(),
            restored=[str(p) for p in restored],
            undone=undone or None,
            rollback_reload=rollback.detail if rollback else None,
            backup=str(backup.directory),
        )
        ctx.backups.prune(control.name)
        return Outcome(control.name, FAILED, str(exc), drift, changes, None, elapsed(), txid, facts, held=held)
    ctx.backups.prune(control.name)
    report(
        ev.DRIFT_REVERTED,
        f"drift reverted in {elapsed():.0f} ms ({'; '.join(changes.notes)})",
        outcome="success",
        level="info",
        file_path=drift.primary_path,
        diff=changes.diff,
        duration_ms=elapsed(),
        backup=str(backup.directory),
        reload=reloaded.detail,
    )
    return Outcome(
        control.name,
        HEALED,
        "; ".join(changes.notes),
        drift,
        changes,
        None,
        elapsed(),
        txid,
        control.facts(after),
        remaining,
        held,
    )


def _invoke(invocation: Invocation, failure: str) -> None:
    result = run(
        invocation.argv, input_text=invocation.input_text, env=dict(invocation.env), timeout=invocation.timeout
    )
    if not result.ok:
        raise ValidationError(f"{' '.join(invocation.argv)} {failure}: {result.error_text()}")


def _undo(applied: list[CommandChange]) -> list[str]:
    """Undo applied commands newest first; what each undo said, for the event."""
    said = []
    for command in reversed(applied):
        if command.undo is None:
            continue
        result = run(command.undo.argv, input_text=command.undo.input_text, timeout=30)
        said.append(f"{' '.join(command.undo.argv)}: " + ("ok" if result.ok else result.error_text()))
    return said

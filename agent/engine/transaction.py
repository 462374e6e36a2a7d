"""The converge transaction: observe -> diff -> preconditions -> backup -> apply -> validate -> reload ->
observe again -> commit, or restore the backups, reload, and report. The only code that writes.

Between the first write and the commit, any exception (and a stopping daemon) rolls back: every file the
transaction touched byte for byte, its live changes undone newest first, one reload, an event; then an
exception that is not one of DOMAIN_ERRORS is raised again (the runner reports it as an internal error).
The backup set's intent record (agent/system/backups.py) is on disk before the first change, so a
transaction cut short by SIGKILL is rolled back at the next start (agent/engine/recovery.py)."""

from __future__ import annotations

import functools
import hashlib
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
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
    Lesson,
    ObserveError,
    SshPorts,
    ValidationError,
)
from agent.engine import faults, live
from agent.events import Events
from agent.system import backups, fs
from agent.system.run import concurrently

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
    # a failure that may pass by itself (a full or read-only filesystem): the runner tries again
    resource: str | None = None


def _dpkg_idle() -> str | None:
    return None


def _no_fault(control: str, step: str, n: int = 1) -> None:
    return None


class Interrupted(Exception):
    """The daemon is stopping (SIGTERM) while a transaction writes: it rolls back."""


# errors a transaction expects and reports as a failed heal; any other exception is a bug: rolled back,
# reported, then raised again
DOMAIN_ERRORS = (ValidationError, ObserveError, fs.UnsafeFile, OSError, Interrupted)


@dataclass
class TransactionContext:
    events: Events
    backups: backups.BackupStore
    echo: fs.EchoFilter
    # who is running dpkg right now (None: nobody): the guards wait for it instead of fighting it
    package_manager_busy: Callable[[], str | None] = _dpkg_idle
    # set when the daemon stops: a transaction in its write phase rolls back at its next step
    stopping: threading.Event = field(default_factory=threading.Event)
    fault: Callable[[str, str, int], None] = _no_fault  # agent/engine/faults.py (tests only)


def converge(
    control: Control, config: Config, ctx: TransactionContext, *, ssh: SshPorts, reason: str, heal: bool = True
) -> Outcome:
    """One transaction for one control; heal=False only observes and plans (check, diff, dry run). `ssh`: the
    SSH ports the engine worked out for this converge (agent/controls/ssh/ports.py), as every step sees them."""
    aims: list[Any] = []  # the desired state, then the one left once settings are held back
    outcome = _converge(control, config, ssh, ctx, reason=reason, heal=heal, aims=aims)
    if aims:
        outcome.intent = hashlib.sha256(repr(aims[-1]).encode()).hexdigest()[:16]
    return outcome


def _converge(
    control: Control, config: Config, ssh: SshPorts, ctx: TransactionContext, reason: str, heal: bool, aims: list[Any]
) -> Outcome:
    started = time.monotonic()
    txid = uuid.uuid4().hex[:12]

    def elapsed() -> float:
        return round((time.monotonic() - started) * 1000, 2)

    # every event of this transaction: the control, its id and its outcome, named one way
    report = functools.partial(ctx.events.of(control.name, txid).emit, outcome="failure", level="error")

    try:
        desired = control.desired(config, ssh)
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
        observed = control.observe(desired)
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

    facts = control.facts(observed, desired)
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

    applied: list[CommandChange] = []
    touched: list[Path] = []
    backed_up = False
    writing: Path = ctx.backups.directory  # where a write a filesystem refuses went, for the event
    try:
        backup = ctx.backups.begin(control.name, txid)
    except OSError as exc:
        resource = fs.resource_problem(exc, ctx.backups.directory)
        problem = resource or str(exc)
        report(ev.REMEDIATION_FAILED, f"cannot back up, so nothing changed: {problem}", duration_ms=elapsed())
        outcome = Outcome(control.name, FAILED, problem, drift, changes, None, elapsed(), txid, facts, held=held)
        outcome.resource = resource
        return outcome
    try:
        # the checks only test (`iptables-restore --test`, `nft --check`): all at once
        concurrently(
            [functools.partial(live.invoke, c.check, "refuses") for c in changes.commands if c.check is not None]
        )
        for change in changes.files:
            backup.save(change.path)
        undo = [live.record(c.undo) for c in changes.commands if c.undo is not None]
        backup.intend(undo, restart=changes.reload.units)
        backed_up = True
        step = functools.partial(_step, ctx, control.name)
        step(faults.AFTER_BACKUP)
        for n, change in enumerate(changes.files, 1):
            touched.append(change.path)  # before the write: a write cut short counts too
            writing = change.path
            if change.content is None:
                fs.remove(change.path, echo=ctx.echo)
            else:
                fs.ensure_dir(change.path.parent)
                fs.atomic_write(change.path, change.content, mode=change.mode, echo=ctx.echo)
            step(faults.AFTER_WRITE, n)
        for n, command in enumerate(changes.commands, 1):
            live.invoke(command.apply, "failed")
            applied.append(command)
            step(faults.AFTER_COMMAND, n)
        validated = control.validate(changes)
        step(faults.AFTER_VALIDATE)
        reloaded = control.reload(changes)
        step(faults.DURING_RELOAD)
        if not reloaded.ok:
            raise ValidationError(f"reload failed: {reloaded.detail}")
        after = validated if validated is not None else control.observe(desired)
        lesson = control.learned(after, desired)
        remaining = control.diff(after, lesson.desired if lesson is not None else desired)
        if remaining is not None and remaining.fixable:
            still = "; ".join(item.describe() for item in remaining.fixable)
            raise ValidationError(f"still drifted after the change: {still}")
        backup.mark(backups.COMMITTED)
    except BaseException as exc:  # anything between the first write and the commit: undo it all
        domain = isinstance(exc, DOMAIN_ERRORS)
        resource = fs.resource_problem(exc, writing)
        why = resource or (str(exc) if domain else f"{type(exc).__name__}: {exc}")
        rollback = _roll_back(control, changes, ctx, backup, touched, applied)
        what = "fix rolled back" if backed_up else "cannot back up, so nothing changed"
        report(
            ev.REMEDIATION_FAILED,
            f"{what}: {why}" + (f"; {rollback.problem}" if rollback.problem else ""),
            file_path=drift.primary_path,
            diff=changes.diff,
            duration_ms=elapsed(),
            restored=[ctx.backups.system_name(p) for p in rollback.restored],
            undone=rollback.undone or None,
            rollback_reload=rollback.reload,
            backup=str(rollback.backup),
            error_type=None if domain else type(exc).__name__,
        )
        if not domain:
            raise
        outcome = Outcome(control.name, FAILED, why, drift, changes, None, elapsed(), txid, facts, held=held)
        outcome.resource = resource
        return outcome
    _step(ctx, control.name, faults.DURING_COMMIT, check_stopping=False)
    kept = ctx.backups.settle(backup)
    unkept = _keep(lesson)
    report(
        ev.DRIFT_REVERTED,
        f"drift reverted in {elapsed():.0f} ms ({'; '.join(changes.notes)}){unkept}",
        outcome="success",
        level="info",
        file_path=drift.primary_path,
        diff=changes.diff,
        duration_ms=elapsed(),
        backup=str(kept.directory),
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
        {**control.facts(after, desired), **dict(changes.facts), **reloaded.facts},
        remaining,
        held,
    )


def _keep(lesson: Lesson[Any] | None) -> str:
    """What the control learned from the committed change (agent state, not the admin's config), written
    here; a failure only costs the lesson (the next heal learns it again) and is said in the event."""
    keep = lesson.keep if lesson is not None else None
    if keep is None or keep.content is None:
        return ""
    try:
        fs.ensure_dir(keep.path.parent, 0o755)
        fs.atomic_write(keep.path, keep.content, mode=keep.mode)
    except (OSError, fs.UnsafeFile) as exc:
        return f"; {keep.system_path} not kept: {exc}"
    return ""


@dataclass
class Rollback:
    restored: list[Path]
    undone: list[str]
    reload: str | None
    backup: Path
    problem: str = ""


def _roll_back(
    control: Control,
    changes: Changes,
    ctx: TransactionContext,
    backup: backups.BackupSet,
    touched: list[Path],
    applied: list[CommandChange],
) -> Rollback:
    """Every touched file back byte for byte, applied commands undone newest first, one reload. A
    rollback that cannot finish leaves the set pending: the next start-up tries again."""
    restored: list[Path] = []
    problem = ""
    try:
        restored = backup.restore(echo=ctx.echo, only=touched)
    except (OSError, fs.UnsafeFile) as exc:
        problem = f"restoring the backup failed: {exc}"
    undone = live.undo(applied)
    reload = None
    if restored or applied:
        try:
            # the same reload as the way forward (a socket's restart, a jail's ignore list), without
            # the live values it would have written
            reload = control.reload(replace(changes, reload=replace(changes.reload, live=()))).detail
        except Exception as exc:  # the files are back; the next converge reloads again
            reload = f"{type(exc).__name__}: {exc}"
    kept = backup
    if not problem:
        try:
            backup.mark(backups.ROLLED_BACK)
            kept = ctx.backups.settle(backup)
        except OSError as exc:
            problem = f"marking the backup rolled back failed: {exc}"
    return Rollback(restored, undone, reload, kept.directory, problem)


def _step(ctx: TransactionContext, control: str, step: str, n: int = 1, *, check_stopping: bool = True) -> None:
    """A named step of the write phase: where a stopping daemon rolls back, and where a test's fault fires."""
    if check_stopping and ctx.stopping.is_set():
        raise Interrupted(f"the daemon is stopping (at {step}): the change is rolled back")
    ctx.fault(control, step, n)

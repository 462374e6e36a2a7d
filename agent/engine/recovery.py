"""Start-up recovery: every backup set whose transaction never committed (the daemon was killed mid-heal:
kill -9, an OOM kill, the watchdog's SIGABRT, a power cut) is rolled back before the first reconcile.

The intent record (agent/system/backups.py) is on disk before a transaction's first change, so a set
without one was cut short before anything changed: it is removed. A pending set is rolled back: every
file it names put back byte for byte where it differs (the temporary files of a write cut short removed
from their directories), its undo commands run newest first, the control reloaded once; then the
start-up reconcile heals towards the baseline as after any other drift. One transaction-recovered event
per set names it.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import events as ev
from agent.controls.base import Changes, Control, ReloadPlan
from agent.engine import live
from agent.engine.transaction import TransactionContext
from agent.paths import SystemRoot
from agent.system import backups, fs, netfilter

# what an undo may run: the tools the agent's own live changes use; a manifest naming anything else
# is not run (the backups directory is root's, mode 0700: this is one more fence, not the only one)
UNDO_TOOLS = frozenset(
    {
        *(f"{t}-restore" for t in ("iptables", "ip6tables")),
        *(f"{t}-{flavour}-restore" for t in ("iptables", "ip6tables") for flavour in ("nft", "legacy")),
        "nft",
        "fail2ban-client",
    }
)


@dataclass
class Recovered:
    control: str
    transaction_id: str
    directory: str
    restored: list[str] = field(default_factory=list)
    undone: list[str] = field(default_factory=list)
    reload: str | None = None
    problem: str = ""


def at_start_up(root: SystemRoot, ctx: TransactionContext, controls: Sequence[Control]) -> list[Recovered]:
    """The daemon's start-up, before the first reconcile (a fake root in the host's network namespace
    never touches the host's firewall: its undo commands are not run)."""
    run_undo = root.is_host or not netfilter.in_host_network_namespace()
    by_name = {control.name: control for control in controls}
    sweep_temporaries([root.state_dir])
    return recover(ctx.backups, by_name, ctx.events, echo=ctx.echo, run_undo=run_undo)


def sweep_temporaries(directories: Sequence[Path]) -> list[Path]:
    """Remove the temporary files a write cut short by a kill left (the target itself is whole: old or
    new, renamed into place or not): only ours (the marker in the name), only where root owns both."""
    removed = []
    me = os.geteuid()
    for directory in dict.fromkeys(directories):
        try:
            if os.lstat(directory).st_uid != me:
                continue
            names = [n for n in os.listdir(directory) if fs.TMP_MARKER in n]
        except OSError:
            continue
        for name in names:
            path = directory / name
            try:
                info = os.lstat(path)
                if stat.S_ISREG(info.st_mode) and info.st_uid == me:
                    os.unlink(path)
                    removed.append(path)
            except OSError:
                continue
    return removed


def recover(
    store: backups.BackupStore,
    controls: Mapping[str, Control],
    events: ev.Events,
    *,
    echo: fs.EchoFilter | None = None,
    run_undo: bool = True,
) -> list[Recovered]:
    """Roll back every unfinished set, oldest first; run_undo=False: leave live state alone (a fake root
    in the host's network namespace, whose firewall the agent never touches)."""
    results = []
    for directory in store.unfinished():
        name = directory.parent.name
        if not (directory / backups.MANIFEST).exists():
            shutil.rmtree(directory, ignore_errors=True)
            result = Recovered(name, _txid(directory), str(directory))
            _report(events, result, "cut short before its intent record was written, so before any change: removed")
            results.append(result)
            continue
        try:
            backup = backups.load_set(directory, store.host_path)
        except backups.BackupUnreadable as exc:
            result = Recovered(name, _txid(directory), str(directory), problem=str(exc))
            _report(events, result, "cannot be rolled back, its backup is unreadable; left in place")
            results.append(result)
            continue
        copies = [backup.copy_path(backup.system_name(path)).parent for path in backup.saved]
        sweep_temporaries([backup.directory, *copies, *(path.parent for path in backup.saved)])
        results.append(_roll_back(store, backup, controls.get(name), events, echo, run_undo))
    return results


def _roll_back(
    store: backups.BackupStore,
    backup: backups.BackupSet,
    control: Control | None,
    events: ev.Events,
    echo: fs.EchoFilter | None,
    run_undo: bool,
) -> Recovered:
    result = Recovered(backup.control, backup.transaction_id, str(backup.directory))
    try:
        restored = backup.restore(echo=echo)
    except (OSError, fs.UnsafeFile) as exc:
        result.problem = f"restoring failed: {exc}"
        _report(events, result, "could not be rolled back; left pending for the next start")
        return result
    result.restored = [backup.system_name(p) for p in restored]
    for undo in reversed(backup.undo):
        result.undone.append(_undo(undo, run_undo))
    if control is not None and (restored or (run_undo and backup.undo)):
        try:
            reloaded = control.reload(Changes(reload=ReloadPlan(units=tuple(backup.restart))))
            result.reload = reloaded.detail
        except Exception as exc:  # the set is still rolled back; the start-up reconcile reloads again
            result.reload = f"{type(exc).__name__}: {exc}"
    try:
        backup.mark(backups.RECOVERED)
        store.settle(backup)
    except OSError as exc:
        result.problem = f"marking it recovered failed: {exc}"
    _report(events, result, "rolled back at start-up")
    return result


def _undo(undo: Mapping[str, Any], run_undo: bool) -> str:
    argv = [str(a) for a in undo.get("argv", [])]
    said = " ".join(argv)
    if not run_undo:
        return f"{said}: not run (a fake root in the host's network namespace)"
    if not argv or os.path.basename(argv[0]) not in UNDO_TOOLS:
        return f"{said}: refused (not a tool the agent's live changes use)"
    return live.said(live.from_record(undo))


def _txid(directory: os.PathLike[str]) -> str:
    return os.fspath(directory).rsplit("-", 1)[-1]


def _report(events: ev.Events, result: Recovered, what: str) -> None:
    ok = not result.problem
    message = f"transaction {result.transaction_id} never committed (the daemon stopped mid-heal): {what}"
    if result.restored:
        message += f"; restored {', '.join(result.restored)}"
    if result.undone:
        message += f"; undone: {'; '.join(result.undone)}"
    if result.problem:
        message += f": {result.problem}"
    events.of(result.control, result.transaction_id).emit(
        ev.TRANSACTION_RECOVERED,
        message,
        outcome="success" if ok else "failure",
        level="warning" if ok else "error",
        backup=result.directory,
        file_path=result.restored[0] if result.restored else None,
        restored=result.restored,
        undone=result.undone or None,
        rollback_reload=result.reload,
        error=result.problem or None,
    )

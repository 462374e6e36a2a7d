"""Versioned backups with an intent record: every converge transaction's pre-change copies, on disk
before the first change, so a transaction that never committed (a kill -9, an OOM kill, a power cut)
can be rolled back at the next start.

A set is backups/<control>/<time>-<transaction>/: files/<system path> holds the earlier contents, and
manifest.json the intent record: the transaction, its state (pending until it ends: committed or
rolled-back), each file as it was (existed, symlink target, mode, owner, SHA-256 of the contents), and
the commands that undo its live changes. Identical consecutive sets are stored once (the later
transaction is listed in the kept set's `repeats`), so `backups.keep` counts distinct versions.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.system.fs import EchoFilter, UnsafeFile, atomic_write, read_regular, remove

MANIFEST = "manifest.json"
FORMAT = 2
PENDING = "pending"  # the intent: changes may be under way
COMMITTED = "committed"
ROLLED_BACK = "rolled-back"
RECOVERED = "recovered"  # found pending at start-up and rolled back then
MAX_REPEATS = 100  # transaction ids a kept set lists as identical repeats of itself (the count goes on)


class BackupUnreadable(Exception):
    """A backup set whose manifest or copies cannot be read or do not match (named in the message)."""


@dataclass
class SavedFile:
    """One file as it was before a transaction touched it."""

    path: Path
    existed: bool
    content: bytes = b""
    symlink_target: str | None = None
    mode: int = 0o644
    uid: int = 0
    gid: int = 0

    @property
    def sha256(self) -> str | None:
        if not self.existed or self.symlink_target is not None:
            return None
        return hashlib.sha256(self.content).hexdigest()

    def matches_disk(self) -> bool:
        """Whether the file is already exactly as saved (contents, link target, mode, owner)."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return not self.existed
        if not self.existed:
            return False
        if (info.st_uid, info.st_gid) != (self.uid, self.gid):
            return False
        if self.symlink_target is not None:
            return stat.S_ISLNK(info.st_mode) and os.readlink(self.path) == self.symlink_target
        if not stat.S_ISREG(info.st_mode) or stat.S_IMODE(info.st_mode) != self.mode:
            return False
        return read_regular(self.path) == self.content

    def restore(self, echo: EchoFilter | None) -> None:
        if not self.existed:
            remove(self.path, echo=echo)
        elif self.symlink_target is not None:
            remove(self.path)
            os.symlink(self.symlink_target, self.path)
            if os.geteuid() == 0:
                os.lchown(self.path, self.uid, self.gid)
            if echo is not None:
                echo.record(self.path)
        else:
            atomic_write(self.path, self.content, mode=self.mode, owner=(self.uid, self.gid), echo=echo)


@dataclass
class BackupSet:
    """The pre-change copies and the intent record of one converge transaction."""

    directory: Path
    control: str = ""
    transaction_id: str = ""
    system_name: Callable[[Path], str] = os.fspath  # how the guarded system names a path
    saved: dict[Path, SavedFile] = field(default_factory=dict)
    undo: list[dict[str, Any]] = field(default_factory=list)  # {"argv", "input", "env", "timeout"}
    restart: list[str] = field(default_factory=list)  # units the reload restarts (a socket), again on a rollback
    state: str = PENDING
    started: float = field(default_factory=time.time)
    repeats: list[str] = field(default_factory=list)
    repeat_count: int = 0

    def save(self, path: Path) -> SavedFile:
        """Copy path as it is now into the set, durably (the intent record names it next)."""
        if path in self.saved:
            return self.saved[path]
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            entry = SavedFile(path, existed=False)
        else:
            if stat.S_ISLNK(info.st_mode):
                entry = SavedFile(path, True, symlink_target=os.readlink(path), uid=info.st_uid, gid=info.st_gid)
            elif stat.S_ISREG(info.st_mode):
                data = read_regular(path) or b""
                entry = SavedFile(path, True, data, None, stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid)
            else:
                raise UnsafeFile(path, "is not a regular file or a symlink; refusing to back it up or replace it")
        if entry.existed and entry.symlink_target is None:
            target = self.copy_path(self.system_name(path))
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(target, entry.content, mode=0o600, owner=(0, 0))
        self.saved[path] = entry
        return entry

    def copy_path(self, system_path: str) -> Path:
        return self.directory / "files" / system_path.lstrip("/")

    def intend(self, undo: Sequence[Mapping[str, Any]] = (), restart: Sequence[str] = ()) -> None:
        """The intent record, on disk (fsynced) before the first change: what may change, how to undo it
        and the units a rollback restarts."""
        self.undo = [dict(item) for item in undo]
        self.restart = list(restart)
        self.mark(PENDING)

    def mark(self, state: str) -> None:
        self.state = state
        atomic_write(self.directory / MANIFEST, json.dumps(self.manifest(), indent=2).encode(), mode=0o600)

    def manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "control": self.control,
            "transaction": self.transaction_id,
            "state": self.state,
            "started": self.started,
            "files": [
                {
                    "path": self.system_name(item.path),
                    "existed": item.existed,
                    "symlink_target": item.symlink_target,
                    "mode": oct(item.mode),
                    "uid": item.uid,
                    "gid": item.gid,
                    "sha256": item.sha256,
                }
                for item in self.saved.values()
            ],
            "undo": self.undo,
            "restart": self.restart,
            "repeats": self.repeats,
            "repeat_count": self.repeat_count,
        }

    def version(self) -> tuple[Any, ...]:
        """What makes two sets the same version: every file's path, contents and metadata, and the live
        state the undo commands would put back."""
        files = sorted(
            (self.system_name(e.path), e.existed, e.symlink_target, e.mode, e.uid, e.gid, e.sha256)
            for e in self.saved.values()
        )
        return (tuple(files), json.dumps(self.undo, sort_keys=True))

    def restore(self, *, echo: EchoFilter | None = None, only: Sequence[Path] | None = None) -> list[Path]:
        """Put every saved file (of `only`, if given) back byte for byte where it differs; the paths restored."""
        restored = []
        for entry in self.saved.values():
            if only is not None and entry.path not in only:
                continue
            if entry.matches_disk():
                continue
            entry.restore(echo)
            restored.append(entry.path)
        return restored


def load_set(directory: Path, host_path: Callable[[str], Path] = Path) -> BackupSet:
    """A set as its manifest and copies say; BackupUnreadable when either cannot be read or they disagree."""
    try:
        raw = json.loads((read_regular(directory / MANIFEST) or b"").decode())
    except (OSError, UnsafeFile, ValueError) as exc:
        raise BackupUnreadable(f"{directory / MANIFEST}: {exc}") from exc
    if isinstance(raw, list):  # the first format: a list of files, written only once a set was complete
        raw = {"format": 1, "state": COMMITTED, "files": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("files"), list):
        raise BackupUnreadable(f"{directory / MANIFEST}: not a backup manifest")
    backup = BackupSet(
        directory,
        str(raw.get("control", directory.parent.name)),
        str(raw.get("transaction", directory.name.rsplit("-", 1)[-1])),
        state=str(raw.get("state", COMMITTED)),
        started=float(raw.get("started", 0.0)),
        undo=list(raw.get("undo", [])),
        restart=[str(unit) for unit in raw.get("restart", [])],
        repeats=list(raw.get("repeats", [])),
        repeat_count=int(raw.get("repeat_count", 0)),
    )
    names: dict[Path, str] = {}
    try:
        for item in raw["files"]:
            system_path = str(item["path"])
            path = host_path(system_path)
            names[path] = system_path
            entry = SavedFile(
                path,
                bool(item["existed"]),
                symlink_target=item.get("symlink_target"),
                mode=int(str(item.get("mode", "0o644")), 8),
                uid=int(item.get("uid", 0)),
                gid=int(item.get("gid", 0)),
            )
            if entry.existed and entry.symlink_target is None:
                copy = read_regular(backup.copy_path(system_path))
                if copy is None:
                    raise BackupUnreadable(f"{backup.copy_path(system_path)}: missing")
                entry.content = copy
                want = item.get("sha256")
                if want is not None and entry.sha256 != want:
                    raise BackupUnreadable(f"{backup.copy_path(system_path)}: SHA-256 differs from the manifest's")
            backup.saved[path] = entry
    except (KeyError, TypeError, ValueError, OSError, UnsafeFile) as exc:
        raise BackupUnreadable(f"{directory}: {type(exc).__name__}: {exc}") from exc
    backup.system_name = lambda p: names.get(p, os.fspath(p))
    return backup


class BackupStore:
    """Versioned backups under /var/lib/vps-agent/backups/<control>/<time>-<transaction>/, newest `keep` kept."""

    def __init__(
        self,
        directory: Path,
        keep: int,
        system_name: Callable[[Path], str] = os.fspath,
        host_path: Callable[[str], Path] = Path,
    ) -> None:
        self.directory = directory
        self.keep = keep
        self.system_name = system_name
        self.host_path = host_path

    def begin(self, control: str, transaction_id: str) -> BackupSet:
        now = time.time()
        # microseconds in the name so sets sort by time even within one second
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1e6) % 1_000_000:06d}Z"
        target = self.directory / control / f"{stamp}-{transaction_id}"
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        return BackupSet(target, control, transaction_id, self.system_name, started=now)

    def settle(self, backup: BackupSet) -> BackupSet:
        """A set its transaction has marked committed or rolled back: stored once if the newest earlier
        set holds the same version (that one lists this transaction as a repeat), then the control's
        sets pruned; returns the set that holds the copies."""
        kept = self._same_as_previous(backup)
        if kept is not None:
            kept.repeat_count += 1
            kept.repeats = [*kept.repeats, backup.transaction_id][-MAX_REPEATS:]
            kept.mark(kept.state)
            shutil.rmtree(backup.directory, ignore_errors=True)
            backup = kept
        self.prune(backup.control)
        return backup

    def _same_as_previous(self, backup: BackupSet) -> BackupSet | None:
        sets = self.list(backup.control)
        earlier = [p for p in sets if p.name < backup.directory.name]
        if not earlier:
            return None
        try:
            previous = load_set(earlier[-1], self.host_path)
        except BackupUnreadable:
            return None
        if previous.state == PENDING or previous.version() != backup.version():
            return None
        previous.system_name = self.system_name
        return previous

    def prune(self, control: str) -> None:
        sets = self.list(control)
        for old in sets[: max(0, len(sets) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def list(self, control: str) -> list[Path]:
        base = self.directory / control
        if not base.is_dir():
            return []
        return sorted(p for p in base.iterdir() if p.is_dir())

    def controls(self) -> builtins.list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if p.is_dir())

    def unfinished(self) -> builtins.list[Path]:
        """Every set whose transaction never ended: pending, without a manifest (cut short before its
        intent record, so before any change), or unreadable; oldest first."""
        found: builtins.list[Path] = []
        for control in self.controls():
            for directory in self.list(control):
                if not (directory / MANIFEST).exists():
                    found.append(directory)
                    continue
                try:
                    state = load_set(directory, self.host_path).state
                except BackupUnreadable:
                    found.append(directory)
                    continue
                if state == PENDING:
                    found.append(directory)
        return sorted(found, key=lambda p: p.name)

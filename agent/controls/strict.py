"""The strict profile's host guard (`profile: strict`, docs/strict-profile.md): files the agent owns whole, each
in a directory the system reads drop-ins from, so no package's conffile is ever modified.

- core dumps off: systemd-coredump's drop-in (Storage=none, ProcessSizeMax=0) and pam_limits' `* hard core 0`
  (fs.suid_dumpable=0 is the sysctl guard's);
- protocols and storage drivers a VPS has no use for are kept from loading (modprobe.d: `blacklist` and
  `install NAME /bin/false`): dccp, sctp, rds, tipc, usb-storage, firewire-core. Never squashfs (snaps) or
  vfat (the EFI partition). A module loaded now is something's, so its lines are held back, with the reason.

Nothing is reloaded: systemd-coredump reads its config at each crash, pam_limits at each login, modprobe at
each load.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.controls import login_files
from agent.controls.base import (
    NEEDS_CHANGE,
    Changes,
    Control,
    Drift,
    DriftItem,
    FileChange,
    Held,
    HeldSetting,
    Meta,
    ReloadOutcome,
    SshPorts,
    WatchSpec,
    unified,
)
from agent.paths import SystemRoot
from agent.system import fs

MODULES = ("dccp", "sctp", "rds", "tipc", "usb-storage", "firewire-core")
NEVER = frozenset({"squashfs", "vfat"})  # what a VPS boots or updates from
COREDUMP = "coredump"
LIMITS = "limits"
MODPROBE = "modprobe"
LOGIN_DEFS = "login.defs"  # edited in place (agent/controls/login_files.py), like the two banners:
ISSUE = "issue"
ISSUE_NET = "issue.net"
EDITED = (LOGIN_DEFS, ISSUE, ISSUE_NET)
_HEADER = "# Managed by vps-agent (profile: strict); edits here are reverted. See docs/strict-profile.md.\n"
_COREDUMP_TEXT = (
    _HEADER
    + "# No core dump is stored: one holds the memory of the process, passwords and keys included.\n"
    + "[Coredump]\nStorage=none\nProcessSizeMax=0\n"
)
_LIMITS_TEXT = _HEADER + "# No process dumps core (its memory may hold secrets).\n* hard core 0\n"


def _module_key(name: str) -> str:
    """modprobe treats - and _ alike; /proc/modules prints _."""
    return name.replace("-", "_")


def blacklist_text(modules: Sequence[str]) -> str:
    lines = [_HEADER, "# Protocols and drivers a VPS has no use for: never loaded, not even on demand.\n"]
    for name in modules:
        lines.append(f"blacklist {name}\ninstall {name} /bin/false\n")
    return "".join(lines)


@dataclass(frozen=True)
class StrictDesired:
    modules: tuple[str, ...]  # blacklisted: MODULES, less those held back

    def files(self) -> dict[str, str]:
        return {COREDUMP: _COREDUMP_TEXT, LIMITS: _LIMITS_TEXT, MODPROBE: blacklist_text(self.modules)}


@dataclass(frozen=True)
class StrictObserved:
    files: Mapping[str, bytes | None]
    problems: Mapping[str, str]  # e.g. a symlink planted at one of the paths
    loaded: frozenset[str] | None  # module names as /proc/modules prints them; None: no such list here


class StrictControl(Control[StrictObserved, StrictDesired]):
    name = "strict"

    def __init__(self, root: SystemRoot) -> None:
        super().__init__(root)

    def meta(self, config: Config) -> Meta:
        return Meta(enabled=config.profile == "strict")  # no section of its own: the profile turns it on

    def _paths(self) -> dict[str, Path]:
        """The files the guard owns whole, then those it edits (EDITED)."""
        return {
            COREDUMP: self.root.coredump_dropin,
            LIMITS: self.root.core_limits,
            MODPROBE: self.root.modprobe_blacklist,
            LOGIN_DEFS: self.root.login_defs,
            ISSUE: self.root.issue,
            ISSUE_NET: self.root.issue_net,
        }

    def watches(self, config: Config) -> Sequence[WatchSpec]:
        by_directory: dict[Path, set[str]] = {}
        for path in self._paths().values():
            by_directory.setdefault(path.parent, set()).add(path.name)
        return [WatchSpec(directory, frozenset(names)) for directory, names in by_directory.items()]

    def _wanted(self, observed: StrictObserved, desired: StrictDesired, stamp: str) -> dict[str, tuple[str, str]]:
        """what -> (the file's text now, the text the guard wants), for every file that differs."""
        found: dict[str, tuple[str, str]] = {}
        for what, text in desired.files().items():
            current = observed.files.get(what)
            if observed.problems.get(what) or current != text.encode():
                found[what] = ((current or b"").decode("utf-8", "replace"), text)
        defs = observed.files.get(LOGIN_DEFS)
        if defs is not None and not observed.problems.get(LOGIN_DEFS):  # no login.defs: nothing of shadow's to edit
            text = defs.decode("utf-8", "replace")
            if login_files.login_defs_wrong(text):
                found[LOGIN_DEFS] = (text, login_files.login_defs_fixed(text, stamp))
        for what in (ISSUE, ISSUE_NET):
            banner = observed.files.get(what)
            if not observed.problems.get(what) and banner != login_files.BANNER.encode():
                if login_files.banner_replaced(banner):
                    found[what] = ((banner or b"").decode("utf-8", "replace"), login_files.BANNER)
        return found

    def desired(self, config: Config, ssh: SshPorts) -> StrictDesired:
        return StrictDesired(tuple(name for name in MODULES if name not in NEVER))

    def observe(self, desired: StrictDesired) -> StrictObserved:
        files: dict[str, bytes | None] = {}
        problems: dict[str, str] = {}
        for what, path in self._paths().items():
            try:
                files[what] = fs.read_regular(path)
            except fs.UnsafeFile as exc:
                files[what], problems[what] = None, exc.why
            except IsADirectoryError:
                files[what], problems[what] = None, "is a directory"
        try:
            listed = fs.read_regular(self.root.proc_modules)
        except (fs.UnsafeFile, OSError):
            listed = None
        loaded = None
        if listed is not None:
            loaded = frozenset(line.split()[0] for line in listed.decode("utf-8", "replace").splitlines() if line)
        return StrictObserved(files, problems, loaded)

    def diff(self, observed: StrictObserved, desired: StrictDesired) -> Drift | None:
        items: list[DriftItem] = []
        diffs: list[str] = []
        for what, (before, after) in self._wanted(observed, desired, "now").items():
            where = self.root.system_name(self._paths()[what])
            if what == LOGIN_DEFS:
                for line, key, actual in login_files.login_defs_wrong(before):
                    items.append(DriftItem(key, where, dict(login_files.LOGIN_DEFS)[key], actual, line or None))
            else:
                current = observed.files.get(what)
                actual = observed.problems.get(what) or ("missing" if current is None else "modified")
                expected = "a legal banner" if what in (ISSUE, ISSUE_NET) else "the agent's content"
                items.append(DriftItem(what, where, expected, actual))
            diffs.append(unified(before, after, where))
        if not items:
            return None
        return Drift(self.name, tuple(items), "".join(diffs))

    def plan(self, observed: StrictObserved, desired: StrictDesired, drift: Drift) -> Changes:
        files: list[FileChange] = []
        notes: list[str] = []
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for what, (_, after) in self._wanted(observed, desired, stamp).items():
            path = self._paths()[what]
            if what in EDITED and path.is_symlink():
                raise fs.UnsafeFile(path, "is a symlink; the agent edits files in place and does not follow links")
            mode = None if what == LOGIN_DEFS else 0o644  # login.defs keeps its own mode
            files.append(FileChange(path, self.root.system_name(path), after.encode(), mode, what))
            verb = "edit" if what == LOGIN_DEFS else "write"
            notes.append(f"{verb} {self.root.system_name(path)}")
        return Changes(tuple(files), tuple(notes), drift.diff)

    def preconditions(self, observed: StrictObserved, desired: StrictDesired) -> Held | None:
        """A module loaded now is in use by something on the host (a cluster's sctp, a USB disk): its
        blacklist lines wait until the admin unloads it, or takes it out of the profile's way."""
        if observed.loaded is None:
            return None  # this kernel lists no modules: nothing can be loaded to break
        loaded = [name for name in desired.modules if _module_key(name) in observed.loaded]
        if not loaded:
            return None
        held = tuple(
            HeldSetting(
                f"install {name} /bin/false",
                f"{name} is loaded now: something on this host uses it",
                f"if nothing needs it: modprobe -r {name} (blacklisted at the guard's next look, within "
                "engine.reconcile_interval)",
                NEEDS_CHANGE,
            )
            for name in loaded
        )
        keep = tuple(name for name in desired.modules if name not in loaded)
        return Held(held, replace(desired, modules=keep))

    def validate(self, changes: Changes) -> None:
        return None

    def reload(self, changes: Changes) -> ReloadOutcome:
        return ReloadOutcome(True, "read at the next crash, login and module load: nothing to reload")

    def facts(self, observed: StrictObserved, desired: StrictDesired) -> dict[str, Any]:
        if observed.loaded is None:
            return {"modules": "this kernel lists none (/proc/modules absent)"}
        return {"modules_loaded": len(observed.loaded)}

"""The Control contract: one small interface every guarded piece of state implements.

The engine owns the policies (debounce, one transaction at a time, rollback, flap damping); a
control only knows how to observe its state, say what it should be, and plan the fix.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from agent.config import Config
from agent.paths import SystemRoot


@dataclass(frozen=True)
class WatchSpec:
    """A directory to watch (non-recursively), optionally only some names in it."""

    directory: Path
    names: frozenset[str] | None = None  # None: every entry


@dataclass(frozen=True)
class NetlinkGroup:
    """A netlink multicast group whose every message means "this control's state may have changed"."""

    protocol: int  # e.g. 12, NETLINK_NETFILTER
    group: int  # e.g. 7, NFNLGRP_NFTABLES


@dataclass(frozen=True)
class SshPorts:
    """The SSH ports, worked out by the engine once per converge (agent/controls/ssh/ports.py: ports_now)
    and handed to every guard's desired(): the firewall keeps them open, fail2ban guards them, the rest
    ignore them. One value per converge: each step of it sees the same ports."""

    listening: frozenset[int] = frozenset()  # what sshd listens on now
    ports: tuple[int, ...] = ()  # the SSH guard's port(s) (both while a port move is open) and those


# What a DriftItem asks of the agent.
FIX = "fix"  # the agent fixes it (the default)
FINDING = "finding"  # reported, never changed by the agent: the control is `drifted` until the admin fixes it
WARNING = "warning"  # reported, never changed, the control's status unaffected (advice, or a guess)


@dataclass(frozen=True)
class DriftItem:
    """One way the observed state differs from the desired one."""

    what: str  # e.g. "permitrootlogin", "include", "conflict"
    where: str  # the file (system path) or "effective" for the running tool's view
    expected: str
    actual: str
    line: int | None = None
    kind: str = FIX
    advice: str = ""  # for a finding or warning: why it matters and how the admin fixes it
    # False: following the system's own change (a login's address to keep ignored), not reverting anyone's:
    # a heal of only such items does not count towards flapping
    damped: bool = True

    def describe(self) -> str:
        place = f"{self.where}:{self.line}" if self.line else self.where
        if self.kind == FIX:
            return f"{place}: {self.what} is {self.actual!r}, expected {self.expected!r}"
        advice = f"; {self.advice}" if self.advice else ""
        return f"{place}: {self.kind}: {self.what} {self.actual}, expected {self.expected}{advice}"


@dataclass(frozen=True)
class Drift:
    """Plain data: what drifted, where, and a unified diff of the effective state."""

    control: str
    items: tuple[DriftItem, ...]
    diff: str

    @property
    def primary_path(self) -> str | None:
        for item in self.items:
            if item.where.startswith("/"):
                return item.where
        return None

    def summary(self) -> str:
        return "; ".join(item.describe() for item in self.items)

    @property
    def fixable(self) -> tuple[DriftItem, ...]:
        return tuple(item for item in self.items if item.kind == FIX)

    @property
    def reported(self) -> tuple[DriftItem, ...]:
        """What the agent reports and never changes (findings and warnings)."""
        return tuple(item for item in self.items if item.kind != FIX)

    @property
    def findings(self) -> tuple[DriftItem, ...]:
        return tuple(item for item in self.items if item.kind == FINDING)

    def findings_summary(self) -> str:
        """The status line of a control whose only drift is findings: what the admin has to fix."""
        whats = ", ".join(dict.fromkeys(item.what for item in self.findings))
        return f"{len(self.findings)} finding(s) for the admin to fix (the agent changes none of them): {whats}"


@dataclass(frozen=True)
class FileChange:
    path: Path  # real path under the root
    system_path: str  # as the guarded system names it
    content: bytes | None  # None: delete
    mode: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class Invocation:
    argv: tuple[str, ...]
    input_text: str | None = None
    env: tuple[tuple[str, str], ...] = ()  # added to the run door's environment
    timeout: float = 30.0


@dataclass(frozen=True)
class CommandChange:
    """A change to live state that is not a file (a ruleset): applied and undone by commands.

    `check` is the tool's own dry run of `apply`; the transaction runs every check before it changes
    anything, because live state cannot be validated after the fact the way a written file can."""

    apply: Invocation
    undo: Invocation | None
    check: Invocation | None = None
    reason: str = ""


@dataclass(frozen=True)
class ReloadPlan:
    """How the service takes the planned change, as data the transaction hands to reload(changes): no
    state kept in the control between plan() and reload(), and a rollback reloads the same way."""

    needed: bool = True  # False: the live change (a command) is all there is; a reload would undo it
    restart: str = ""  # why a restart, not a reload, is needed ("" : a reload will do)
    units: tuple[str, ...] = ()  # systemd units to restart first (after a daemon-reload): a socket's drop-in
    again: tuple[Invocation, ...] = ()  # run once the service is back (a reload resets runtime state)
    live: tuple[tuple[str, str], ...] = ()  # kernel values (key, value) to write; a rollback's reload writes none


@dataclass(frozen=True)
class Changes:
    """What plan() would do; --dry-run and `vps-agentctl diff` print it."""

    files: tuple[FileChange, ...] = ()
    notes: tuple[str, ...] = ()
    diff: str = ""
    commands: tuple[CommandChange, ...] = ()
    reload: ReloadPlan = ReloadPlan()
    # facts for status that only the planning observation knows (the heal's observe-again may not)
    facts: tuple[tuple[str, str], ...] = ()

    @property
    def empty(self) -> bool:
        return not self.files and not self.commands


@dataclass(frozen=True)
class Blocked:
    """A failed lockout invariant: the control changes nothing and says why."""

    reasons: tuple[str, ...]

    def __str__(self) -> str:
        return "; ".join(self.reasons)


# What unblocks a held setting: a proof the admin gives (a login), or a change only the admin can make.
WAITS_FOR_PROOF = "proof"
NEEDS_CHANGE = "change"


@dataclass(frozen=True)
class HeldSetting:
    """One desired setting the lockout invariants hold back; the rest of the desired state applies."""

    setting: str  # as the tool reads it, e.g. "PasswordAuthentication no"
    reason: str  # e.g. "passwords stay on until admin logs in with a key"
    unblock: str  # the exact command or step that lets it apply
    needs: str = WAITS_FOR_PROOF

    def describe(self) -> str:
        return f"{self.setting} held: {self.reason}: {self.unblock}"


@dataclass(frozen=True)
class Held:
    """Per-setting lockout invariants: `desired` is what applies safely now, `settings` what waits.

    A control with only settings that wait for the admin's proof is `pending`; one with a setting that
    needs a change only the admin can make (an admin account, a config fix) is `blocked`."""

    settings: tuple[HeldSetting, ...]
    desired: Any

    @property
    def blocked(self) -> bool:
        return any(item.needs == NEEDS_CHANGE for item in self.settings)

    def __str__(self) -> str:
        return "; ".join(item.describe() for item in self.settings)

    def summary(self) -> str:
        """The status line: which settings wait (each one's reason and command is listed below it)."""
        what = "needs the admin's change" if self.blocked else "waits for the admin's proof"
        return f"held back, {what}: {', '.join(item.setting for item in self.settings)}"


class ObserveError(Exception):
    """The effective state cannot be read (the tool rejects the current config, a file is unsafe)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)


class ValidationError(Exception):
    """The real tool rejected the planned configuration."""


@dataclass
class ReloadOutcome:
    ok: bool
    detail: str
    facts: dict[str, Any] = field(default_factory=dict)  # what the reload saw, for status (a heal's facts)


class GuardSection(Protocol):
    """A config section a guard reads (ssh:, firewall:, ...): every one has `enabled`; some a `mode`."""

    @property
    def enabled(self) -> bool: ...


@dataclass(frozen=True)
class Meta:
    """The engine's policies for one guard (mgmt's meta-params): whether it runs at all, and whether it changes
    anything (enforce) or only observes and reports (report). The engine reads them; no guard implements them."""

    enabled: bool = True
    remediates: bool = True  # False: report mode, drift is reported and never changed

    @classmethod
    def of(cls, section: GuardSection) -> Meta:
        """A guard's section as its policies: `enabled`, and `mode: enforce|report` where the section has one."""
        return cls(section.enabled, getattr(section, "mode", "enforce") == "enforce")


Observed = TypeVar("Observed")
Desired = TypeVar("Desired")


@dataclass(frozen=True)
class Lesson(Generic[Desired]):
    """What a change taught: the desired state as the tool spells it (what the change is checked against)
    and the file in the agent's state directory that keeps it, written by the transaction once committed."""

    desired: Desired
    keep: FileChange


class Control(ABC, Generic[Observed, Desired]):
    """A guarded piece of state, generic over what observe() and desired() return (mypy checks each
    control's steps against its own types). Every step gets what it needs as arguments: a control keeps
    no state from one call to the next beyond caches of what it reads."""

    name: str

    def __init__(self, root: SystemRoot) -> None:
        self.root = root

    @abstractmethod
    def watches(self, config: Config) -> Sequence[WatchSpec]:
        """Where a change may change this control's state or its preconditions."""

    @abstractmethod
    def desired(self, config: Config, ssh: SshPorts) -> Desired:
        """What the state should be under this config; `ssh` is the engine's SSH ports for this converge."""

    @abstractmethod
    def observe(self, desired: Desired) -> Observed:
        """The effective state as the system sees it (`desired` says what to look at); raises ObserveError."""

    @abstractmethod
    def diff(self, observed: Observed, desired: Desired) -> Drift | None: ...

    @abstractmethod
    def plan(self, observed: Observed, desired: Desired, drift: Drift) -> Changes: ...

    @abstractmethod
    def preconditions(self, observed: Observed, desired: Desired) -> Blocked | Held | None:
        """The lockout invariants for going from observed to desired, per setting: None, all of it
        applies; Held, the settings held back and the desired state without them; Blocked, nothing."""

    @abstractmethod
    def validate(self, changes: Changes) -> Observed | None:
        """Ask the real tool; raises ValidationError with the tool's words. May return the observed
        state the check produced when the reload cannot change it (saves observing twice)."""

    @abstractmethod
    def reload(self, changes: Changes) -> ReloadOutcome:
        """Make the service take the change, as `changes.reload` says; a rollback passes the same changes
        (and start-up recovery the units its intent record names)."""

    def learned(self, after: Observed, desired: Desired) -> Lesson[Desired] | None:
        """After the change: what the tool taught (how it prints what the agent applied), or None. The
        control reads the kept file back in desired()."""
        return None

    @abstractmethod
    def meta(self, config: Config) -> Meta:
        """This guard's policies from its config section (`Meta.of(config.firewall)`)."""

    def netlink_groups(self, config: Config) -> Sequence[NetlinkGroup]:
        """Netlink groups whose messages may signal a change (state that lives in the kernel)."""
        return ()

    def poll_interval(self, config: Config) -> float | None:
        """Converge at least this often (seconds) when nothing can signal a change; None: no polling (the
        engine never polls a guard its meta disables or a pause holds)."""
        return None

    def poll_fingerprint(self, config: Config) -> object | None:
        """What the poll looks at, read cheaply (no process, no parsing). A poll finding it as it was just
        before the last converge skips the converge: a full one every 2 s cost the sysctl guard 0.16% of a
        core. None: every poll converges."""
        return None

    def facts(self, observed: Observed, desired: Desired) -> dict[str, Any]:
        """A few observed facts for `status` (e.g. the port sshd really uses), as this converge aimed."""
        return {}

    def report_note(self, facts: dict[str, Any]) -> str:
        """In report mode, the status detail from these facts (e.g. what enforcing would cut off), or ""."""
        return ""


def unified(before: str, after: str, label: str) -> str:
    lines = difflib.unified_diff(
        before.splitlines(keepends=True), after.splitlines(keepends=True), f"a{label}", f"b{label}", n=1
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def line_end(line: str) -> str:
    """A line's own end ("\n", "\r\n", a lone "\r" or "" for a last line without one): an edit that
    comments a line out keeps it, so the rest of the admin's file stays byte for byte."""
    return line[len(line.rstrip("\r\n")) :]

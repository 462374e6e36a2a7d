"""What the upgrade scheduler keeps across restarts (updates.json) and what a run comes to."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.paths import SystemRoot
from agent.system import fs

STATE_FILE = "updates.json"  # in the state directory (SystemRoot.updates_state)
CATCH_UP_MAX_DELAY = 300.0  # a missed run starts within this (and within randomized_delay) after start-up
REBOOT_RETRY = 300.0  # while users are logged in, look again this often inside the window
SUCCESS, FAILURE, TIMEOUT, INTERRUPTED, SKIPPED = "success", "failure", "timeout", "interrupted", "skipped"


@dataclass
class UpgradeState:
    """What survives a restart: kept in /var/lib/vps-agent/updates.json."""

    last_started: float | None = None
    last_finished: float | None = None
    last_outcome: str | None = None  # success | failure | timeout | interrupted
    last_detail: str = ""
    last_trigger: str = ""
    last_changes: list[str] = field(default_factory=list)  # "package old -> new"
    next_run: float | None = None  # the schedule's next time, with its random delay
    schedule: str | None = None  # the schedule next_run was computed for
    running: dict[str, Any] | None = None  # a run under way: id, started, trigger, before

    @classmethod
    def load(cls, root: SystemRoot) -> tuple[UpgradeState, str | None]:
        """The saved state, or a fresh one and why the saved one could not be used."""
        path = root.updates_state
        try:
            raw = fs.read_regular(path)
        except (fs.UnsafeFile, OSError) as exc:
            return cls(), f"{root.system_name(path)}: {exc}"
        if raw is None:
            return cls(), None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            known = {f for f in cls.__dataclass_fields__}
            return cls(**{k: v for k, v in data.items() if k in known}), None
        except (ValueError, TypeError) as exc:
            return cls(), f"{root.system_name(path)}: unreadable ({exc}); starting afresh"

    def save(self, root: SystemRoot) -> None:
        fs.ensure_dir(root.state_dir, 0o755)
        text = json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"
        fs.atomic_write(root.updates_state, text.encode(), mode=0o644)


@dataclass(frozen=True)
class RunResult:
    outcome: str
    detail: str
    changes: tuple[str, ...] = ()
    started: float = 0.0
    finished: float = 0.0


def changes_between(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Each package's old -> new version; new and removed packages too."""
    lines = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        lines.append(f"{name} {old or '(new)'} -> {new or '(removed)'}")
    return lines

"""One upgrade run's apt steps, as a transient systemd service each (agent/system/apt.py): what ran out of
time, what failed (and whether the dpkg lock stayed taken), the warnings worth a line."""

from __future__ import annotations

import time

from agent.config import format_duration
from agent.paths import SystemRoot
from agent.system import apt, dpkg
from agent.system.run import Completed
from agent.updates.host import security_sources
from agent.updates.state import FAILURE, SUCCESS, TIMEOUT

_LOCK_FAILURE = ("Could not get lock", "Unable to acquire the dpkg frontend lock", "Unable to lock")


def _lock_detail(step: Completed, lock_timeout: float, holder: str | None) -> str | None:
    text = step.error_text()
    if any(marker in text for marker in _LOCK_FAILURE):
        who = f" ({holder})" if holder else ""
        return f"the dpkg lock stayed taken for over {format_duration(lock_timeout)}{who}: nothing was upgraded"
    return None


def run_apt(root: SystemRoot, mode: str, lock_timeout: float, time_limit: float) -> tuple[str, str]:
    """One run's apt steps (update, then upgrade or the security-only upgrade; dpkg's repair first when
    it was left interrupted), each within what is left of the time limit: the outcome and its detail."""
    deadline = time.monotonic() + time_limit
    sources = security_sources(root) if mode == "security-only" else None
    steps = apt.upgrade_steps(
        mode,
        repair=dpkg.needs_repair(root),
        lock_timeout=lock_timeout,
        total_timeout=time_limit,
        sources=sources,
        via_systemd=apt.via_systemd(root),
    )
    notes = []
    for step in steps:
        left = deadline - time.monotonic()
        if left <= 0:
            return TIMEOUT, f"out of time ({format_duration(time_limit)}) before {_name(step.argv)}"
        holder = dpkg.holder(root)
        result = apt.run_step(step, left)
        if result.returncode == 124 or (time.monotonic() >= deadline and not result.ok):
            return TIMEOUT, f"{_name(step.argv)} ran out of the time limit ({format_duration(time_limit)})"
        if not result.ok:
            locked = _lock_detail(result, lock_timeout, holder.describe() if holder else None)
            return FAILURE, locked or f"{_name(step.argv)} failed: {_last_lines(result.error_text())}"
        warnings = [line for line in result.stdout.splitlines() + result.stderr.splitlines() if line.startswith("W:")]
        notes += warnings[:3]
    return SUCCESS, "; ".join(notes)


def _name(argv: tuple[str, ...]) -> str:
    """`apt-get upgrade` for a step, whether or not it runs under systemd-run."""
    if "--" in argv:
        argv = argv[argv.index("--") + 1 :]
    words = [a for a in argv if not a.startswith("-") and "=" not in a and "::" not in a]
    return " ".join(words[:2])


def _last_lines(text: str, count: int = 3) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[-count:]) if lines else "no output"

"""Scheduled apt upgrades: the scheduler (scheduler.py) and what it keeps across restarts (state.py).
Every process it needs runs through the system/ doors: apt (the steps, holds), dpkg (what is installed,
its lock), services (needrestart, the reboot)."""

from agent.updates.scheduler import UpgradeScheduler
from agent.updates.state import (
    CATCH_UP_MAX_DELAY,
    FAILURE,
    INTERRUPTED,
    REBOOT_RETRY,
    SKIPPED,
    STATE_FILE,
    SUCCESS,
    TIMEOUT,
    RunResult,
    UpgradeState,
    changes_between,
)

__all__ = [
    "CATCH_UP_MAX_DELAY",
    "FAILURE",
    "INTERRUPTED",
    "REBOOT_RETRY",
    "SKIPPED",
    "STATE_FILE",
    "SUCCESS",
    "TIMEOUT",
    "RunResult",
    "UpgradeScheduler",
    "UpgradeState",
    "changes_between",
]

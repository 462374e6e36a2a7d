"""Test-only fault injection: the daemon kills itself (SIGKILL) or raises at a named step of a transaction,
so the integration suite can prove what a crash at that instant leaves behind.

Off unless the environment variable VPS_AGENT_TEST_FAULT is set when `vps-agent run` starts, and honoured
only for a fake root (`--root DIR`, never /): on a real host it is refused with an error at start-up.
Only whoever starts the daemon (root, systemd) sets its environment; no unprivileged user can reach it.

    VPS_AGENT_TEST_FAULT=CONTROL:STEP[#N][:ACTION]

STEP is one of STEPS; #N picks the Nth time the step is reached in one transaction (the 2nd file write),
1 by default; ACTION is `kill` (SIGKILL, the default) or `raise` (a TypeError, as a bug would). It fires
once per process.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass

ENV = "VPS_AGENT_TEST_FAULT"
AFTER_BACKUP = "after-backup"  # the copies and the intent record are on disk, nothing changed yet
AFTER_WRITE = "after-write"  # after each file write
AFTER_COMMAND = "after-command"  # after each live change (a ruleset restored)
AFTER_VALIDATE = "after-validate"
DURING_RELOAD = "during-reload"  # the service was told to reload; not yet seen to have done so
DURING_COMMIT = "during-commit"  # the set is marked committed; not yet deduplicated or pruned
STEPS = (AFTER_BACKUP, AFTER_WRITE, AFTER_COMMAND, AFTER_VALIDATE, DURING_RELOAD, DURING_COMMIT)
ACTIONS = ("kill", "raise")


class FaultSpecError(ValueError):
    pass


class InjectedFault(TypeError):
    """What `raise` raises: not a domain error, so it takes the path a bug in a control would."""


@dataclass(frozen=True)
class Fault:
    control: str
    step: str
    nth: int = 1
    action: str = "kill"

    @classmethod
    def parse(cls, text: str) -> Fault:
        parts = text.strip().split(":")
        if len(parts) not in (2, 3) or not parts[0]:
            raise FaultSpecError(f"{ENV}={text!r}: expected CONTROL:STEP[#N][:kill|raise]")
        step, _, nth = parts[1].partition("#")
        action = parts[2] if len(parts) == 3 else "kill"
        if step not in STEPS:
            raise FaultSpecError(f"{ENV}={text!r}: unknown step {step!r}; steps: {', '.join(STEPS)}")
        if action not in ACTIONS:
            raise FaultSpecError(f"{ENV}={text!r}: unknown action {action!r}; actions: {', '.join(ACTIONS)}")
        if nth and (not nth.isdigit() or int(nth) < 1):
            raise FaultSpecError(f"{ENV}={text!r}: #N must be a positive number")
        return cls(parts[0], step, int(nth) if nth else 1, action)


class FaultInjector:
    """Called at every step of every transaction; acts once, where the spec says."""

    def __init__(self, fault: Fault | None = None) -> None:
        self.fault = fault
        self._fired = False
        self._lock = threading.Lock()

    def __call__(self, control: str, step: str, n: int = 1) -> None:
        fault = self.fault
        if fault is None or (fault.control, fault.step, fault.nth) != (control, step, n):
            return
        with self._lock:
            if self._fired:
                return
            self._fired = True
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedFault(f"injected fault: {control} at {step}#{n}")


def from_environment(is_fake_root: bool, environ: Mapping[str, str] = os.environ) -> FaultInjector:
    """The daemon's injector: inert unless ENV is set, and refused outside a fake root."""
    text = environ.get(ENV)
    if not text:
        return FaultInjector()
    if not is_fake_root:
        raise FaultSpecError(f"{ENV} is set: fault injection is for tests on a fake root (--root DIR) only")
    return FaultInjector(Fault.parse(text))

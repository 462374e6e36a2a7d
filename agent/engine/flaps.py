"""Flap damping, as data: how many heals of drift a control made lately, whether it is backing off, and
what a back-off still allows. No thread, no event, no file: the runner asks and reports; the clock is
injected, so every rule here is tested without sleeping.

The rules: more than `engine.flap_max_heals` heals of drift within `engine.flap_window` is a fight with
something that keeps undoing them; the control backs off for `engine.flap_backoff`, doubled for each
back-off in a row (at most an hour). While backing off, a change is still healed once nothing has changed
for FLAP_SETTLE, up to FLAP_RETRIES times a back-off: a storm that has ended must not leave the machine
drifted for the whole back-off. Some storms go silent while they last (`iptables -F` of chains already
empty changes nothing the kernel reports), so "quiet" cannot tell a storm that ended from one that goes
on: the agent heals again after each revert, and the budget bounds what a fight with another tool costs
(at most FLAP_RETRIES heals, ~15 s of it at two a second, then nothing until the back-off ends).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.config import EngineConfig, format_duration

FLAP_SETTLE = 0.5
FLAP_RETRIES = 30
MAX_BACKOFF = 3600.0


@dataclass(frozen=True)
class Flap:
    """A back-off began, or spent the heals it allows: the status line and the `flapping` event's fields."""

    why: str
    backoff_seconds: float
    heals: int


class FlapDamper:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._heal_times: collections.deque[float] = collections.deque()
        self.backoff_until: float | None = None  # on the injected clock
        self._level = 0  # back-offs in a row: each doubles the next
        self._heals_left = 0  # heals this back-off still allows (after FLAP_SETTLE without a change)

    def backing_off(self) -> bool:
        return self.backoff_until is not None and self._clock() < self.backoff_until

    def remembers_heals(self) -> bool:
        """Heals are remembered (those of the window, until settled() forgets the old ones)."""
        return bool(self._heal_times)

    def record(self, engine: EngineConfig) -> Flap | None:
        """A heal of drift (or a heal that failed: a fix that keeps failing must not be retried in a loop).
        A Flap when this one begins a back-off."""
        now = self._clock()
        self._heal_times.append(now)
        self._forget(now, engine)
        if len(self._heal_times) <= engine.flap_max_heals or self.backing_off():
            return None
        backoff = min(engine.flap_backoff * (2**self._level), MAX_BACKOFF)
        self._level += 1
        self.backoff_until = now + backoff
        self._heals_left = FLAP_RETRIES
        why = (
            f"reverted {len(self._heal_times)} times in {format_duration(engine.flap_window)}; "
            f"something keeps changing it: backing off {format_duration(backoff)} "
            f"(meanwhile healed only after {FLAP_SETTLE:g}s without a change, at most {FLAP_RETRIES} times; "
            "every version is in the backups)"
        )
        return Flap(why, backoff, len(self._heal_times))

    def spend(self) -> Flap | None:
        """One of the heals a back-off allows was spent. A Flap when it was the last: the drift now stays
        until the back-off ends, and the admin is told when that is."""
        self._heals_left -= 1
        if self._heals_left > 0 or self.backoff_until is None:
            return None
        left = max(self.backoff_until - self._clock(), 0.0)
        ends = time.strftime("%H:%M:%S", time.localtime(time.time() + left))
        why = (
            f"still changed after {FLAP_RETRIES} heals while backing off: something keeps undoing them; "
            f"not healing until the back-off ends at {ends} "
            "(`vps-agentctl converge` heals now; every version is in the backups)"
        )
        return Flap(why, round(left), FLAP_RETRIES)

    def hold_until(self, last_change: float) -> float | None:
        """While a back-off lasts, the earliest a converge may run: FLAP_SETTLE after the last change while
        heals are left, else the back-off's end. None when not backing off."""
        if self.backoff_until is None:
            return None
        settled = last_change + FLAP_SETTLE if self._heals_left > 0 else float("inf")
        return min(self.backoff_until, settled)

    def settled(self, engine: EngineConfig) -> bool:
        """No heal left in the window and no back-off running: the fight is over (and forgotten)."""
        self._forget(self._clock(), engine)
        if self._heal_times or self.backing_off():
            return False
        self.reset()
        return True

    def override(self) -> None:
        """The admin's explicit converge: the back-off ends now (the heals in the window still count)."""
        self.backoff_until = None

    def reset(self) -> None:
        """Resumed (or the fight is over): nothing is remembered."""
        self._heal_times.clear()
        self.backoff_until = None
        self._level = 0

    def _forget(self, now: float, engine: EngineConfig) -> None:
        while self._heal_times and now - self._heal_times[0] > engine.flap_window:
            self._heal_times.popleft()

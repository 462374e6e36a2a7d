"""Findings and warnings as events, at most a few per item per window: what a local user can make flap
(`chmod 666/600` on its own authorized_keys, in a loop) must not flood the events file and the alerts.

An item is a finding or warning of one thing in one place (kind, where, what), whatever its value. Its
first appearance is told at once, and so is its clearing right after; so is any change after a quiet
WINDOW. Other changes within WINDOW of the last event about it (it came back, went again, its value
changed) are folded, and summed up in one event (how many there were, and how it is now) once the
window has passed and it has not changed for SETTLE, or after two windows if it never stops. So an
item makes at most three events per window, however fast it flaps. Status is not affected: it is
always exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.controls.base import DriftItem

WINDOW = 300.0  # seconds: once an item flaps, its changes are summed up at most once per window
SETTLE = 30.0  # seconds without a change before folded changes are summed up


@dataclass
class _Item:
    told: str | None  # the description collectors were last told (None: told it is gone)
    told_at: float
    seen: str | None  # as the last round found it
    last_present: str  # its description when last present (what a clearing names)
    folded: int = 0  # changes since told_at not told
    changed_at: float = 0.0
    fresh: bool = True  # the last event about it told it appeared, at once: its clearing is told at once too


@dataclass(frozen=True)
class FindingsNews:
    """What to tell after one round: the items to report as present (drift-detected, with the whole set),
    those to report gone (findings-cleared), the folded changes summed up in these, and when to look
    again so a summary is not left waiting for the next periodic reconcile."""

    appeared: tuple[DriftItem, ...] = ()
    cleared: tuple[str, ...] = ()
    folded: dict[str, int] = field(default_factory=dict)  # description -> changes summed up
    recheck_at: float | None = None


def _key(item: DriftItem) -> tuple[str, str, str]:
    return item.kind, item.where, item.what


class FindingsReporter:
    def __init__(self, window: float | None = None, settle: float | None = None) -> None:
        self.window = WINDOW if window is None else window
        self.settle = SETTLE if settle is None else settle
        self._items: dict[tuple[str, str, str], _Item] = {}

    def update(self, reported: Sequence[DriftItem], now: float) -> FindingsNews:
        current = {_key(item): item for item in reported}
        appeared: list[DriftItem] = []
        cleared: list[str] = []
        folded: dict[str, int] = {}

        def tell(state: _Item, item: DriftItem | None, *, at_once: bool) -> None:
            if item is None:
                cleared.append(state.last_present)
            else:
                appeared.append(item)
            if state.folded:
                folded[item.describe() if item else state.last_present] = state.folded
            state.told, state.told_at, state.folded = (item.describe() if item else None), now, 0
            state.fresh = at_once and item is not None

        for key in sorted(set(current) | set(self._items)):
            item = current.get(key)
            seen = item.describe() if item is not None else None
            state = self._items.get(key)
            if state is None:
                if item is not None:
                    assert seen is not None
                    self._items[key] = _Item(seen, now, seen, seen, 0, now)
                    appeared.append(item)
                continue
            if seen is not None:
                state.last_present = seen
            if seen != state.seen:
                state.seen, state.changed_at = seen, now
                quiet = now - state.told_at >= self.window
                cleared_right_after = seen is None and state.fresh
                if state.folded == 0 and (quiet or cleared_right_after):
                    tell(state, item, at_once=True)
                else:
                    state.folded += 1
            if state.folded and now >= self._summary_due(state):
                tell(state, item, at_once=False)
            if state.seen is None and state.told is None and not state.folded and now - state.told_at >= self.window:
                del self._items[key]  # gone and quiet: forgotten, so what is kept stays bounded
        pending = [self._summary_due(state) for state in self._items.values() if state.folded]
        return FindingsNews(tuple(appeared), tuple(cleared), folded, min(pending) if pending else None)

    def _summary_due(self, state: _Item) -> float:
        """A window after the last event about it, once it has settled; after two windows in any case."""
        settled = max(state.told_at + self.window, state.changed_at + self.settle)
        return min(settled, state.told_at + 2 * self.window)

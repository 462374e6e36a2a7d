"""The flap damper on a hand-turned clock: when a fight begins a back-off, what a back-off still heals, when
it is over. The runner's tests (test_runner.py) show the same rules with a real thread and real files."""

from __future__ import annotations

import pytest

from agent.config import EngineConfig
from agent.engine import flaps
from agent.engine.flaps import FLAP_SETTLE, FlapDamper

ENGINE = EngineConfig(flap_max_heals=3, flap_window=60.0, flap_backoff=300.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def fight(damper: FlapDamper, clock: Clock, heals: int, every: float = 1.0) -> list[flaps.Flap]:
    began = []
    for _ in range(heals):
        clock.now += every
        flap = damper.record(ENGINE)
        if flap is not None:
            began.append(flap)
    return began


def test_more_heals_than_allowed_within_the_window_begin_one_back_off(clock: Clock) -> None:
    damper = FlapDamper(clock)
    assert fight(damper, clock, 3) == [] and not damper.backing_off()
    [flap] = fight(damper, clock, 3)  # the 4th begins it; those during the back-off add none
    assert flap.backoff_seconds == 300 and flap.heals == 4
    assert "reverted 4 times in 1m" in flap.why and "backing off 5m" in flap.why
    assert damper.backing_off() and damper.backoff_until == pytest.approx(1004.0 + 300)


def test_heals_spread_wider_than_the_window_never_flap(clock: Clock) -> None:
    damper = FlapDamper(clock)
    assert fight(damper, clock, 20, every=21.0) == []  # at most 3 within any 60 s
    assert not damper.backing_off()


def test_back_offs_in_a_row_double_up_to_an_hour(clock: Clock) -> None:
    damper = FlapDamper(clock)
    lengths = []
    for _ in range(6):
        [flap] = fight(damper, clock, 4)
        lengths.append(flap.backoff_seconds)
        clock.now = damper.backoff_until + 0.1  # type: ignore[operator]
    assert lengths == [300, 600, 1200, 2400, 3600, 3600]


def test_while_backing_off_a_change_is_healed_once_quiet_and_the_budget_ends_it(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flaps, "FLAP_RETRIES", 2)
    damper = FlapDamper(clock)
    fight(damper, clock, 4)
    changed = clock.now + 10
    assert damper.hold_until(changed) == changed + FLAP_SETTLE  # quiet for FLAP_SETTLE, then one heal
    assert damper.spend() is None
    last = damper.spend()
    assert last is not None and "still changed after 2 heals while backing off" in last.why
    assert damper.hold_until(changed) == damper.backoff_until  # nothing more until the back-off ends


def test_a_fight_is_over_once_the_window_and_the_back_off_have_passed(clock: Clock) -> None:
    damper = FlapDamper(clock)
    fight(damper, clock, 4)
    assert not damper.settled(ENGINE)
    clock.now += 100  # the window has passed, the back-off has not
    assert not damper.settled(ENGINE) and damper.backing_off()
    clock.now = damper.backoff_until + 1  # type: ignore[operator]
    assert damper.settled(ENGINE) and damper.hold_until(clock.now) is None
    [flap] = fight(damper, clock, 4)
    assert flap.backoff_seconds == 300  # forgotten: the next fight starts again at the first length


def test_the_admins_converge_ends_the_back_off_and_resume_forgets_the_fight(clock: Clock) -> None:
    damper = FlapDamper(clock)
    fight(damper, clock, 4)
    damper.override()
    assert not damper.backing_off() and damper.remembers_heals()
    assert not damper.settled(ENGINE)  # the heals still count within the window
    damper.reset()
    assert not damper.remembers_heals() and damper.backoff_until is None

"""The per-control loop: debounce, flap damping, pause and resume."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.controls.base import FINDING, WAITS_FOR_PROOF, Blocked, Drift, DriftItem, Held, HeldSetting
from agent.engine import findings, flaps
from agent.engine import runner as runner_module
from agent.engine import transaction as tx
from agent.engine.runner import DPKG_RECHECK, FLAP_SETTLE, FLAPPING, PAUSED, WAITING, ControlRunner
from agent.events import null_events
from agent.paths import SystemRoot
from agent.system import backups, dpkg, fs
from tests.guards import no_ssh_ports
from tests.unit.test_dpkg_lock import held
from tests.unit.test_transaction import FileControl

CONFIG = parse_config(
    "engine: {debounce: 20ms, flap_max_heals: 3, flap_window: 1m, flap_backoff: 5m, reconcile_interval: 1h}"
)


# Callable[...]: the predicates are lambdas that bind a loop's value as a default
def wait_until(predicate: Callable[..., object], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[ControlRunner]:
    root = SystemRoot.at(tmp_path / "root")
    (tmp_path / "root/etc").mkdir(parents=True)
    control = FileControl(root)
    ctx = tx.TransactionContext(null_events(), backups.BackupStore(tmp_path / "b", 50), fs.EchoFilter())
    instance = ControlRunner(control, lambda: CONFIG, ctx, no_ssh_ports)
    instance.start()
    yield instance
    instance.stop()


def file_control(runner: ControlRunner) -> FileControl:
    """The runner's control, as the fixture made it: one file and its knobs."""
    control = runner.control
    assert isinstance(control, FileControl)
    return control


def tamper(runner: ControlRunner, text: str = "tampered\n") -> None:
    file_control(runner).file.write_text(text)
    runner.trigger(str(file_control(runner).file))


def actions(runner: ControlRunner) -> list[str]:
    return [e["event"]["action"] for e in runner.ctx.events.sinks.recent(1000)]


def test_a_burst_of_events_is_one_transaction(runner: ControlRunner) -> None:
    file_control(runner).file.write_text("tampered\n")
    for _ in range(20):
        runner.trigger("burst")
    assert wait_until(lambda: runner.state.heals == 1)
    time.sleep(0.2)
    assert runner.state.heals == 1 and actions(runner).count("drift-reverted") == 1


def _into_backoff(runner: ControlRunner) -> None:
    before = runner.state.heals
    for n in range(4):  # flap_max_heals is 3
        tamper(runner, f"attacker {n}\n")
        assert wait_until(lambda n=n: runner.state.heals == before + n + 1)
    assert runner.state.status == FLAPPING


def test_more_heals_than_allowed_in_the_window_is_flapping_and_backs_off(
    runner: ControlRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flaps, "FLAP_RETRIES", 3)
    _into_backoff(runner)
    assert "backing off 5m" in runner.state.why and "at most 3 times" in runner.state.why
    flapping = [e for e in runner.ctx.events.sinks.recent(100) if e["event"]["action"] == "flapping"]
    assert len(flapping) == 1 and flapping[0]["backoff_seconds"] == 300
    for heals in (5, 6, 7):  # each change is healed once quiet for FLAP_SETTLE, up to FLAP_RETRIES times
        tamper(runner, f"attacker again {heals}\n")
        time.sleep(FLAP_SETTLE / 2)
        assert runner.state.heals == heals - 1  # backing off: no heal while the changes may go on
        assert wait_until(lambda heals=heals: runner.state.heals == heals)
        assert file_control(runner).file.read_text() == "good\n"
        assert runner.state.status == FLAPPING
    # the budget is spent: the drift stays until the back-off ends, and the agent says so
    assert "still changed after 3 heals while backing off" in runner.state.why
    assert "not healing until the back-off ends at" in runner.state.why
    assert actions(runner).count("flapping") == 2
    tamper(runner, "attacker once more\n")
    time.sleep(FLAP_SETTLE + 0.3)
    assert runner.state.heals == 7
    assert file_control(runner).file.read_text() == "attacker once more\n"
    assert actions(runner).count("flapping") == 2


def test_a_storm_that_goes_silent_is_healed_within_a_second_after_it(runner: ControlRunner) -> None:
    """Like `iptables -F` at 100/s: undoing a heal is seen (a netlink message), repeating the undo on
    what is already undone is not (nothing changed), so quiet does not mean the storm has ended."""
    _into_backoff(runner)
    file = file_control(runner).file
    storm_ends = time.monotonic() + 2.0
    seen = 0
    while time.monotonic() < storm_ends:
        if file.read_text() != "flushed\n":
            tamper(runner, "flushed\n")  # undoes the last heal: a change the agent is told of
            seen += 1
        time.sleep(0.01)  # otherwise a silent no-op
    stopped = time.monotonic()
    assert seen >= 3  # the agent healed again during the storm, each heal undone at once
    assert wait_until(lambda: file.read_text() == "good\n", timeout=3.0)
    assert time.monotonic() - stopped < 1.0 + 0.5  # FLAP_SETTLE after the last undo, then the heal
    assert runner.state.status == FLAPPING


def test_a_storm_is_not_fought_edit_by_edit_and_is_healed_once_it_stops(runner: ControlRunner) -> None:
    _into_backoff(runner)
    storm_ends = time.monotonic() + 1.0
    while time.monotonic() < storm_ends:  # 50 edits a second: never quiet for FLAP_SETTLE
        tamper(runner, f"storm {time.monotonic()}\n")
        time.sleep(0.02)
    assert runner.state.heals == 4
    stopped = time.monotonic()
    assert wait_until(lambda: runner.state.heals == 5)  # counted once the transaction is over
    assert time.monotonic() - stopped < FLAP_SETTLE + 2.0  # not the 5-minute back-off
    assert file_control(runner).file.read_text() == "good\n"
    assert runner.state.status == FLAPPING


def test_pause_reports_drift_without_healing_and_resume_heals_at_once(runner: ControlRunner) -> None:
    runner.pause(float("inf"))
    tamper(runner)
    assert wait_until(lambda: bool(runner.state.drift))
    assert runner.state.status == PAUSED and "drift" in runner.state.why
    assert file_control(runner).file.read_text() == "tampered\n"
    assert "drift-reverted" not in actions(runner)
    paused_events = [e for e in runner.ctx.events.sinks.recent(100) if e.get("paused")]
    assert [e["event"]["action"] for e in paused_events] == ["drift-detected"]  # reported once, not reverted
    runner.trigger("same drift again")
    time.sleep(0.2)
    assert len([e for e in runner.ctx.events.sinks.recent(100) if e.get("paused")]) == 1
    runner.resume()
    assert wait_until(lambda: runner.state.status == tx.HEALED)
    assert file_control(runner).file.read_text() == "good\n"


def test_a_timed_pause_ends_by_itself(runner: ControlRunner) -> None:
    runner.pause(time.time() + 0.3)
    tamper(runner)
    time.sleep(0.1)
    assert file_control(runner).file.read_text() == "tampered\n"
    assert wait_until(lambda: file_control(runner).file.read_text() == "good\n", timeout=5)


def test_converge_and_wait_returns_the_outcome(runner: ControlRunner) -> None:
    file_control(runner).file.write_text("tampered\n")
    outcome = runner.converge_and_wait("admin")
    assert outcome is not None and outcome.status == tx.HEALED


def test_a_running_dpkg_is_waited_for_then_converged_once(tmp_path: Path) -> None:
    root = SystemRoot.at(tmp_path / "root")
    lib = tmp_path / "root/var/lib/dpkg"
    lib.mkdir(parents=True)
    (lib / "lock-frontend").write_text("")
    (tmp_path / "root/etc").mkdir(parents=True)

    def busy() -> str | None:
        holder = dpkg.holder(root)
        return holder.describe() if holder else None

    ctx = tx.TransactionContext(null_events(), backups.BackupStore(tmp_path / "b", 50), fs.EchoFilter(), busy)
    runner = ControlRunner(FileControl(root), lambda: CONFIG, ctx, no_ssh_ports)
    runner.start()
    try:
        with held(lib / "lock-frontend") as apt:
            for n in range(5):  # a package upgrade rewrites the file several times
                tamper(runner, f"dpkg writes {n}\n")
            assert wait_until(lambda: runner.state.status == WAITING)
            assert f"pid {apt.pid}" in runner.state.why
            time.sleep(DPKG_RECHECK * 1.5)
            assert file_control(runner).file.read_text() == "dpkg writes 4\n"
            outcome = runner.converge_and_wait("admin converge while dpkg runs", timeout=5)
            assert outcome is not None and outcome.status == WAITING
        assert wait_until(lambda: runner.state.status == tx.HEALED, timeout=DPKG_RECHECK * 5)
        time.sleep(0.3)
        assert file_control(runner).file.read_text() == "good\n"
        assert runner.state.heals == 1 and actions(runner).count("drift-reverted") == 1
        waits = [e for e in runner.ctx.events.sinks.recent(100) if e["event"]["action"] == "package-manager-busy"]
        assert [e["event"]["outcome"] for e in waits] == ["unknown", "success"]
    finally:
        runner.stop()


def test_a_guard_waiting_for_the_agents_own_upgrade_converges_as_soon_as_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`vps-agentctl upgrade --now` answers once its apt run is over: the guards that waited for its dpkg are
    settled by then (on a booted Debian 13 VPS, status right after the answer said fail2ban `waiting`)."""
    monkeypatch.setattr(runner_module, "DPKG_RECHECK", 60.0)  # the next look would come only after the test
    root = SystemRoot.at(tmp_path / "root")
    lib = tmp_path / "root/var/lib/dpkg"
    lib.mkdir(parents=True)
    (lib / "lock-frontend").write_text("")
    (tmp_path / "root/etc").mkdir(parents=True)

    def busy() -> str | None:
        holder = dpkg.holder(root)
        return holder.describe() if holder else None

    ctx = tx.TransactionContext(null_events(), backups.BackupStore(tmp_path / "b", 50), fs.EchoFilter(), busy)
    runner = ControlRunner(FileControl(root), lambda: CONFIG, ctx, no_ssh_ports)
    runner.start()
    try:
        assert runner.dpkg_finished() is None  # not waiting: nothing to do
        with held(lib / "lock-frontend"):
            tamper(runner, "the upgrade wrote this\n")
            assert wait_until(lambda: runner.state.status == WAITING)
        outcome = runner.dpkg_finished(timeout=10)
        assert outcome is not None and outcome.status == tx.HEALED
        assert file_control(runner).file.read_text() == "good\n"
    finally:
        runner.stop()


def test_what_the_admin_asks_for_is_not_counted_as_flapping(runner: ControlRunner) -> None:
    for n in range(CONFIG.engine.flap_max_heals + 3):
        file_control(runner).file.write_text(f"admin edit {n}\n")
        outcome = runner.converge_and_wait("vps-agentctl converge")
        assert outcome is not None and outcome.status == tx.HEALED
    assert runner.state.status == tx.HEALED and runner.flaps.backoff_until is None
    assert "flapping" not in actions(runner)


def test_heals_towards_a_new_aim_are_not_flapping_but_undoing_them_still_is(runner: ControlRunner) -> None:
    """The agent's own new intent (a key login proven, a move confirmed: the desired state changed) is
    applied, not reverted: on a booted VPS the admin's first key login, after a morning of healed drifts,
    put the SSH guard into flapping and status said so for five minutes."""
    for n in range(CONFIG.engine.flap_max_heals + 3):
        file_control(runner).want = f"aim {n}\n"
        runner.trigger("the aim changed")
        assert wait_until(lambda n=n: runner.state.heals == n + 1)
    assert runner.state.status == tx.HEALED and "flapping" not in actions(runner)
    _into_backoff(runner)  # the same aim, undone again and again: flapping as before
    assert file_control(runner).file.read_text() == f"aim {CONFIG.engine.flap_max_heals + 2}\n"


class FileControlWithFinding(FileControl):
    """The demo control plus a finding (reported, never changed by the agent) while /etc/finding exists."""

    def diff(self, observed: str | None, desired: str) -> Drift | None:
        drift = super().diff(observed, desired)
        if not self.root.path("/etc/finding").exists():
            return drift
        finding = DriftItem("a finding", "/etc/finding", "absent", "is there", None, FINDING, "remove it by hand")
        return Drift(self.name, (drift.items if drift else ()) + (finding,), drift.diff if drift else "")


@contextlib.contextmanager
def compliant_runner(tmp_path: Path, control_class: type[FileControl]) -> Iterator[ControlRunner]:
    """A started runner for a control whose file is already right (only its findings vary)."""
    root = SystemRoot.at(tmp_path / "root")
    (tmp_path / "root/etc").mkdir(parents=True)
    control = control_class(root)
    control.file.write_text("good\n")
    ctx = tx.TransactionContext(null_events(), backups.BackupStore(tmp_path / "b", 50), fs.EchoFilter())
    instance = ControlRunner(control, lambda: CONFIG, ctx, no_ssh_ports)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture
def finding_runner(tmp_path: Path) -> Iterator[ControlRunner]:
    with compliant_runner(tmp_path, FileControlWithFinding) as instance:
        yield instance


def test_a_finding_alone_leaves_the_control_drifted_reported_once_and_never_touched(
    finding_runner: ControlRunner,
) -> None:
    finding = finding_runner.control.root.path("/etc/finding")
    finding.write_text("left by someone\n")
    for _ in range(3):
        assert finding_runner.converge_and_wait("look") is not None
    assert finding_runner.state.status == tx.DRIFTED
    assert finding_runner.state.why.startswith("1 finding(s) for the admin to fix")
    assert finding_runner.state.drift == [
        "/etc/finding: finding: a finding is there, expected absent; remove it by hand"
    ]
    reported = [e for e in finding_runner.ctx.events.sinks.recent(100) if e["event"]["action"] == "drift-detected"]
    assert len(reported) == 1 and reported[0]["findings"] == finding_runner.state.drift
    assert actions(finding_runner) == ["drift-detected"] and finding_runner.state.heals == 0
    assert finding.read_text() == "left by someone\n"
    finding.unlink()
    finding_runner.converge_and_wait("fixed by the admin")
    assert finding_runner.state.status == tx.COMPLIANT and finding_runner.state.drift == []
    # collectors learn that the finding is gone, once
    finding_runner.converge_and_wait("look again")
    assert actions(finding_runner) == ["drift-detected", "findings-cleared"]
    cleared = finding_runner.ctx.events.sinks.recent(100)[-1]
    assert cleared["cleared"] == reported[0]["findings"] and cleared["event"]["outcome"] == "success"
    assert "no longer reported: /etc/finding" in cleared["message"]


def test_a_finding_left_after_a_heal_keeps_the_control_drifted(finding_runner: ControlRunner) -> None:
    finding_runner.control.root.path("/etc/finding").write_text("left by someone\n")
    file_control(finding_runner).file.write_text("tampered\n")
    outcome = finding_runner.converge_and_wait("tampered")
    assert outcome is not None and outcome.status == tx.HEALED
    assert file_control(finding_runner).file.read_text() == "good\n"
    assert finding_runner.state.status == tx.DRIFTED and finding_runner.state.heals == 1
    assert [d.split(":")[0] for d in finding_runner.state.drift] == ["/etc/finding"]
    assert actions(finding_runner)[-2:] == ["drift-reverted", "drift-detected"]


class FileControlWithTwoFindings(FileControl):
    """A finding per file that exists of /etc/finding-a and /etc/finding-b."""

    def diff(self, observed: str | None, desired: str) -> Drift | None:
        drift = super().diff(observed, desired)
        found = tuple(
            DriftItem(f"finding {x}", f"/etc/finding-{x}", "absent", "is there", None, FINDING, "remove it by hand")
            for x in "ab"
            if self.root.path(f"/etc/finding-{x}").exists()
        )
        if not found:
            return drift
        return Drift(self.name, (drift.items if drift else ()) + found, drift.diff if drift else "")


def test_each_finding_that_goes_is_named_and_a_smaller_set_is_not_reported_again(tmp_path: Path) -> None:
    with compliant_runner(tmp_path, FileControlWithTwoFindings) as runner:
        root = runner.control.root
        for x in "ab":
            root.path(f"/etc/finding-{x}").write_text("left\n")
        runner.converge_and_wait("look")
        root.path("/etc/finding-a").unlink()
        runner.converge_and_wait("look")
        assert actions(runner) == ["drift-detected", "findings-cleared"]
        cleared = runner.ctx.events.sinks.recent(10)[-1]
        assert [c.split(":")[0] for c in cleared["cleared"]] == ["/etc/finding-a"]
        assert [c.split(":")[0] for c in cleared["remaining"]] == ["/etc/finding-b"]
        assert runner.state.status == tx.DRIFTED  # finding-b is still there
        root.path("/etc/finding-a").write_text("back\n")  # back at once: folded, then summed up (below)
        runner.converge_and_wait("look")
        assert actions(runner) == ["drift-detected", "findings-cleared"] and len(runner.state.drift) == 2


class Clock:
    """time.monotonic, moved forward by the test (the runner's waits still run in real time)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@contextlib.contextmanager
def flapping_runner(tmp_path: Path, clock: Clock | None = None) -> Iterator[ControlRunner]:
    root = SystemRoot.at(tmp_path / "root")
    (tmp_path / "root/etc").mkdir(parents=True)
    control = FileControlWithFinding(root)
    control.file.write_text("good\n")
    ctx = tx.TransactionContext(null_events(), backups.BackupStore(tmp_path / "b", 50), fs.EchoFilter())
    instance = ControlRunner(control, lambda: CONFIG, ctx, no_ssh_ports, clock=clock or Clock())
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def toggle(runner: ControlRunner, times: int) -> None:
    """The finding comes and goes, one converge each (a user's `chmod 666/600` in a loop); status is exact."""
    finding = runner.control.root.path("/etc/finding")
    for _ in range(times):
        there = not finding.exists()
        finding.write_text("left\n") if there else finding.unlink()
        assert runner.converge_and_wait("toggled") is not None
        assert runner.state.status == (tx.DRIFTED if there else tx.COMPLIANT)
        assert len(runner.state.drift) == (1 if there else 0)


def test_a_finding_a_user_toggles_is_reported_once_and_summed_up_once_a_window_has_passed(tmp_path: Path) -> None:
    clock = Clock()
    with flapping_runner(tmp_path, clock) as runner:
        toggle(runner, 40)
        assert actions(runner) == ["drift-detected", "findings-cleared"]  # the first appearance and clearing
        assert runner._pending == "folded findings settle"  # a look is due when the summary is
        # a window later (settled: gone, as the last event said), one event sums the 38 changes up
        clock.offset += findings.WINDOW
        runner.converge_and_wait("look")
        assert len(actions(runner)) == 3
        summary = runner.ctx.events.sinks.recent(1)[0]
        assert summary["event"]["action"] == "findings-cleared" and "changed 38 more times" in summary["message"]
        assert list(summary["folded"].values()) == [38]
        runner.converge_and_wait("look")
        assert len(actions(runner)) == 3  # nothing more while it stays as it is

        # back within the window of that summary: folded (status exact at once), then summed up as there
        toggle(runner, 1)
        assert len(actions(runner)) == 3
        clock.offset += findings.WINDOW
        runner.converge_and_wait("look")
        assert actions(runner)[-1] == "drift-detected" and len(actions(runner)) == 4

        # after a quiet window, a change is told at once again
        clock.offset += findings.WINDOW
        toggle(runner, 1)
        assert actions(runner)[-1] == "findings-cleared" and len(actions(runner)) == 5
        assert "summed up" not in runner.ctx.events.sinks.recent(1)[0]["message"]


def test_a_finding_that_never_stops_flapping_is_summed_up_every_two_windows(tmp_path: Path) -> None:
    clock = Clock()
    with flapping_runner(tmp_path, clock) as runner:
        for _ in range(4):
            toggle(runner, 11)
            clock.offset += findings.WINDOW  # still changing at each look: no settling
        toggle(runner, 1)
        # 2 at once, then a summary at most every two windows: 4 windows, 2 summaries
        assert len(actions(runner)) == 4


def test_the_runner_looks_again_by_itself_when_a_summary_is_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(findings, "WINDOW", 0.5)
    monkeypatch.setattr(findings, "SETTLE", 0.1)
    with flapping_runner(tmp_path) as runner:
        toggle(runner, 5)
        assert len(actions(runner)) == 2
        assert wait_until(lambda: len(actions(runner)) == 3, 5)  # no trigger, no periodic reconcile (1h)
        assert runner.ctx.events.sinks.recent(1)[0]["event"]["action"] == "drift-detected"  # it is there now


def test_the_rate_limit_is_per_item_whatever_its_value() -> None:
    reporter = findings.FindingsReporter(window=600, settle=30)
    modes = [f"is writable by others (mode 0{m}66)" for m in range(6)]
    told = []
    item = None
    for n, mode in enumerate(modes * 10):  # an attacker cycling the mode: one item, not sixty
        item = DriftItem("login files of alice", "/home/alice/.ssh/authorized_keys", "0600", mode, None, FINDING, "")
        news = reporter.update([item], float(n))
        told += list(news.appeared) + list(news.cleared)
    assert item is not None and len(told) == 1
    news = reporter.update([item], 600.0)  # a window on: one summary with the value it has now
    assert [i.actual for i in news.appeared] == [modes[-1]] and news.folded == {item.describe(): 59}
    assert reporter.update([], 700.0).cleared == ()  # gone within the window of that summary: folded
    assert reporter.update([], 1200.0).cleared == (item.describe(),)  # and told a window later


def test_a_blocked_control_rechecked_unchanged_reports_once(runner: ControlRunner) -> None:
    file_control(runner).blocked = Blocked(("no admin could log in",))
    tamper(runner)
    for _ in range(3):
        outcome = runner.converge_and_wait("re-check", admin=False)
        assert outcome is not None and outcome.status == tx.BLOCKED
    assert runner.state.status == tx.BLOCKED
    assert actions(runner).count("remediation-blocked") == 1 and actions(runner).count("drift-detected") == 1
    file_control(runner).blocked = Blocked(("no admin could log in", "and another reason"))
    runner.converge_and_wait("re-check", admin=False)
    assert actions(runner).count("remediation-blocked") == 2


def test_held_settings_make_the_control_pending_and_are_reported_once(runner: ControlRunner) -> None:
    wait = HeldSetting("Risky yes", "passwords stay on until admin logs in with a key", "ssh-copy-id admin@vps")
    file_control(runner).blocked = Held((wait,), "safe\n")
    tamper(runner)
    assert wait_until(lambda: runner.state.heals == 1)
    assert wait_until(lambda: runner.state.status == tx.PENDING)
    assert file_control(runner).file.read_text() == "safe\n"
    for _ in range(3):
        runner.converge_and_wait("re-check", admin=False)
    assert runner.state.status == tx.PENDING and runner.state.why == "held back, waits for the admin's proof: Risky yes"
    assert runner.state.snapshot("demo")["held"] == [
        {"setting": "Risky yes", "reason": wait.reason, "unblock": wait.unblock, "needs": WAITS_FOR_PROOF}
    ]
    assert actions(runner).count("remediation-pending") == 1 and actions(runner).count("drift-detected") == 1
    file_control(runner).blocked = None
    runner.converge_and_wait("the proof came")
    assert file_control(runner).file.read_text() == "good\n"
    assert runner.state.status == tx.HEALED and runner.state.held == []


def test_heals_that_follow_the_systems_own_change_never_count_towards_flapping(
    runner: ControlRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = file_control(runner).diff

    def undamped(observed: str | None, desired: str) -> Drift | None:
        drift = original(observed, desired)
        if drift is None:
            return None
        items = tuple(DriftItem(i.what, i.where, i.expected, i.actual, damped=False) for i in drift.items)
        return Drift(drift.control, items, drift.diff)

    monkeypatch.setattr(file_control(runner), "diff", undamped)
    for n in range(6):  # flap_max_heals is 3: six damped heals would be flapping
        tamper(runner, f"login {n}\n")
        assert wait_until(lambda n=n: runner.state.heals == n + 1)
    assert runner.state.status == tx.HEALED and "flapping" not in actions(runner)


def test_the_engine_tells_every_worker_to_stop_before_it_waits_for_any(tmp_path: Path) -> None:
    # five guards each finishing a heal must not add up their waits past systemd's TimeoutStopSec
    from agent.engine.engine import Engine

    ctx = tx.TransactionContext(null_events(), backups.BackupStore(tmp_path / "b", 50), fs.EchoFilter())
    engine = Engine([], CONFIG, ctx, no_ssh_ports)
    said: list[tuple[str, str]] = []

    class Worker:
        def __init__(self, name: str) -> None:
            self.name = name

        def request_stop(self) -> None:
            said.append(("asked", self.name))

        def stop(self, timeout: float = 30.0) -> None:
            said.append(("joined", self.name))
            assert timeout <= 30.0
            time.sleep(0.05)  # a worker finishing its heal

    engine.runners = {name: Worker(name) for name in ("ssh", "firewall", "fail2ban")}  # type: ignore[misc]
    engine.stop(timeout=30.0)
    assert [what for what, _ in said] == ["asked"] * 3 + ["joined"] * 3

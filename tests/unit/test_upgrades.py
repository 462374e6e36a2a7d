"""The upgrade scheduler's decisions with a fake clock (no test sleeps for a schedule), the run's report
with declared apt/dpkg answers, and the security-only sources. The real apt runs in tests/e2e."""

from __future__ import annotations

import datetime
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.events import Events, null_events
from agent.paths import SystemRoot
from agent.schedule import Schedule, Window
from agent.system import apt
from agent.updates import CATCH_UP_MAX_DELAY, STATE_FILE, UpgradeScheduler, UpgradeState, changes_between
from tests.unit.conftest import DeclaredCommands


class HostRoot(SystemRoot):
    """The host as the scheduler sees it, but its files under a temporary directory."""

    @property
    def is_host(self) -> bool:
        return True


@pytest.fixture
def berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time with a UTC offset and daylight saving time, as many VPSes have."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def at(text: str) -> float:
    """A local wall-clock time as a Unix time."""
    return datetime.datetime.fromisoformat(text).astimezone().timestamp()


def local(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment).strftime("%Y-%m-%d %H:%M")


def scheduler(root: SystemRoot, config: str, now: float, events: Events | None = None) -> UpgradeScheduler:
    parsed = parse_config(config)
    return UpgradeScheduler(root, lambda: parsed, events or null_events(), clock=lambda: now, rng=random.Random(7))


def actions(events: Events) -> list[str]:
    return [e["event"]["action"] for e in events.sinks.recent(100)]


# ---- the schedule -----------------------------------------------------------------------------------


def test_daily_is_the_next_local_time(berlin: None) -> None:
    schedule = Schedule("daily 03:30")
    assert local(schedule.next_after(at("2026-11-24T12:00"))) == "2026-11-25 03:30"
    assert local(schedule.next_after(at("2026-11-25T03:29"))) == "2026-11-25 03:30"
    assert local(schedule.next_after(at("2026-11-25T03:30"))) == "2026-11-26 03:30"  # strictly after


def test_weekly_is_the_next_such_day(berlin: None) -> None:
    schedule = Schedule("weekly sun 04:00")
    assert local(schedule.next_after(at("2026-11-24T12:00"))) == "2026-11-29 04:00"  # a Tuesday
    assert local(schedule.next_after(at("2026-11-29T04:00"))) == "2026-12-06 04:00"


def test_a_time_daylight_saving_skips_runs_an_hour_later(berlin: None) -> None:
    # 2026-03-29: Berlin's clocks go from 02:00 straight to 03:00
    moment = Schedule("daily 02:30").next_after(at("2026-03-28T12:00"))
    assert local(moment) == "2026-03-29 03:30"
    assert moment - at("2026-03-28T02:30") == pytest.approx(86400)


def test_oncalendar_expressions_are_systemds_to_compute(commands: DeclaredCommands) -> None:
    commands.real(["systemd-analyze", "calendar"])
    now = time.time()
    moment = Schedule("Sat *-*-* 04:00").next_after(now)
    assert now < moment <= now + 7 * 86400
    assert datetime.datetime.fromtimestamp(moment).strftime("%a %H:%M") == "Sat 04:00"


def test_reboot_window_wraps_midnight(berlin: None) -> None:
    window = Window.parse("23:30-01:00")
    assert window.contains(at("2026-11-24T23:45")) and window.contains(at("2026-11-25T00:59"))
    assert not window.contains(at("2026-11-25T01:00"))
    assert local(window.next_opening(at("2026-11-25T12:00"))) == "2026-11-25 23:30"


# ---- the scheduler's decisions ----------------------------------------------------------------------


def test_first_start_plans_the_next_run_with_its_random_delay(tmp_path: Path, berlin: None) -> None:
    now = at("2026-11-24T12:00")
    sched = scheduler(SystemRoot.at(tmp_path), "updates: {schedule: daily 03:30, randomized_delay: 30m}", now)
    sched.start_up(now)
    assert sched.due(now) is None and not sched.catch_up
    next_run = sched.state.next_run
    assert next_run is not None and at("2026-11-25T03:30") <= next_run <= at("2026-11-25T04:00")
    saved = json.loads((tmp_path / "var/lib/vps-agent" / STATE_FILE).read_text())
    assert saved["next_run"] == next_run and saved["schedule"] == "daily 03:30"
    assert sched.due(next_run) == "schedule"
    assert sched.wake_at(now) == min(next_run, now + 3600)


def test_a_run_missed_while_the_agent_was_down_runs_soon_after_start_up(tmp_path: Path, berlin: None) -> None:
    root = SystemRoot.at(tmp_path)
    config = "updates: {schedule: daily 03:30, randomized_delay: 30m}"
    before = at("2026-11-24T12:00")
    first = scheduler(root, config, before)
    first.start_up(before)
    # the machine was off at 03:30; it boots at 09:00
    now = at("2026-11-25T09:00")
    again = scheduler(root, config, now)
    again.start_up(now)
    assert again.catch_up and again.state.next_run is not None
    assert now <= again.state.next_run <= now + CATCH_UP_MAX_DELAY
    assert again.due(again.state.next_run) == "catch-up"


def test_with_no_random_delay_a_missed_run_is_due_at_once(tmp_path: Path) -> None:
    root = SystemRoot.at(tmp_path)
    UpgradeState(next_run=1000.0, schedule="daily 03:30").save(root)
    sched = scheduler(root, "updates: {randomized_delay: 0}", 90000.0)
    sched.start_up(90000.0)
    assert sched.due(90000.0) == "catch-up"


def test_a_changed_schedule_is_replanned_not_caught_up(tmp_path: Path, berlin: None) -> None:
    root = SystemRoot.at(tmp_path)
    UpgradeState(next_run=at("2026-11-25T03:30"), schedule="daily 03:30").save(root)
    now = at("2026-11-25T09:00")
    sched = scheduler(root, "updates: {schedule: weekly sun 05:00, randomized_delay: 0}", now)
    sched.start_up(now)
    assert not sched.catch_up and sched.due(now) is None
    assert sched.state.next_run is not None and local(sched.state.next_run) == "2026-11-29 05:00"


def test_disabled_updates_never_run(tmp_path: Path) -> None:
    root = SystemRoot.at(tmp_path)
    UpgradeState(next_run=1000.0, schedule="daily 03:30").save(root)
    sched = scheduler(root, "updates: {enabled: false}", 90000.0)
    sched.start_up(90000.0)
    assert sched.due(90000.0) is None and sched.state.next_run is None
    assert sched.status()["enabled"] is False


def test_an_unreadable_state_file_is_reported_and_replaced(tmp_path: Path) -> None:
    state = tmp_path / "var/lib/vps-agent" / STATE_FILE
    state.parent.mkdir(parents=True)
    state.write_text("{half a file")
    events = null_events()
    sched = scheduler(SystemRoot.at(tmp_path), "updates: {randomized_delay: 0}", 5000.0, events)
    sched.start_up(5000.0)
    assert actions(events) == ["upgrade-state-reset"]
    assert "/var/lib/vps-agent/updates.json: unreadable" in str(events.sinks.recent(1)[0]["message"])
    assert json.loads(state.read_text())["next_run"] == sched.state.next_run  # a good file again


def test_a_fake_root_never_runs_apt(tmp_path: Path, commands: DeclaredCommands) -> None:
    events = null_events()
    sched = scheduler(SystemRoot.at(tmp_path), "updates: {randomized_delay: 0}", 5000.0, events)
    result = sched.run("vps-agentctl upgrade --now")
    assert result is not None and result.outcome == "skipped" and commands.calls == []
    assert actions(events) == ["upgrade-finished"]


# ---- a run on the host ------------------------------------------------------------------------------

BEFORE = "base-files\t12.4\tii \nopenssh-server\t1:9.2p1-2\tii \nheld-one\t1.0\thi \nold-tool\t0.9\tii \n"
AFTER = "base-files\t12.5\tii \nopenssh-server\t1:9.2p1-2+deb12u3\tii \nheld-one\t1.0\thi \nnew-dep\t2.0\tii \n"


def host_run(tmp_path: Path, commands: DeclaredCommands) -> Events:
    answers = iter([BEFORE, AFTER])
    commands.expect_with(["dpkg-query"], lambda argv: (0, next(answers), ""))
    commands.expect(["apt-mark", "showhold"], stdout="held-one\n")
    commands.expect(["needrestart"], returncode=127)
    return null_events()


def test_a_run_updates_upgrades_and_reports_each_package(tmp_path: Path, commands: DeclaredCommands) -> None:
    events = host_run(tmp_path, commands)
    commands.expect(["apt-get"], stdout="Setting up base-files (12.5) ...\n")
    root = HostRoot(tmp_path)
    sched = scheduler(root, "updates: {randomized_delay: 0, lock_timeout: 2m}", 5000.0, events)
    result = sched.run("vps-agentctl upgrade --now")
    assert result is not None and result.outcome == "success", result
    apt_calls = [c for c in commands.calls if c[0] == "apt-get"]
    assert [c[-1] for c in apt_calls] == ["update", "upgrade"]
    for call in apt_calls:
        assert "Dpkg::Options::=--force-confold" in call and "DPkg::Lock::Timeout=120" in call
    assert "-y" in apt_calls[1]
    assert list(result.changes) == [
        "base-files 12.4 -> 12.5",
        "new-dep (new) -> 2.0",
        "old-tool 0.9 -> (removed)",
        "openssh-server 1:9.2p1-2 -> 1:9.2p1-2+deb12u3",
    ]
    started, finished = events.sinks.recent(2)
    assert started["event"]["action"] == "upgrade-started" and started["held"] == ["held-one"]
    assert finished["event"]["action"] == "upgrade-finished" and finished["event"]["outcome"] == "success"
    assert finished["packages"] == list(result.changes) and finished["reboot_required"] is False
    saved = json.loads((tmp_path / "var/lib/vps-agent" / STATE_FILE).read_text())
    assert saved["last_outcome"] == "success" and saved["running"] is None and saved["next_run"] > 5000.0


def test_a_dpkg_lock_that_stays_taken_fails_the_run_clearly(tmp_path: Path, commands: DeclaredCommands) -> None:
    events = host_run(tmp_path, commands)
    commands.expect(["apt-get"])
    lock_error = "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 4242 (apt-get)"
    commands.expect_with(["apt-get"], lambda argv: (100, "", lock_error) if argv[-1] == "upgrade" else (0, "", ""))
    sched = scheduler(HostRoot(tmp_path), "updates: {randomized_delay: 0, lock_timeout: 3s}", 5000.0, events)
    result = sched.run("schedule")
    assert result is not None and result.outcome == "failure"
    assert result.detail == "the dpkg lock stayed taken for over 3s: nothing was upgraded"
    finished = events.sinks.recent(1)[0]
    assert finished["event"]["outcome"] == "failure" and "dpkg lock" in str(finished["message"])


def test_an_interrupted_dpkg_is_finished_before_the_update(tmp_path: Path, commands: DeclaredCommands) -> None:
    events = host_run(tmp_path, commands)
    commands.expect(["dpkg", "--force-confdef"])
    commands.expect(["apt-get"])
    (tmp_path / "var/lib/dpkg/updates").mkdir(parents=True)
    (tmp_path / "var/lib/dpkg/updates/0001").write_text("")
    sched = scheduler(HostRoot(tmp_path), "updates: {randomized_delay: 0}", 5000.0, events)
    sched.run("schedule")
    steps = [c[0] if c[0] != "apt-get" else c[-1] for c in commands.calls if c[0] in ("dpkg", "apt-get")]
    assert steps == ["dpkg", "update", "upgrade"]


def test_a_required_reboot_is_reported_and_done_only_in_the_window_without_users(
    tmp_path: Path, commands: DeclaredCommands, berlin: None
) -> None:
    events = host_run(tmp_path, commands)
    commands.expect(["apt-get"])
    commands.expect(["systemctl", "reboot"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run/reboot-required").write_text("*** System restart required ***\n")
    (tmp_path / "run/reboot-required.pkgs").write_text("linux-image-6.1.0-30-amd64\n")
    night = at("2026-11-25T03:10")
    config = parse_config("updates: {randomized_delay: 0, reboot_window: '03:00-05:00'}")
    users = [1]
    sched = UpgradeScheduler(HostRoot(tmp_path), lambda: config, events, clock=lambda: night, users=lambda: users[0])
    sched.run("schedule")
    assert "reboot-required" in actions(events)
    assert sched.status()["reboot_required"] and sched.status()["reboot_packages"] == ["linux-image-6.1.0-30-amd64"]
    assert sched.reboot_due(at("2026-11-25T12:00")) is None  # outside the window
    assert sched.reboot_due(night) is None  # someone is logged in
    assert actions(events)[-1] == "reboot-deferred"
    users[0] = 0
    assert sched.reboot_due(night + 60) is None  # looked again too soon
    why = sched.reboot_due(night + 301)
    assert why is not None and "linux-image-6.1.0-30-amd64" in why
    sched.reboot(why)
    assert ["systemctl", "reboot"] in commands.calls


def test_without_a_window_a_required_reboot_is_only_reported(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run/reboot-required").write_text("")
    sched = scheduler(HostRoot(tmp_path), "updates: {randomized_delay: 0}", at("2026-11-25T03:10"))
    assert sched.reboot_due(at("2026-11-25T03:10")) is None
    assert sched.status()["reboot_required"] is True


def test_a_run_cut_short_by_the_agents_restart_is_reported_after_it(tmp_path: Path, commands: DeclaredCommands) -> None:
    commands.expect(["dpkg-query"], stdout=AFTER)
    commands.expect(["needrestart"], returncode=127)
    root = HostRoot(tmp_path)
    before = {"base-files": "12.4", "held-one": "1.0", "openssh-server": "1:9.2p1-2+deb12u3", "new-dep": "2.0"}
    UpgradeState(running={"id": "abc", "started": 4000.0, "trigger": "schedule", "before": before}).save(root)
    events = null_events()
    sched = scheduler(root, "updates: {randomized_delay: 0}", 5000.0, events)
    sched.recover()
    finished = events.sinks.recent(1)[0]
    assert finished["event"]["action"] == "upgrade-finished" and finished["result"] == "interrupted"
    assert finished["packages"] == ["base-files 12.4 -> 12.5"]
    assert "restarted during the run" in str(finished["message"])
    assert sched.state.running is None


def test_changes_between_lists_each_difference_once() -> None:
    assert changes_between({"a": "1", "b": "1"}, {"a": "2", "b": "1"}) == ["a 1 -> 2"]


# ---- security-only ----------------------------------------------------------------------------------


def test_security_only_keeps_the_security_suites_of_both_source_formats() -> None:
    one_line = (
        "deb http://deb.debian.org/debian bookworm main\n"
        "deb http://security.debian.org/debian-security bookworm-security main contrib # comment\n"
        "# deb http://security.debian.org/debian-security bookworm-security non-free\n"
        "deb [arch=amd64] http://old.example/debian buster/updates main\n"
    )
    deb822 = (
        "Types: deb deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Enabled: no\nTypes: deb\nURIs: http://x.example\nSuites: y-security\nComponents: main\n"
    )
    lines = apt.security_lines([("sources.list", one_line), ("debian.sources", deb822)])
    assert lines == [
        "deb http://security.debian.org/debian-security bookworm-security main contrib",
        "deb [arch=amd64] http://old.example/debian buster/updates main",
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security "
        "bookworm-security main",
    ]


def test_security_only_points_apt_at_the_filtered_list(tmp_path: Path, commands: DeclaredCommands) -> None:
    events = host_run(tmp_path, commands)
    commands.expect(["apt-get"])
    (tmp_path / "etc/apt").mkdir(parents=True)
    (tmp_path / "etc/apt/sources.list").write_text(
        "deb http://deb.debian.org/debian bookworm main\n"
        "deb http://deb.debian.org/debian-security bookworm-security main\n"
    )
    sched = scheduler(HostRoot(tmp_path), "updates: {mode: security-only, randomized_delay: 0}", 5000.0, events)
    sched.run("schedule")
    upgrade = [c for c in commands.calls if c[0] == "apt-get"][-1]
    assert "Dir::Etc::SourceList=/var/lib/vps-agent/apt-security/sources.list" in upgrade
    update = [c for c in commands.calls if c[0] == "apt-get"][0]
    assert update[-1] == "update" and "APT::Get::List-Cleanup=false" in update  # other suites' lists stay
    written = (tmp_path / "var/lib/vps-agent/apt-security/sources.list").read_text()
    assert "bookworm-security" in written and "bookworm main" not in written


def test_modes_map_to_apt_verbs() -> None:
    for mode, verb in (("upgrade", "upgrade"), ("dist-upgrade", "dist-upgrade"), ("security-only", "upgrade")):
        steps = apt.upgrade_steps(mode, repair=False, lock_timeout=60, total_timeout=600)
        assert steps[-1].argv[-1] == verb and steps[0].argv[-1] == "update"


def test_a_run_past_its_time_limit_is_a_timeout(tmp_path: Path, commands: DeclaredCommands) -> None:
    events = host_run(tmp_path, commands)
    commands.expect_with(
        ["apt-get"], lambda argv: (124, "", "apt-get: timed out") if argv[-1] == "upgrade" else (0, "", "")
    )
    sched = scheduler(HostRoot(tmp_path), "updates: {randomized_delay: 0, time_limit: 5m}", 5000.0, events)
    result = sched.run("schedule")
    assert result is not None and result.outcome == "timeout"
    assert result.detail == "apt-get upgrade ran out of the time limit (5m)"
    assert sched.status()["last_outcome"] == "timeout"


def test_services_still_running_old_code_are_named_by_needrestart(tmp_path: Path, commands: DeclaredCommands) -> None:
    events = host_run(tmp_path, commands)
    commands.expect(["apt-get"])
    commands.expect(
        ["needrestart", "-b"],
        stdout="NEEDRESTART-VER: 3.6\nNEEDRESTART-KCUR: 6.1.0-30-amd64\nNEEDRESTART-SVC: ssh.service\n"
        "NEEDRESTART-SVC: cron.service\n",
    )
    sched = scheduler(HostRoot(tmp_path), "updates: {randomized_delay: 0}", 5000.0, events)
    sched.run("schedule")
    assert events.sinks.recent(1)[0]["services_need_restart"] == ["cron.service", "ssh.service"]

"""The apt door with declared fake commands: never a real apt-get on the machine running the tests."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from agent.paths import SystemRoot
from agent.system import apt
from agent.system import run as run_door
from tests.unit.conftest import DeclaredCommands

SETUP = (
    "Unpacking fail2ban (1.0.2-2) ...\nSetting up python3-pyinotify (0.9.6-2) ...\nSetting up fail2ban (1.0.2-2) ...\n"
)
APT = [
    "apt-get",
    "-o",
    "Dpkg::Options::=--force-confdef",
    "-o",
    "Dpkg::Options::=--force-confold",
    "-o",
    "DPkg::Lock::Timeout=120",
    "install",
    "-y",
    "--no-install-recommends",
    "fail2ban",
]


class HostRoot(SystemRoot):
    """The host as the door sees it, but /var/lib/dpkg read from a temporary directory."""

    @property
    def is_host(self) -> bool:
        return True


def _host(tmp_path: Path, *pending: str) -> SystemRoot:
    updates = tmp_path / "var/lib/dpkg/updates"
    updates.mkdir(parents=True)
    for name in pending:
        (updates / name).write_text("")
    return HostRoot(tmp_path)


def test_install_is_non_interactive_keeps_conffiles_and_waits_for_the_lock(
    tmp_path: Path, commands: DeclaredCommands
) -> None:
    commands.expect(["apt-get"], stdout=SETUP)
    result = apt.install(_host(tmp_path), ["fail2ban"])
    assert commands.calls == [APT]
    assert result.ok and result.installed == (("python3-pyinotify", "0.9.6-2"), ("fail2ban", "1.0.2-2"))
    assert "fail2ban 1.0.2-2" in result.detail


def test_the_environment_is_noninteractive(
    tmp_path: Path, commands: DeclaredCommands, monkeypatch: pytest.MonkeyPatch
) -> None:
    envs: list[dict[str, str]] = []

    def spawn(argv: list[str], *, env: Mapping[str, str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        envs.append(dict(env))
        return commands.spawn(argv, **kwargs)

    monkeypatch.setattr(run_door, "_spawn", spawn)
    commands.expect(["apt-get"])
    apt.install(_host(tmp_path), ["fail2ban"])
    assert envs[0]["DEBIAN_FRONTEND"] == "noninteractive" and envs[0]["LC_ALL"] == "C"


def test_an_interrupted_dpkg_is_finished_first(tmp_path: Path, commands: DeclaredCommands) -> None:
    commands.expect(["dpkg"], stdout="Setting up libfoo1:amd64 (2.0-1) ...\n")
    commands.expect(["apt-get"], stdout=SETUP)
    result = apt.install(_host(tmp_path, "0001"), ["fail2ban"])
    assert commands.calls == [["dpkg", "--force-confdef", "--force-confold", "--configure", "-a"], APT]
    assert result.ok and ("libfoo1", "2.0-1") in result.installed


def test_a_failed_repair_stops_before_apt(tmp_path: Path, commands: DeclaredCommands) -> None:
    commands.expect(["dpkg"], returncode=1, stderr="dpkg: error processing package foo")
    result = apt.install(_host(tmp_path, "0001"), ["fail2ban"])
    assert [c[0] for c in commands.calls] == ["dpkg"]
    assert not result.ok and "error processing" in result.detail


def test_a_failed_install_says_why(tmp_path: Path, commands: DeclaredCommands) -> None:
    commands.expect(["apt-get"], returncode=100, stderr="E: Unable to locate package fail2ban")
    result = apt.install(_host(tmp_path), ["fail2ban"])
    assert not result.ok and result.installed == () and "Unable to locate" in result.detail


def test_the_steps_share_one_time_bound(tmp_path: Path) -> None:
    steps = apt.install_steps(["fail2ban"], repair=True, lock_timeout=60, total_timeout=300)
    assert sum(step.timeout for step in steps) == 300
    assert "DPkg::Lock::Timeout=60" in steps[-1].argv
    assert dict(steps[-1].env)["DEBIAN_FRONTEND"] == "noninteractive"


def test_a_fake_root_never_installs(tmp_path: Path, commands: DeclaredCommands) -> None:
    result = apt.install(SystemRoot.at(tmp_path), ["fail2ban"])
    assert not result.ok and commands.calls == []

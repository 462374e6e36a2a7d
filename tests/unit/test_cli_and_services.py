"""Console exit codes and tables; the service door's pidfile handling in a fake root."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from agent.cli import EXIT_DRIFT, EXIT_ERROR, EXIT_OK, exit_code_for, main, render_table
from agent.paths import SystemRoot
from agent.system.services import Service, ServiceManager


def row(status: str, **extra: object) -> dict[str, object]:
    return {"control": "ssh", "status": status, "since": None, **extra}


def test_exit_codes_follow_the_documented_contract() -> None:
    assert exit_code_for([row("compliant"), row("healed")]) == EXIT_OK
    assert exit_code_for([row("compliant"), row("drifted")]) == EXIT_DRIFT
    assert exit_code_for([row("flapping")]) == EXIT_DRIFT
    assert exit_code_for([row("paused", drift=[])]) == EXIT_OK
    assert exit_code_for([row("paused", drift=["x"])]) == EXIT_DRIFT
    assert exit_code_for([row("drifted"), row("blocked")]) == EXIT_ERROR
    assert exit_code_for([row("error")]) == EXIT_ERROR


def test_status_table_shows_why_and_the_drift() -> None:
    table = render_table([row("blocked", why="no admin could log in", drift=["effective: permitrootlogin"])])
    lines = table.splitlines()
    assert lines[0].split() == ["CONTROL", "STATUS", "SINCE", "DETAIL"]
    assert "blocked" in lines[1] and "no admin could log in" in lines[1]
    assert lines[2] == "  ssh: effective: permitrootlogin"


def test_status_with_no_daemon_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--root", str(tmp_path), "status"]) == 3
    assert "unreachable" in capsys.readouterr().err


def test_validate_config_names_file_line_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("ssh:\n  permit_root_login: maybe\n")
    assert main(["validate-config", str(bad)]) == EXIT_ERROR
    assert f"{bad}:2:22: ssh.permit_root_login" in capsys.readouterr().err


def test_reload_in_a_fake_root_signals_only_a_pid_named_by_its_pidfile(tmp_path: Path) -> None:
    root = SystemRoot.at(tmp_path)
    (tmp_path / "run").mkdir()
    # SIGHUP back to its default: under nohup (or a CI runner that ignores it) sleep would survive it
    sleeper = subprocess.Popen(["sleep", "60"], preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    comm = Path(f"/proc/{sleeper.pid}/comm")
    deadline = time.monotonic() + 5
    while comm.read_text().strip() != "sleep" and time.monotonic() < deadline:
        time.sleep(0.01)  # Popen can return before the child has finished exec
    try:
        service = Service("demo.service", "/run/demo.pid", "sleep", ("/bin/false",))
        manager = ServiceManager(root)
        assert manager.is_running(service) is False
        assert manager.reload(service).action == "none"  # never starts anything in a fake root
        (tmp_path / "run/demo.pid").write_text(f"{sleeper.pid}\n")
        wrong_name = Service("demo.service", "/run/demo.pid", "sshd", ("/bin/false",))
        assert manager.is_running(wrong_name) is False  # a recycled pid of another program is not signalled
        result = manager.reload(service)
        assert result.ok and f"pid {sleeper.pid}" in result.detail
        assert sleeper.wait(5) == -signal.SIGHUP
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_pidfile_rewritten_as_the_service_reloads_still_counts_as_running(tmp_path: Path) -> None:
    # sshd truncates its pidfile and writes it again as it re-executes on SIGHUP: a look in between sees it empty
    root = SystemRoot.at(tmp_path)
    (tmp_path / "run").mkdir()
    pidfile = tmp_path / "run/demo.pid"
    pidfile.write_text("")
    service = Service("demo.service", "/run/demo.pid", "python3", ("/bin/false",))
    writer = threading.Timer(0.2, lambda: pidfile.write_text(f"{os.getpid()}\n"))
    writer.start()
    try:
        assert ServiceManager(root).is_running(service) is True
    finally:
        writer.join()
    pidfile.write_text("")
    started = time.monotonic()
    assert ServiceManager(root).is_running(service, settle=0.1) is False  # stopped is still said, soon
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("verb", ["check", "diff"])
def test_an_unknown_control_is_refused_listing_the_controls(
    verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--root", str(tmp_path), verb, "bogus"]) == EXIT_ERROR
    assert capsys.readouterr().err == (
        "vps-agentctl: no control named 'bogus'; controls: ssh, firewall, fail2ban, accounts, sysctl, strict\n"
    )


def test_every_error_of_a_config_file_is_printed_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("ssh:\n  prot: 22\nfirewall:\n  mode: off\n")
    assert main(["validate-config", str(bad)]) == EXIT_ERROR
    assert [line.split(": ", 2)[:2] for line in capsys.readouterr().err.splitlines()] == [
        [f"{bad}:2:3", "ssh.prot"],
        [f"{bad}:4:9", "firewall.mode"],
    ]

"""The daemon as an admin and systemd meet it: pause/resume, reload, sd_notify, logrotate, flapping, sshd reload."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from agent.engine.runner import FLAP_SETTLE
from tests.fakeroot import make_root
from tests.integration.harness import StartAgent, effective_sshd, listening_in_netns_of, sshd_in_namespaces, wait_for

DROPIN = "etc/ssh/sshd_config.d/00-vps-agent.conf"


def test_pause_lets_the_admin_edit_and_resume_heals_at_once(fake_root: Path, start_agent: StartAgent) -> None:
    agent = start_agent(fake_root)
    paused = agent.ctl("pause", "--for", "30m", "ssh")
    assert paused.returncode == 0 and "paused ssh until" in paused.stdout
    mark = agent.mark()
    evil = fake_root / "etc/ssh/sshd_config.d/00-by-hand.conf"
    evil.write_text("PasswordAuthentication yes\n")
    wait_for(lambda: agent.status()["ssh"]["drift"], what="the paused guard to notice the drift")
    status = agent.ctl("status")
    assert status.returncode == 1 and "paused" in status.stdout
    assert evil.read_text() == "PasswordAuthentication yes\n"
    reported = agent.wait_event("drift-detected", mark)
    assert reported["paused"] is True and reported["file"]["path"].endswith("00-by-hand.conf")
    assert not [e for e in agent.events()[mark:] if e["event"]["action"] == "drift-reverted" and e["control"] == "ssh"]
    # nobody holds sshd to passwords off while the guard is paused: fail2ban's jail goes by what sshd takes now
    jail = fake_root / "etc/fail2ban/jail.d/zz-vps-agent.local"
    wait_for(lambda: "mode = aggressive" not in jail.read_text(), what="the jail's mode to follow the paused sshd")
    resumed = agent.mark()
    assert agent.ctl("resume", "ssh").returncode == 0
    agent.wait_event("drift-reverted", resumed)
    assert effective_sshd(fake_root)["passwordauthentication"] == ["no"]
    # (the event since `resumed` may still be the paused-mode heal's: its file was written, its event not yet)
    agent.wait_event("drift-reverted", resumed, control="fail2ban")
    wait_for(lambda: "mode = aggressive" in jail.read_text(), what="the jail's mode to follow the resumed guard")
    assert agent.ctl("status").returncode == 0


def test_pause_with_a_bad_duration_is_refused(fake_root: Path, start_agent: StartAgent) -> None:
    agent = start_agent(fake_root)
    result = agent.ctl("pause", "--for", "soon")
    assert result.returncode == 2 and "expected a duration like 30m" in result.stderr


def test_sighup_rereads_the_config_and_converges_to_it(fake_root: Path, start_agent: StartAgent) -> None:
    agent = start_agent(fake_root)
    config = fake_root / "etc/vps-agent/config.yaml"
    config.write_text(config.read_text().replace("port: 2222", "port: 2200"))
    mark = agent.mark()
    agent.signal(signal.SIGHUP)
    agent.wait_event("config-reloaded", mark, control=None)
    agent.wait_event("drift-reverted", mark)
    assert effective_sshd(fake_root)["port"] == ["2200"]


def test_sighup_reopens_the_events_file_for_logrotate(fake_root: Path, start_agent: StartAgent) -> None:
    agent = start_agent(fake_root)
    rotated = agent.events_file.with_name("events.jsonl.1")
    agent.events_file.rename(rotated)
    agent.signal(signal.SIGHUP)
    wait_for(agent.events_file.exists, what="a new events file")
    (fake_root / DROPIN).unlink()
    agent.wait_event("drift-reverted")
    assert "agent-started" in rotated.read_text()


def test_converge_from_the_console_waits_and_reports(fake_root: Path, start_agent: StartAgent) -> None:
    agent = start_agent(fake_root)
    result = agent.ctl("converge", "ssh")
    assert result.returncode == 0 and "ssh" in result.stdout


def test_status_without_a_daemon_exits_3_and_check_still_works(fake_root: Path) -> None:
    from tests.integration.harness import Agent

    probe = Agent.__new__(Agent)
    probe.root = fake_root
    status = probe.ctl("status")
    assert status.returncode == 3 and "unreachable" in status.stderr
    # the whole check is blocked (2): the firewall guard will not touch the host's firewall for a fake root
    assert probe.ctl("check").returncode == 2
    check = probe.ctl("check", "--json", "ssh")
    assert check.returncode == 1
    report = json.loads(check.stdout)["controls"][0]
    assert report["status"] == "drifted" and "write /etc/ssh/sshd_config.d/00-vps-agent.conf" in report["plan"]
    assert not (fake_root / DROPIN).exists()  # check changes nothing
    diff = probe.ctl("diff", "ssh")
    assert diff.returncode == 1 and "+PermitRootLogin no" in diff.stdout


def test_flapping_backs_off_and_says_so(tmp_path: Path, start_agent: StartAgent) -> None:
    config = "ssh: {port: 2222}\nengine: {flap_max_heals: 2, flap_window: 1m, flap_backoff: 10m}\n"
    root = make_root(tmp_path / "root", config=config)
    agent = start_agent(root)
    mark = agent.mark()

    def heals() -> int:
        return sum(e["event"]["action"] == "drift-reverted" for e in agent.events())

    for _ in range(2):  # the start-up heal, then two more within the window: 3 > flap_max_heals
        before = heals()
        (root / DROPIN).unlink()
        wait_for(lambda b=before: heals() > b, what="a heal")
    flapping = agent.wait_event("flapping", mark)
    assert flapping["backoff_seconds"] == 600
    status = agent.ctl("status")
    assert status.returncode == 1 and "flapping" in status.stdout and "backing off 10m" in status.stdout
    assert f"healed only after {FLAP_SETTLE:g}s without a change" in status.stdout
    before = heals()
    (root / DROPIN).unlink()
    time.sleep(FLAP_SETTLE / 2)
    assert not (root / DROPIN).exists()  # backing off: not healed while the changes may go on
    wait_for(lambda: heals() > before, what="a heal in the back-off, once quiet for FLAP_SETTLE")
    assert (root / DROPIN).exists()
    (root / DROPIN).unlink()
    assert agent.ctl("converge", "ssh").returncode in (0, 1)  # an admin's converge overrides the back-off
    assert (root / DROPIN).exists()


def test_sd_notify_ready_status_watchdog_reloading_stopping(
    fake_root: Path, start_agent: StartAgent, tmp_path: Path
) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    notify.bind(str(path))
    notify.settimeout(10)
    agent = start_agent(fake_root, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})

    def receive_until(field: str) -> list[str]:
        seen: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            message = notify.recv(4096).decode()
            seen.append(message)
            if field in message.splitlines():
                return seen
        raise AssertionError(f"no {field}; got {seen}")

    ready = receive_until("READY=1")
    assert any(line.startswith("STATUS=") for m in ready for line in m.splitlines())
    receive_until("WATCHDOG=1")
    agent.signal(signal.SIGHUP)
    reloading = receive_until("RELOADING=1")
    assert any(line.startswith("MONOTONIC_USEC=") for line in reloading[-1].splitlines())
    receive_until("READY=1")
    agent.signal(signal.SIGTERM)
    receive_until("STOPPING=1")
    notify.close()


def test_a_running_sshd_is_reloaded_and_listens_on_the_new_port(fake_root: Path, start_agent: StartAgent) -> None:
    """A real sshd in its own network namespace, its pidfile inside the fake root: the agent SIGHUPs it."""
    with sshd_in_namespaces(fake_root) as sshd:
        pid = sshd.pid
        assert wait_for(lambda: listening_in_netns_of(pid) == {22}, what="sshd on port 22")
        agent = start_agent(fake_root)
        reverted = agent.wait_event("drift-reverted")
        assert f"sent SIGHUP to sshd (pid {pid})" in reverted["reload"]
        wait_for(lambda: listening_in_netns_of(pid) == {2222}, what="sshd re-executed on port 2222")
        assert sshd.poll() is None  # never stopped, only reloaded


def test_an_unreadable_port_move_state_is_reported_as_reset_not_as_a_rejected_config(
    fake_root: Path, start_agent: StartAgent
) -> None:
    (fake_root / "var/lib/vps-agent/port-move.json").write_text('{"phase": "open", "old": [22')
    agent = start_agent(fake_root)
    reset = agent.wait_event("port-move-state-reset")
    assert reset["event"]["outcome"] == "failure" and reset["log"]["level"] == "warning", reset
    assert reset["file"]["path"] == "/var/lib/vps-agent/port-move.json"
    assert "/var/lib/vps-agent/port-move.json: unreadable" in reset["message"], reset
    assert "config-rejected" not in [e["event"]["action"] for e in agent.events()]
    status = json.loads(agent.ctl("status", "--json").stdout)
    assert status["port_move"] is None and status["config"]["error"] is None


SYS_TGKILL = {"x86_64": 234, "aarch64": 131}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_the_kernel_hands_to_a_worker_thread_is_acted_on_at_once(
    fake_root: Path, start_agent: StartAgent, signum: int
) -> None:
    """The kernel may hand a process's signal to any of its threads, while Python runs handlers only in
    the main thread, asleep in select() for up to a minute unless the signal wakes it: tgkill() to a
    worker thread makes that case certain."""
    number = SYS_TGKILL.get(platform.machine())
    if number is None:
        pytest.skip(f"tgkill's syscall number on {platform.machine()} is not in SYS_TGKILL")
    agent = start_agent(fake_root)
    pid = agent.process.pid
    worker = next(int(task) for task in os.listdir(f"/proc/{pid}/task") if int(task) != pid)
    mark = agent.mark()
    assert ctypes.CDLL(None, use_errno=True).syscall(number, pid, worker, signum) == 0
    if signum == signal.SIGHUP:
        agent.wait_event("config-reloaded", mark, timeout=2.0, control=None)
    else:
        assert agent.process.wait(2.0) == 0


@pytest.mark.parametrize("verb", ["pause", "resume", "converge", "reload"])
def test_mutating_verbs_need_root(fake_root: Path, start_agent: StartAgent, verb: str) -> None:
    start_agent(fake_root)
    socket_path = fake_root / "run/vps-agent/agent.sock"
    os.chmod(socket_path, 0o666)  # let the unprivileged caller reach the socket; SO_PEERCRED must still refuse
    for parent in [socket_path.parent, *socket_path.parents]:
        if parent == Path("/"):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o005)
    code = (
        "import os,sys; os.setgid(65534); os.setuid(65534); sys.path.insert(0, sys.argv[1]);"
        "from agent.cli import main; sys.exit(main(['--root', sys.argv[2], sys.argv[3]]))"
    )
    from tests.integration.harness import REPO

    result = subprocess.run(
        ["/usr/bin/python3", "-c", code, str(REPO), str(fake_root), verb], capture_output=True, text=True, cwd="/"
    )
    assert result.returncode == 2 and "needs root" in result.stderr
    readonly = subprocess.run(
        ["/usr/bin/python3", "-c", code, str(REPO), str(fake_root), "status"], capture_output=True, text=True, cwd="/"
    )
    assert readonly.returncode == 0, readonly.stderr

"""What sshd listens on, on faked readings: the edge cases of the fallback for a reader without
CAP_SYS_PTRACE (tests/integration/test_sshd_ports.py reads a real sshd that way)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.config import Config, SshConfig
from agent.controls.base import SshPorts
from agent.controls.ssh.portmove import PortMoves
from agent.controls.ssh.ports import SSHD_EXECUTABLES, SshdPorts, ports_now
from agent.controls.ssh.sshd_config import SSHD, configured_ports
from agent.paths import SystemRoot
from agent.system import netfilter
from agent.system.netfilter import Listening
from tests.unit.conftest import DeclaredCommands

NOTHING = frozenset[int]()


class Readings:
    """A fake /proc and `sshd -T`, counting how often each is asked."""

    def __init__(self, listening: Listening, configured: frozenset[int] | None) -> None:
        self.listening, self.configured = listening, configured
        self.reads = self.sshd_t = 0

    def read(self) -> Listening:
        self.reads += 1
        return self.listening

    def ask_sshd(self) -> frozenset[int] | None:
        self.sshd_t += 1
        return self.configured

    def ports(self, tmp_path: Path) -> SshdPorts:
        return SshdPorts(SystemRoot.at(tmp_path), self.ask_sshd, self.read)


def hidden(*root_ports: int) -> Listening:
    return Listening(NOTHING, True, frozenset(root_ports))


def test_sshds_own_sockets_answer_when_they_can_be_read(tmp_path: Path) -> None:
    readings = Readings(Listening(frozenset({2222}), False, NOTHING), frozenset({22}))
    assert readings.ports(tmp_path)() == {2222}
    assert readings.sshd_t == 0  # sshd -T only when sshd hides its sockets


def test_hidden_sockets_count_where_sshd_t_and_a_root_listener_agree(tmp_path: Path) -> None:
    # 443: root's web server, not sshd's; 2200: in the files, but sshd does not listen there (not reloaded)
    readings = Readings(hidden(22, 443), frozenset({22, 2200}))
    assert readings.ports(tmp_path)() == {22}


def test_readable_and_hidden_sshds_add_up(tmp_path: Path) -> None:
    readings = Readings(Listening(frozenset({2201}), True, frozenset({22, 2201})), frozenset({22}))
    assert readings.ports(tmp_path)() == {22, 2201}


def test_sshd_t_is_asked_again_only_when_roots_listening_ports_change(tmp_path: Path) -> None:
    readings = Readings(hidden(22), frozenset({22}))
    ports = readings.ports(tmp_path)
    for _ in range(3):
        assert ports() == {22}
    assert (readings.reads, readings.sshd_t) == (3, 1)
    # a reload moved sshd: its old port is gone at once, the new one is asked about
    readings.listening, readings.configured = hidden(2222), frozenset({2222})
    assert ports() == {2222} and readings.sshd_t == 2


def test_a_failing_sshd_t_keeps_the_last_answer_and_is_asked_again(tmp_path: Path) -> None:
    readings = Readings(hidden(22), frozenset({22}))
    ports = readings.ports(tmp_path)
    assert ports() == {22}
    readings.listening, readings.configured = hidden(22, 2222), None  # sshd -T rejects a broken file
    assert ports() == {22} and ports() == {22}
    assert readings.sshd_t == 3
    readings.configured = frozenset({22, 2222})
    assert ports() == {22, 2222} and readings.sshd_t == 4


def test_each_converge_reads_what_sshd_listens_on_now_once(tmp_path: Path) -> None:
    """The engine asks once per converge (ports_now) and hands the one answer to the guard's steps."""
    readings = Readings(hidden(22), frozenset({22}))
    listening = readings.ports(tmp_path)
    moves = PortMoves(SystemRoot.at(tmp_path))
    config = Config(ssh=SshConfig(port=2222))
    assert ports_now(listening, moves, config) == SshPorts(frozenset({22}), (22, 2222)) and readings.reads == 1
    readings.listening = hidden()  # sshd stopped: the next converge sees it at once, no cache in between
    assert ports_now(listening, moves, config) == SshPorts(NOTHING, (2222,)) and readings.reads == 2
    off = Config(ssh=SshConfig(enabled=False, port=2222))  # the SSH guard off: only what sshd listens on
    assert ports_now(listening, moves, off) == SshPorts(NOTHING, ()) and readings.reads == 3


def test_sshd_t_ports_are_its_listen_addresses(tmp_path: Path, commands: DeclaredCommands) -> None:
    printed = "port 22\nlistenaddress 127.0.0.1:2201\nlistenaddress [::1]:2202 rdomain vrf1\npermitrootlogin no\n"
    commands.expect([SSHD, "-T"], stdout=printed)
    assert configured_ports(SystemRoot.at(tmp_path)) == {2201, 2202}  # Port is unused when each has its own


def test_sshd_t_ports_without_listen_addresses_are_its_ports(tmp_path: Path, commands: DeclaredCommands) -> None:
    commands.expect([SSHD, "-T"], stdout="port 22\nport 2222\n")
    assert configured_ports(SystemRoot.at(tmp_path)) == {22, 2222}
    commands.expect([SSHD, "-T"], returncode=255, stderr="/etc/ssh/sshd_config line 3: Bad configuration option")
    assert configured_ports(SystemRoot.at(tmp_path)) is None


def fake_process(proc: Path, pid: int, *, comm: str, uid: int, exe: str | None, sockets: tuple[int, ...]) -> None:
    """/proc/PID as the kernel shows it: comm, status's Uid line, exe (None: hidden), fd/ of sockets."""
    directory = proc / str(pid)
    (directory / "fd").mkdir(parents=True)
    (directory / "comm").write_text(f"{comm}\n")
    (directory / "status").write_text(f"Name:\t{comm}\nUmask:\t0022\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    if exe is not None:
        os.symlink(exe, directory / "exe")
    for n, inode in enumerate(sockets):
        os.symlink(f"socket:[{inode}]", directory / "fd" / str(n + 3))


def test_only_roots_sshd_counts_not_any_process_that_calls_itself_sshd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = tmp_path / "proc"
    fake_process(proc, 100, comm="sshd", uid=0, exe="/usr/sbin/sshd", sockets=(11,))
    # prctl(PR_SET_NAME, "sshd") as nobody, listening on 4444; and as root, but python
    fake_process(proc, 200, comm="sshd", uid=65534, exe="/usr/bin/python3.11", sockets=(22,))
    fake_process(proc, 300, comm="sshd", uid=0, exe="/usr/bin/python3.11", sockets=(33,))
    fake_process(proc, 400, comm="sshd", uid=0, exe="/usr/sbin/sshd (deleted)", sockets=(44,))  # upgraded
    table = {11: (22, 0), 22: (4444, 65534), 33: (4445, 0), 44: (2222, 0)}
    monkeypatch.setattr(netfilter, "tcp_listeners", lambda: table)
    found = netfilter.tcp_listening("sshd", SSHD_EXECUTABLES, proc)
    assert found == Listening(frozenset({22, 2222}), False, NOTHING)

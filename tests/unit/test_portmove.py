"""The two-phase SSH port move's decisions: when a move starts, what each guard keeps open, what proves
the new port, and the rollback. The real sshd/firewall/fail2ban side runs in tests/e2e."""

from __future__ import annotations

import json
from pathlib import Path

from agent.config import parse_config
from agent.controls.ssh.portmove import CANCELLED, OPEN, ROLLED_BACK, STARTED, PortMoves, confirming_login
from agent.controls.ssh.ports import ssh_ports
from agent.paths import SystemRoot
from agent.system import journal
from tests.unit.test_journal import sshd_entry

MOVE_TO_2222 = parse_config("ssh: {port: 2222, confirm_timeout: 10m}")
STAY_ON_22 = parse_config("ssh: {port: 22}")


def moves(tmp_path: Path) -> PortMoves:
    return PortMoves(SystemRoot.at(tmp_path))


def test_a_new_port_opens_beside_the_old_one_until_proven(tmp_path: Path) -> None:
    store = moves(tmp_path)
    change = store.on_config(MOVE_TO_2222, frozenset({22}), 1000.0)
    assert change is not None and change[0] == STARTED
    assert "22 -> 2222" in change[1] and "back to 22 in 10m" in change[1]
    assert store.ports(MOVE_TO_2222) == (22, 2222)
    assert ssh_ports(MOVE_TO_2222, frozenset(), store) == (22, 2222)  # the firewall and fail2ban
    assert store.verbose_logging(MOVE_TO_2222)
    saved = json.loads((tmp_path / "var/lib/vps-agent/port-move.json").read_text())
    assert (saved["phase"], saved["old"], saved["new"], saved["deadline"]) == (OPEN, [22], 2222, 1600.0)


def test_the_move_survives_a_restart(tmp_path: Path) -> None:
    moves(tmp_path).on_config(MOVE_TO_2222, frozenset({22}), 1000.0)
    again = moves(tmp_path)  # the daemon restarted (or the VPS rebooted) in the middle
    assert again.ports(MOVE_TO_2222) == (22, 2222)
    # sshd now listens on both: that is the move in flight, not a new one
    assert again.on_config(MOVE_TO_2222, frozenset({22, 2222}), 1100.0) is None
    current = again.current()
    assert current is not None and current.deadline == 1600.0


def test_confirmation_closes_the_old_port(tmp_path: Path) -> None:
    store = moves(tmp_path)
    store.on_config(MOVE_TO_2222, frozenset({22}), 1000.0)
    done = store.confirm("a login on port 2222: admin from 10.0.0.2 (publickey)")
    assert done is not None and done.new == 2222
    assert store.ports(MOVE_TO_2222) == (2222,) and not store.verbose_logging(MOVE_TO_2222)
    assert not (tmp_path / "var/lib/vps-agent/port-move.json").exists()
    assert store.confirm("again") is None  # nothing left to confirm


def test_no_proof_in_time_rolls_back_and_refuses_the_port_until_the_config_changes(tmp_path: Path) -> None:
    store = moves(tmp_path)
    store.on_config(MOVE_TO_2222, frozenset({22}), 1000.0)
    assert store.expire(1599.0) is None  # not yet
    rolled = store.expire(1600.0)
    assert rolled is not None and rolled.phase == ROLLED_BACK
    assert store.ports(MOVE_TO_2222) == (22,)  # sshd, the firewall and fail2ban: the old port only
    # a restart or a SIGHUP (logrotate) with the same config does not try again
    assert store.on_config(MOVE_TO_2222, frozenset({22}), 2000.0) is None
    assert moves(tmp_path).ports(MOVE_TO_2222) == (22,)
    # the admin edits the config (here: a longer timeout) and reloads: a new attempt
    retry = parse_config("ssh: {port: 2222, confirm_timeout: 30m}")
    change = store.on_config(retry, frozenset({22}), 3000.0)
    assert change is not None and change[0] == STARTED and store.ports(retry) == (22, 2222)


def test_going_back_to_the_old_port_cancels_the_move(tmp_path: Path) -> None:
    store = moves(tmp_path)
    store.on_config(MOVE_TO_2222, frozenset({22}), 1000.0)
    change = store.on_config(STAY_ON_22, frozenset({22, 2222}), 1100.0)
    assert change is not None and change[0] == CANCELLED
    assert store.current() is None and store.ports(STAY_ON_22) == (22,)


def test_a_second_new_port_moves_from_the_proven_old_one(tmp_path: Path) -> None:
    store = moves(tmp_path)
    store.on_config(MOVE_TO_2222, frozenset({22}), 1000.0)
    elsewhere = parse_config("ssh: {port: 2200}")
    change = store.on_config(elsewhere, frozenset({22, 2222}), 1100.0)
    assert change is not None and change[0] == STARTED
    assert store.ports(elsewhere) == (22, 2200)  # 2222 was never proven: not kept


def test_nothing_to_move_when_sshd_is_down_or_already_there(tmp_path: Path) -> None:
    store = moves(tmp_path)
    assert store.on_config(MOVE_TO_2222, frozenset(), 1000.0) is None  # sshd not running: the port just applies
    assert store.on_config(MOVE_TO_2222, frozenset({2222}), 1000.0) is None
    assert store.ports(MOVE_TO_2222) == (2222,)
    assert store.on_config(parse_config("ssh: {enabled: false}"), frozenset({22}), 1000.0) is None


def test_an_unreadable_state_file_means_no_move_and_says_so(tmp_path: Path) -> None:
    state = tmp_path / "var/lib/vps-agent/port-move.json"
    state.parent.mkdir(parents=True)
    state.write_text("{not json")
    store = moves(tmp_path)
    assert store.current() is None and store.problem is not None and "port-move.json: unreadable" in store.problem
    problem = store.take_problem()
    assert problem is not None and "port-move.json: unreadable" in problem
    assert store.take_problem() is None  # reported once, whichever thread asks first


def test_only_a_login_accepted_on_the_new_port_proves_it() -> None:
    entries = [
        sshd_entry('Connection from 10.213.0.2 port 40000 on 10.213.0.1 port 22 rdomain ""', pid=10),
        sshd_entry("Accepted publickey for admin from 10.213.0.2 port 40000 ssh2: ED25519 SHA256:abc", pid=10),
        sshd_entry('Connection from 10.213.0.2 port 40002 on 10.213.0.1 port 2222 rdomain ""', pid=11),
        sshd_entry("Invalid user nosuchuser from 10.213.0.2 port 40002", pid=11),  # a failed attempt proves nothing
        sshd_entry('Connection from 10.213.0.2 port 40004 on 10.213.0.1 port 2222 rdomain ""', pid=12),
    ]
    assert confirming_login(journal.logins(entries), 2222) is None
    entries.append(sshd_entry("Accepted password for admin from 10.213.0.2 port 40004 ssh2", pid=12))
    assert confirming_login(journal.logins(entries), 2222) == "admin from 10.213.0.2 (password)"
    assert confirming_login(journal.logins(entries), 2200) is None

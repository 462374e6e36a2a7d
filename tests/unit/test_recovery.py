"""Start-up recovery: a transaction the daemon never finished (killed mid-heal) is rolled back, named."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.controls.base import Changes, ReloadOutcome
from agent.engine import recovery
from agent.events import null_events
from agent.system import backups, fs


class Reloads:
    name = "demo"

    def __init__(self) -> None:
        self.count = 0
        self.units: list[tuple[str, ...]] = []

    def reload(self, changes: Changes) -> ReloadOutcome:
        self.count += 1
        self.units.append(changes.reload.units)
        return ReloadOutcome(True, "reloaded")


def killed_mid_heal(store: backups.BackupStore, target: Path, undo: Sequence[dict[str, Any]] = ()) -> Path:
    """What a SIGKILL after the first write leaves: the copies, a pending intent record, the new file."""
    backup = store.begin("demo", "abc123def456")
    backup.save(target)
    backup.intend(undo)
    fs.atomic_write(target, b"the agent's half-done fix\n")
    return backup.directory


def actions(events: Any) -> list[dict[str, Any]]:
    return [e for e in events.sinks.recent(100) if e["event"]["action"] == "transaction-recovered"]


def test_a_set_whose_heal_restarts_a_socket_restarts_it_again_when_rolled_back(tmp_path: Path) -> None:
    """ssh.socket's drop-in restored at start-up: the intent record names the unit, so the old ListenStream= is
    the one systemd listens on again (the reload alone would leave the new port's socket)."""
    target = tmp_path / "listen.conf"
    target.write_text("ListenStream=22\n")
    store = backups.BackupStore(tmp_path / "backups", keep=5)
    backup = store.begin("demo", "abc123def456")
    backup.save(target)
    backup.intend((), restart=("ssh.socket",))
    fs.atomic_write(target, b"ListenStream=2222\n")
    control = Reloads()
    [result] = recovery.recover(store, {"demo": control}, null_events())  # type: ignore[dict-item]
    assert target.read_text() == "ListenStream=22\n" and control.units == [("ssh.socket",)], result


def test_a_pending_set_is_rolled_back_byte_for_byte_and_named(tmp_path: Path, commands: Any) -> None:
    target = tmp_path / "demo.conf"
    original = b"admin's own line\n\x00\xff\n"
    target.write_bytes(original)
    os.chmod(target, 0o640)
    store = backups.BackupStore(tmp_path / "backups", keep=5)
    commands.expect(["nft"])
    undo = [{"argv": ["nft", "-f", "-"], "input": "old table\n", "env": {}, "timeout": 30}]
    directory = killed_mid_heal(store, target, undo)
    events, control = null_events(), Reloads()
    [result] = recovery.recover(store, {"demo": control}, events)  # type: ignore[dict-item]
    assert target.read_bytes() == original and os.stat(target).st_mode & 0o777 == 0o640
    assert result.restored == [str(target)] and result.undone == ["nft -f -: ok"] and control.count == 1
    assert commands.inputs == ["old table\n"]
    assert json.loads((directory / "manifest.json").read_text())["state"] == "recovered"
    [event] = actions(events)
    assert event["control"] == "demo" and event["transaction"]["id"] == "abc123def456"
    assert event["event"]["outcome"] == "success" and "never committed" in event["message"]
    assert event["backup"] == str(directory)
    assert recovery.recover(store, {"demo": control}, events) == []  # type: ignore[dict-item]  # once


def test_a_file_the_transaction_created_is_removed_again(tmp_path: Path) -> None:
    target = tmp_path / "new.conf"
    store = backups.BackupStore(tmp_path / "backups", keep=5)
    killed_mid_heal(store, target)
    recovery.recover(store, {}, null_events())
    assert not target.exists()


def test_a_file_already_as_saved_is_left_alone_and_nothing_reloads(tmp_path: Path) -> None:
    target = tmp_path / "demo.conf"
    target.write_text("as it was\n")
    store = backups.BackupStore(tmp_path / "backups", keep=5)
    backup = store.begin("demo", "abc123def456")
    backup.save(target)
    backup.intend()  # killed after the backup, before the first write
    control = Reloads()
    [result] = recovery.recover(store, {"demo": control}, null_events())  # type: ignore[dict-item]
    assert result.restored == [] and control.count == 0


def test_a_set_cut_short_before_its_intent_record_is_removed(tmp_path: Path) -> None:
    store = backups.BackupStore(tmp_path / "backups", keep=5)
    directory = store.begin("demo", "abc123def456").directory
    events = null_events()
    [result] = recovery.recover(store, {}, events)
    assert not directory.exists() and not result.problem
    assert "before any change: removed" in actions(events)[0]["message"]


def test_an_unreadable_manifest_is_reported_and_left(tmp_path: Path) -> None:
    store = backups.BackupStore(tmp_path / "backups", keep=5)
    directory = store.begin("demo", "abc123def456").directory
    (directory / "manifest.json").write_text("{not json")
    events = null_events()
    [result] = recovery.recover(store, {}, events)
    assert directory.exists() and result.problem
    assert actions(events)[0]["event"]["outcome"] == "failure"


def test_an_undo_naming_another_tool_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "demo.conf"
    target.write_text("x\n")
    store = backups.BackupStore(tmp_path / "backups", keep=5)
    killed_mid_heal(store, target, [{"argv": ["/bin/sh", "-c", "id"], "input": None}])
    [result] = recovery.recover(store, {}, null_events())  # the commands fixture fails any process started
    assert result.undone == ["/bin/sh -c id: refused (not a tool the agent's live changes use)"]


def test_committed_and_rolled_back_sets_are_not_touched(tmp_path: Path) -> None:
    target = tmp_path / "demo.conf"
    target.write_text("before\n")
    store = backups.BackupStore(tmp_path / "backups", keep=5)
    for state in (backups.COMMITTED, backups.ROLLED_BACK):
        backup = store.begin("demo", f"tx{state}")
        backup.save(target)
        backup.intend()
        backup.mark(state)
    target.write_text("after\n")
    assert recovery.recover(store, {}, null_events()) == [] and target.read_text() == "after\n"


def test_a_first_format_manifest_reads_as_committed(tmp_path: Path) -> None:
    directory = tmp_path / "backups/ssh/20260101T000000.000000Z-0123456789ab"
    (directory / "files/etc").mkdir(parents=True)
    (directory / "files/etc/x").write_text("old\n")
    entry = {"path": "/etc/x", "existed": True, "symlink_target": None, "mode": "0o644", "uid": 0, "gid": 0}
    (directory / "manifest.json").write_text(json.dumps([entry]))
    loaded = backups.load_set(directory, lambda p: tmp_path / p.lstrip("/"))
    assert loaded.state == backups.COMMITTED and loaded.transaction_id == "0123456789ab"
    assert [e.content for e in loaded.saved.values()] == [b"old\n"]


def test_the_temporary_file_of_a_write_cut_short_is_swept_and_nothing_else(tmp_path: Path) -> None:
    litter = tmp_path / f".sshd_config{fs.TMP_MARKER}abc123"
    litter.write_text("half")
    keep = tmp_path / "sshd_config"
    keep.write_text("whole\n")
    assert recovery.sweep_temporaries([tmp_path]) == [litter]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sshd_config"]


def test_a_fault_spec_names_a_control_a_step_and_the_nth_time() -> None:
    from agent.engine import faults

    assert faults.Fault.parse("ssh:after-write#2:raise") == faults.Fault("ssh", "after-write", 2, "raise")
    assert faults.Fault.parse("firewall:during-commit") == faults.Fault("firewall", "during-commit", 1, "kill")
    for bad in ("ssh", "ssh:after-lunch", "ssh:after-write#0", "ssh:after-write:explode"):
        with pytest.raises(faults.FaultSpecError):
            faults.Fault.parse(bad)
    injector = faults.FaultInjector(faults.Fault("ssh", "after-write", 2, "raise"))
    injector("ssh", "after-write", 1)
    injector("firewall", "after-write", 2)
    with pytest.raises(faults.InjectedFault):
        injector("ssh", "after-write", 2)
    injector("ssh", "after-write", 2)  # once per process

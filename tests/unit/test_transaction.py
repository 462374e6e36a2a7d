"""The converge transaction: backups first, atomic writes, validate, reload, observe again, or roll back."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.config import Config, default_config
from agent.controls.base import (
    NEEDS_CHANGE,
    Blocked,
    Changes,
    CommandChange,
    Control,
    Drift,
    DriftItem,
    FileChange,
    Held,
    HeldSetting,
    Invocation,
    Meta,
    ReloadOutcome,
    ReloadPlan,
    SshPorts,
    ValidationError,
    WatchSpec,
)
from agent.engine import transaction as tx
from agent.events import null_events
from agent.paths import SystemRoot
from agent.system import backups, fs
from tests.guards import NO_SSH


class FileControl(Control[str | None, str]):
    """Wants one file to hold one text; knobs make validation, reload or preconditions fail."""

    name = "demo"

    def __init__(self, root: SystemRoot, want: str = "good\n") -> None:
        super().__init__(root)
        self.file = root.path("/etc/demo.conf")
        self.want = want
        self.validate_error: str | None = None
        self.reload_ok = True
        self.blocked: Blocked | Held | None = None
        self.reloads = 0
        self.sabotage_after_apply = False
        self.bug_in: str | None = None  # "validate", "reload" or "diff": raises TypeError there, after the write
        self.commands: tuple[CommandChange, ...] = ()
        self.reload_plan = ReloadPlan()
        self.plan_facts: tuple[tuple[str, str], ...] = ()
        self.reload_facts: dict[str, Any] = {}
        self.reloaded_with: list[Changes] = []

    def meta(self, config: Config) -> Meta:
        return Meta()  # no config section: always on, enforcing

    def watches(self, config: Config) -> Sequence[WatchSpec]:
        return [WatchSpec(self.file.parent)]

    def observe(self, desired: str) -> str | None:
        data = fs.read_regular(self.file)
        return None if data is None else data.decode(errors="surrogateescape")

    def desired(self, config: Config, ssh: SshPorts) -> str:
        return self.want

    def diff(self, observed: str | None, desired: str) -> Drift | None:
        if self.bug_in == "diff" and self.reloads:
            raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")
        if observed == desired:
            return None
        return Drift(self.name, (DriftItem("content", "/etc/demo.conf", desired, str(observed)),), "")

    def plan(self, observed: str | None, desired: str, drift: Drift) -> Changes:
        files = (FileChange(self.file, "/etc/demo.conf", desired.encode(), None, "rewrite"),)
        return Changes(files, ("rewrite",), commands=self.commands, reload=self.reload_plan, facts=self.plan_facts)

    def preconditions(self, observed: str | None, desired: str) -> Blocked | Held | None:
        return self.blocked

    def validate(self, changes: Changes) -> None:
        if self.bug_in == "validate":
            raise TypeError("'NoneType' object is not subscriptable")
        if self.validate_error:
            raise ValidationError(self.validate_error)
        if self.sabotage_after_apply:
            self.file.write_text("someone else\n")

    def reload(self, changes: Changes) -> ReloadOutcome:
        self.reloads += 1
        self.reloaded_with.append(changes)
        if (
            self.bug_in == "reload" and self.reloads == 1
        ) or self.bug_in == "reload-twice":  # twice: the rollback's too
            raise TypeError("reload() got an unexpected keyword argument")
        return ReloadOutcome(self.reload_ok, "reloaded" if self.reload_ok else "reload refused", self.reload_facts)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[FileControl, tx.TransactionContext]:
    root = SystemRoot.at(tmp_path / "root")
    (tmp_path / "root/etc").mkdir(parents=True)
    control = FileControl(root)
    control.file.write_text("tampered\n")
    os.chmod(control.file, 0o640)
    ctx = tx.TransactionContext(null_events(), backups.BackupStore(tmp_path / "backups", keep=3), fs.EchoFilter())
    return control, ctx


def actions(ctx: tx.TransactionContext) -> list[str]:
    return [e["event"]["action"] for e in ctx.events.sinks.recent(100)]


def test_heal_writes_backs_up_the_pre_change_file_and_reports(setup: Any) -> None:
    control, ctx = setup
    outcome = tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="test")
    assert outcome.status == tx.HEALED
    assert control.file.read_text() == "good\n"
    assert oct(os.stat(control.file).st_mode & 0o777) == "0o640"  # the file keeps its mode
    assert actions(ctx) == ["drift-detected", "drift-reverted"]
    [backup] = ctx.backups.list("demo")
    assert (backup / "files" / str(control.file).lstrip("/")).read_text() == "tampered\n"
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["state"] == "committed" and manifest["transaction"] == outcome.transaction_id
    [saved] = manifest["files"]
    assert saved["existed"] is True and saved["mode"] == "0o640"
    reverted = ctx.events.sinks.recent(1)[0]
    assert reverted["transaction"]["id"] == outcome.transaction_id and reverted["duration_ms"] >= 0


def test_the_reload_gets_the_plan_and_a_rollback_the_same_but_the_live_values(setup: Any) -> None:
    """reload(changes): how to reload is the plan's data, not state the control kept since plan(). A rollback
    reloads the same way (the socket restarted again for the restored drop-in) but writes no live value."""
    control, ctx = setup
    control.reload_plan = ReloadPlan(units=("ssh.socket",), live=(("kernel.sysrq", "0"),))
    control.reload_ok = False
    outcome = tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="test")
    assert outcome.status == tx.FAILED and control.file.read_text() == "tampered\n"
    forward, back = (changes.reload for changes in control.reloaded_with)
    assert forward == control.reload_plan
    assert back.units == ("ssh.socket",) and back.live == ()
    [backup] = ctx.backups.list("demo")
    assert json.loads((backup / "manifest.json").read_text())["restart"] == ["ssh.socket"]  # for recovery


def test_a_heals_facts_add_what_the_plan_and_the_reload_saw(setup: Any) -> None:
    control, ctx = setup
    control.plan_facts = (("admin_sessions_ignored", "192.0.2.7 (admin)"),)
    control.reload_facts = {"service": "active", "banned": 3}
    outcome = tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="test")
    assert outcome.status == tx.HEALED
    assert outcome.facts == {"admin_sessions_ignored": "192.0.2.7 (admin)", "service": "active", "banned": 3}


def test_compliant_state_writes_and_says_nothing(setup: Any) -> None:
    control, ctx = setup
    control.file.write_text("good\n")
    assert tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="test").status == tx.COMPLIANT
    assert actions(ctx) == [] and ctx.backups.list("demo") == []


def test_validation_failure_restores_the_file_byte_for_byte_and_reloads(setup: Any) -> None:
    control, ctx = setup
    control.validate_error = "line 3: Bad configuration option"
    before = os.stat(control.file)
    outcome = tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="test")
    assert outcome.status == tx.FAILED and "Bad configuration option" in outcome.detail
    assert control.file.read_text() == "tampered\n"
    assert os.stat(control.file).st_mode == before.st_mode
    assert actions(ctx) == ["drift-detected", "remediation-failed"]
    assert control.reloads == 1  # the rollback reload
    assert not [p for p in control.file.parent.iterdir() if fs.TMP_MARKER in p.name]


def test_a_file_that_did_not_exist_is_removed_again_on_rollback(setup: Any) -> None:
    control, ctx = setup
    control.file.unlink()
    control.reload_ok = False
    outcome = tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="test")
    assert outcome.status == tx.FAILED and "reload failed" in outcome.detail
    assert not control.file.exists()


def test_still_drifted_after_apply_rolls_back(setup: Any) -> None:
    control, ctx = setup
    control.sabotage_after_apply = True
    outcome = tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="test")
    assert outcome.status == tx.FAILED and "still drifted" in outcome.detail
    assert control.file.read_text() == "tampered\n"


def test_blocked_changes_nothing_and_says_why(setup: Any) -> None:
    control, ctx = setup
    control.blocked = Blocked(("no admin could log in",))
    outcome = tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="test")
    assert outcome.status == tx.BLOCKED and outcome.blocked is not None
    assert outcome.blocked.reasons == ("no admin could log in",) and outcome.drift is not None
    assert control.file.read_text() == "tampered\n" and control.reloads == 0
    assert actions(ctx) == []  # the runner reports it, once per distinct state
    assert ctx.backups.list("demo") == []


def test_held_settings_wait_and_what_is_safe_is_applied(setup: Any) -> None:
    control, ctx = setup
    wait = HeldSetting("Risky yes", "waits for a login", "log in once")
    control.blocked = Held((wait,), "safe\n")
    outcome = tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="test")
    assert outcome.status == tx.HEALED and outcome.held is not None
    assert control.file.read_text() == "safe\n" and control.reloads == 1
    again = tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="test")
    assert again.status == tx.PENDING and again.changes is None and "proof: Risky yes" in again.detail
    control.blocked = Held((HeldSetting("Risky yes", "no admin", "adduser", NEEDS_CHANGE),), "safe\n")
    assert tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="test").status == tx.BLOCKED


def test_check_mode_observes_and_plans_but_never_writes(setup: Any) -> None:
    control, ctx = setup
    outcome = tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="check", heal=False)
    assert outcome.status == tx.DRIFTED and outcome.changes is not None
    assert control.file.read_text() == "tampered\n" and actions(ctx) == []


def test_backup_retention_keeps_the_newest_sets(setup: Any) -> None:
    control, ctx = setup
    for n in range(5):
        control.file.write_text(f"tampered {n}\n")
        assert tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="test").status == tx.HEALED
    sets = ctx.backups.list("demo")
    assert len(sets) == 3
    assert (sets[-1] / "files" / str(control.file).lstrip("/")).read_text() == "tampered 4\n"


@pytest.mark.parametrize("where", ["validate", "reload", "reload-twice", "diff"])
def test_a_bug_after_the_write_restores_the_file_byte_for_byte_then_is_raised(setup: Any, where: str) -> None:
    control, ctx = setup
    original = b"tampered\n\x00 admin's own bytes \xff\r\n"
    control.file.write_bytes(original)
    before = os.stat(control.file)
    control.bug_in = where
    with pytest.raises(TypeError):
        tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="test")
    assert control.file.read_bytes() == original
    after = os.stat(control.file)
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid, before.st_gid)
    failed = ctx.events.sinks.recent(1)[0]
    assert failed["event"]["action"] == "remediation-failed" and failed["error_type"] == "TypeError"
    assert "fix rolled back: TypeError" in failed["message"] and failed["restored"] == [str(control.file)]
    assert failed["rollback_reload"] is not None  # reloaded onto the restored file
    [backup] = ctx.backups.list("demo")
    assert json.loads((backup / "manifest.json").read_text())["state"] == "rolled-back"
    assert not [p for p in control.file.parent.iterdir() if fs.TMP_MARKER in p.name]


def test_a_bug_undoes_applied_commands_newest_first(setup: Any, commands: Any) -> None:
    control, ctx = setup
    commands.expect(["apply"])
    commands.expect(["undo"])
    control.commands = tuple(
        CommandChange(Invocation(("apply", str(n))), Invocation(("undo", str(n)), "state\n", (("K", "v"),)))
        for n in (1, 2)
    )
    control.bug_in = "validate"
    with pytest.raises(TypeError):
        tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="test")
    assert commands.calls == [["apply", "1"], ["apply", "2"], ["undo", "2"], ["undo", "1"]]
    assert commands.inputs[-1] == "state\n"
    assert ctx.events.sinks.recent(1)[0]["undone"] == ["undo 2: ok", "undo 1: ok"]


def test_a_stopping_daemon_rolls_the_write_phase_back(setup: Any) -> None:
    control, ctx = setup

    def stop_after_the_write(name: str, step: str, n: int = 1) -> None:
        if step == "after-write":
            ctx.stopping.set()  # SIGTERM arrives while the file is written

    ctx.fault = stop_after_the_write
    outcome = tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="test")
    assert outcome.status == tx.FAILED and "the daemon is stopping" in outcome.detail
    assert control.file.read_text() == "tampered\n" and control.reloads == 1


def test_the_intent_record_is_on_disk_before_the_first_change(setup: Any) -> None:
    control, ctx = setup
    seen: dict[str, Any] = {}

    def look(name: str, step: str, n: int = 1) -> None:
        if step == "after-backup":
            [backup] = ctx.backups.list("demo")
            seen.update(json.loads((backup / "manifest.json").read_text()))
            seen["copy"] = (backup / "files" / str(control.file).lstrip("/")).read_bytes()
            seen["file"] = control.file.read_bytes()

    ctx.fault = look
    assert tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="test").status == tx.HEALED
    assert seen["state"] == "pending" and seen["file"] == seen["copy"] == b"tampered\n"
    assert seen["files"][0]["sha256"] is not None


def test_a_failure_before_the_first_write_touches_nothing(setup: Any, commands: Any) -> None:
    control, ctx = setup
    commands.expect(["check"], returncode=1, stderr="line 2: bad rule")
    control.commands = (CommandChange(Invocation(("apply",)), None, Invocation(("check",))),)
    outcome = tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="test")
    assert outcome.status == tx.FAILED and "bad rule" in outcome.detail
    assert control.reloads == 0 and control.file.read_text() == "tampered\n"
    assert ctx.events.sinks.recent(1)[0]["restored"] == []


def test_identical_consecutive_backups_are_stored_once_so_keep_counts_versions(setup: Any) -> None:
    control, ctx = setup  # keep=3
    ids = []
    for _ in range(5):  # a fight with another tool: the same tamper again and again
        control.file.write_text("tampered\n")
        ids.append(tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="test").transaction_id)
    [kept] = ctx.backups.list("demo")
    manifest = json.loads((kept / "manifest.json").read_text())
    assert kept.name.endswith(ids[0]) and manifest["repeats"] == ids[1:] and manifest["repeat_count"] == 4
    assert ctx.events.sinks.recent(1)[0]["backup"] == str(kept)  # the event names the set holding the copy
    for n in (1, 2):
        control.file.write_text(f"tampered {n}\n")
        tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="test")
    sets = ctx.backups.list("demo")
    assert len(sets) == 3 and sets[0] == kept  # three distinct versions, the first one still kept
    control.file.write_text("tampered 1\n")  # not consecutive with its twin: a version of its own
    tx.converge(control, default_config(), ctx, ssh=NO_SSH, reason="test")
    sets = ctx.backups.list("demo")
    assert len(sets) == 3 and kept not in sets
    copy = sets[-1] / "files" / str(control.file).lstrip("/")
    assert copy.read_text() == "tampered 1\n"

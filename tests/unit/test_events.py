"""Events: one JSON object per state change with the ECS fields collectors and scripts rely on."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from agent import events as ev


def make(tmp_path: Path) -> tuple[ev.Events, Path]:
    path = tmp_path / "log/events.jsonl"
    return ev.Events(ev.EventSinks(path, to_stdout=False, ring_size=10), host_name="vps1"), path


def test_every_event_carries_the_documented_fields(tmp_path: Path) -> None:
    events, path = make(tmp_path)
    events.emit(
        ev.DRIFT_REVERTED,
        outcome="success",
        control="ssh",
        message="healed",
        file_path="/etc/ssh/sshd_config",
        diff="-a\n+b\n",
        duration_ms=12.5,
        transaction_id="abc123",
    )
    [line] = path.read_text().splitlines()
    event = json.loads(line)
    stamp = datetime.datetime.fromisoformat(event["@timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == datetime.timedelta(0)
    assert event["host"]["name"] == "vps1"
    assert event["event"]["action"] == "drift-reverted" and event["event"]["outcome"] == "success"
    assert event["event"]["duration"] == 12_500_000
    assert event["control"] == "ssh" and event["file"]["path"] == "/etc/ssh/sshd_config"
    assert event["transaction"]["id"] == "abc123" and event["duration_ms"] == 12.5 and event["diff"] == "-a\n+b\n"
    assert event["log"]["level"] == "info"


def test_a_controls_events_name_it_and_its_transaction_one_way(tmp_path: Path) -> None:
    """events.of(control, txid): what the transaction, the runner, pause/resume, the proofs and recovery emit."""
    events, path = make(tmp_path)
    ssh = events.of("ssh")
    ssh.emit(ev.PORT_MOVE_STARTED, "port move 22 -> 2222 started", outcome="success", new_port=2222)
    events.of("firewall", "abc123").emit(ev.DRIFT_REVERTED, "drift reverted in 3 ms", outcome="success")
    ssh.emit(ev.DRIFT_DETECTED, "drift detected", transaction_id="def456")  # a converge's own id wins
    first, second, third = (json.loads(line) for line in path.read_text().splitlines())
    assert first["control"] == "ssh" and first["message"] == "ssh: port move 22 -> 2222 started"
    assert "transaction" not in first and first["new_port"] == 2222 and first["event"]["outcome"] == "success"
    assert second["message"] == "firewall: drift reverted in 3 ms" and second["transaction"]["id"] == "abc123"
    assert third["transaction"]["id"] == "def456" and third["event"]["outcome"] == "unknown"


def test_reopen_after_logrotate_moves_the_file(tmp_path: Path) -> None:
    events, path = make(tmp_path)
    events.emit(ev.AGENT_STARTED, outcome="success")
    path.rename(path.with_suffix(".jsonl.1"))
    events.sinks.reopen()
    events.emit(ev.AGENT_STOPPING, outcome="success")
    assert json.loads(path.read_text())["event"]["action"] == "agent-stopping"
    assert json.loads(path.with_suffix(".jsonl.1").read_text())["event"]["action"] == "agent-started"


def test_ring_buffer_serves_recent_events_per_control(tmp_path: Path) -> None:
    events, _ = make(tmp_path)
    for n in range(15):
        events.emit(ev.DRIFT_DETECTED, control="ssh" if n % 2 else "firewall", message=str(n))
    assert [e["message"] for e in events.sinks.recent(3, "ssh")] == ["9", "11", "13"]
    assert len(events.sinks.recent(100)) == 10  # bounded by ring_size


def message_of(event: dict[str, Any] | None) -> object:
    assert event is not None, "a tick, not an event"
    return event["message"]


def test_follow_yields_the_backlog_then_new_events_and_a_tick_when_nothing_came(tmp_path: Path) -> None:
    events, _ = make(tmp_path)
    events.emit(ev.DRIFT_DETECTED, control="ssh", message="before")
    following = events.sinks.follow("ssh", backlog=1)
    assert message_of(next(following)) == "before"
    events.emit(ev.DRIFT_DETECTED, control="ssh", message="after")
    assert message_of(next(following)) == "after"
    assert next(following) is None  # within a second: nothing new (the IPC server checks its client then)
    following.close()


def test_unwritable_events_file_is_reported_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "log").write_text("a file where the directory should be")
    events, _ = make(tmp_path)
    events.emit(ev.AGENT_STARTED, outcome="success")
    assert events.sinks.file_error is not None and "events.jsonl" in events.sinks.file_error
    assert events.sinks.recent(1)[0]["event"]["action"] == "agent-started"


def test_a_full_events_disk_is_counted_and_the_daemon_goes_on(tmp_path: Path) -> None:
    events, _ = make(tmp_path)
    events.emit(ev.AGENT_STARTED, outcome="success")
    good = events.sinks._file
    events.sinks._file = open("/dev/full", "ab", buffering=0)  # every write: ENOSPC
    for _ in range(3):
        events.emit(ev.DRIFT_REVERTED, outcome="success", control="ssh")
    assert events.sinks.file_unwritten == 3 and "3 events not written" in (events.sinks.file_error or "")
    assert events.sinks.counts_by_action()["drift-reverted"] == 3  # still counted, still in the ring
    events.sinks._file.close()
    events.sinks._file = good  # room again
    events.emit(ev.AGENT_STOPPING, outcome="success")
    assert events.sinks.file_error is None
    lines = (tmp_path / "log/events.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"]["action"] for line in lines] == ["agent-started", "agent-stopping"]


def test_runs_on_the_structlog_debian_12_ships() -> None:
    major, minor = (int(x) for x in importlib.metadata.version("structlog").split(".")[:2])
    assert (major, minor) >= (22, 3)

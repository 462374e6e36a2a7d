"""The outputs beside the events file: the catalog, native journal fields, RFC 5424 for remote syslog (a
forwarder that never blocks its caller), and the Prometheus textfile."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent import events as ev
from agent.config import SyslogConfig
from agent.paths import SystemRoot
from agent.sinks import catalog, textfile
from agent.sinks.journald import JournalSink, field_name, journal_fields, stdout_is_the_journal
from agent.sinks.outputs import Outputs
from agent.sinks.syslog import SD_ID, SyslogForwarder, format_rfc5424
from agent.system import fs

ECS_CATEGORIES = {
    "api", "authentication", "configuration", "database", "driver", "file", "host", "iam", "intrusion_detection",
    "library", "malware", "network", "package", "process", "registry", "session", "threat", "vulnerability", "web",
}  # fmt: skip
ECS_TYPES = {
    "access", "admin", "allowed", "change", "connection", "creation", "deletion", "denied", "device", "end", "error",
    "group", "indicator", "info", "installation", "protocol", "start", "user",
}  # fmt: skip


def emitted(action: str = ev.DRIFT_REVERTED, level: str = "info", **fields: Any) -> dict[str, Any]:
    events = ev.Events(ev.EventSinks(None, to_stdout=False, ring_size=10), host_name="vps1")
    events.emit(action, level=level, **fields)
    [event] = events.sinks.recent(1)
    return event


HEAL: dict[str, Any] = {  # one heal's fields, as Events.emit takes them
    "outcome": "success",
    "control": "ssh",
    "message": 'ssh: healed "PermitRootLogin" [yes] \\ back',
    "file_path": "/etc/ssh/sshd_config",
    "diff": "-PermitRootLogin yes\n+PermitRootLogin no\n",
    "duration_ms": 41.5,
    "transaction_id": "0123456789ab",
    "drift": ["PermitRootLogin: yes -> no"],
}


# --- the catalog --------------------------------------------------------------------------------------


def test_every_event_action_has_a_fixed_unique_message_id_and_ecs_categories() -> None:
    actions = {v for k, v in vars(ev).items() if k.isupper() and isinstance(v, str) and "-" in v}
    assert actions <= set(catalog.CATALOG), f"not in the catalog: {actions - set(catalog.CATALOG)}"
    ids = [kind.message_id for kind in catalog.CATALOG.values()]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    for kind in catalog.CATALOG.values():
        assert set(kind.category) <= ECS_CATEGORIES and set(kind.type) <= ECS_TYPES


def test_the_upgrade_schedulers_events_are_package_events() -> None:
    for action in ("upgrade-started", "upgrade-finished", "reboot-required"):
        assert "package" in catalog.lookup(action).category


def test_an_action_missing_from_the_table_still_gets_a_stable_id() -> None:
    assert catalog.lookup("something-new") == catalog.lookup("something-new")
    assert catalog.lookup("something-new").message_id not in {k.message_id for k in catalog.CATALOG.values()}


def test_events_carry_ecs_category_and_type() -> None:
    event = emitted(**HEAL)
    assert event["event"]["category"] == ["configuration"] and event["event"]["type"] == ["change"]
    assert emitted(ev.AGENT_STARTED)["event"]["category"] == ["process"]


# --- journald -----------------------------------------------------------------------------------------


def test_journal_fields_are_native_and_upper_snake() -> None:
    fields = journal_fields(emitted(level="warning", **HEAL), pid=42)
    assert fields["MESSAGE"] == HEAL["message"]
    assert fields["MESSAGE_ID"] == catalog.CATALOG["drift-reverted"].message_id
    assert (fields["PRIORITY"], fields["SYSLOG_IDENTIFIER"], fields["SYSLOG_PID"]) == ("4", "vps-agent", "42")
    assert fields["EVENT_ACTION"] == "drift-reverted" and fields["EVENT_OUTCOME"] == "success"
    assert fields["HOST_NAME"] == "vps1" and fields["CONTROL"] == "ssh"
    assert fields["FILE_PATH"] == "/etc/ssh/sshd_config" and fields["TRANSACTION_ID"] == "0123456789ab"
    assert fields["DIFF"] == HEAL["diff"] and fields["DURATION_MS"] == "41.5"
    assert json.loads(fields["EVENT_CATEGORY"]) == ["configuration"]
    assert json.loads(fields["DRIFT"]) == HEAL["drift"]
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", name) for name in fields)


@pytest.mark.parametrize(
    ("dotted", "name"),
    [("event.action", "EVENT_ACTION"), ("@timestamp", "TIMESTAMP"), ("x-y.z", "X_Y_Z"), ("9lives", "F_9LIVES")],
)
def test_field_names(dotted: str, name: str) -> None:
    assert field_name(dotted) == name


def test_with_the_journal_there_is_no_json_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    sinks = ev.EventSinks(None, to_stdout=True, ring_size=10)
    sinks.journal = JournalSink(lambda message, **fields: sent.append((message, fields)))
    ev.Events(sinks).emit(ev.DRIFT_REVERTED, outcome="success", message="healed")
    assert capsys.readouterr().out == ""
    assert sent[0][0] == "healed" and sent[0][1]["SYSLOG_IDENTIFIER"] == "vps-agent"


def test_a_journal_that_refuses_falls_back_to_json_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(message: str, **fields: Any) -> None:
        raise OSError(111, "Connection refused")

    sinks = ev.EventSinks(None, to_stdout=True, ring_size=10)
    sinks.journal = JournalSink(refuse)
    ev.Events(sinks).emit(ev.DRIFT_REVERTED, outcome="success", message="healed")
    assert json.loads(capsys.readouterr().out)["message"] == "healed"
    assert sinks.journal_error and "Connection refused" in sinks.journal_error


def test_stdout_is_the_journal_only_when_journal_stream_names_stdout() -> None:
    info = os.fstat(1)
    assert stdout_is_the_journal({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"})
    assert not stdout_is_the_journal({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino + 1}"})
    assert not stdout_is_the_journal({})


def test_python3_systemd_is_found_where_debian_ships_it() -> None:
    assert JournalSink.load() is not None  # python3-systemd is a Depends of the package


# --- RFC 5424 -----------------------------------------------------------------------------------------

RFC5424 = re.compile(
    r"<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) (?P<msgid>\S+) "
    r"\[(?P<sdid>[^ \]]+)(?P<params>(?: [^=\s\]\"]+=\"(?:[^\"\\\]]|\\[\"\\\]])*\")*)\] (?P<msg>.*)",
    re.S,
)
PARAM = re.compile(r' ([^=\s\]"]+)="((?:[^"\\\]]|\\["\\\]])*)"')


def parse_rfc5424(data: bytes) -> dict[str, Any]:
    match = RFC5424.fullmatch(data.decode())
    assert match, data
    params = {name: re.sub(r"\\([\"\\\]])", r"\1", value) for name, value in PARAM.findall(match["params"])}
    return {**match.groupdict(), "sd": params}


def test_rfc5424_message_with_structured_data() -> None:
    event = emitted(level="error", **HEAL)
    parsed = parse_rfc5424(format_rfc5424(event, "local3", pid=77))
    assert int(parsed["pri"]) == 19 * 8 + 3
    assert (parsed["ts"], parsed["host"], parsed["app"], parsed["procid"]) == (
        event["@timestamp"],
        "vps1",
        "vps-agent",
        "77",
    )
    assert parsed["msgid"] == "drift-reverted" and parsed["sdid"] == SD_ID
    assert parsed["msg"] == HEAL["message"]
    sd = parsed["sd"]
    assert sd["event.action"] == "drift-reverted" and sd["event.outcome"] == "success" and sd["control"] == "ssh"
    assert sd["file.path"] == "/etc/ssh/sshd_config" and sd["transaction.id"] == "0123456789ab"
    assert json.loads(sd["event.category"]) == ["configuration"] and json.loads(sd["drift"]) == HEAL["drift"]
    assert sd["message_id"] == catalog.CATALOG["drift-reverted"].message_id
    assert "diff" not in sd  # many lines: the events file and the journal carry it


def test_rfc5424_message_is_bounded() -> None:
    data = format_rfc5424(emitted(message="x" * 20000, reasons=["y" * 5000]))
    assert len(data) <= 8192
    assert len(parse_rfc5424(data)["sd"]["reasons"]) <= 1024


# --- the forwarder ------------------------------------------------------------------------------------


def syslog_config(port: int, buffer: int = 10, protocol: str = "tcp") -> SyslogConfig:
    return SyslogConfig(f"{protocol}://127.0.0.1:{port}", protocol, "127.0.0.1", port, buffer=buffer)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def eventually(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def read_frames(conn: socket.socket, count: int) -> list[bytes]:
    """Octet-counted frames (RFC 6587): "LEN SP MSG"."""
    data, frames = b"", list[bytes]()
    conn.settimeout(10)
    while len(frames) < count:
        chunk = conn.recv(65536)
        assert chunk, f"connection closed after {len(frames)} frames"
        data += chunk
        while b" " in data:
            length, _, rest = data.partition(b" ")
            if len(rest) < int(length):
                break
            frames.append(rest[: int(length)])
            data = rest[int(length) :]
    return frames


def test_a_dead_collector_never_blocks_the_caller_and_drops_are_counted() -> None:
    outages: list[str] = []
    forwarder = SyslogForwarder(syslog_config(free_port(), buffer=10), on_outage=outages.append)
    try:
        event = emitted(**HEAL)
        started = time.monotonic()
        for _ in range(1000):
            forwarder.deliver(event)
        per_event = (time.monotonic() - started) / 1000
        assert per_event < 0.005, f"{per_event * 1000:.2f} ms per event"
        status = forwarder.status()
        assert status["buffered"] == 10 and status["dropped"] == 990 and status["sent"] == 0
        eventually(lambda: outages)
        assert len(outages) == 1 and "refused" in outages[0].lower()
        assert not forwarder.status()["connected"]
    finally:
        forwarder.close(flush_timeout=0)


def test_forwarder_delivers_in_order_and_again_after_the_collector_comes_back() -> None:
    port = free_port()
    forwarder = SyslogForwarder(syslog_config(port, buffer=100))
    try:
        for n in range(3):
            forwarder.deliver(emitted(message=f"while down {n}"))
        time.sleep(0.2)  # refused at least once: the messages wait in the buffer
        assert forwarder.status()["buffered"] == 3
        with socket.create_server(("127.0.0.1", port)) as server:
            server.settimeout(10)
            conn, _ = server.accept()
            with conn:
                frames = read_frames(conn, 3)
                assert [parse_rfc5424(f)["msg"] for f in frames] == ["while down 0", "while down 1", "while down 2"]
            # the collector goes away and comes back: the next message reaches the new connection
            conn2_ready = threading.Event()
            received: list[bytes] = []

            def second() -> None:
                conn2, _ = server.accept()
                with conn2:
                    conn2_ready.set()
                    received.extend(read_frames(conn2, 1))

            thread = threading.Thread(target=second)
            thread.start()
            time.sleep(0.1)
            forwarder.deliver(emitted(message="after the restart"))
            thread.join(15)
            assert [parse_rfc5424(f)["msg"] for f in received] == ["after the restart"]
        eventually(lambda: forwarder.status()["sent"] == 4)  # counted once sendall() returned
        assert forwarder.status()["dropped"] == 0
    finally:
        forwarder.close(flush_timeout=0)


def test_forwarder_over_udp_sends_one_datagram_per_event() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as collector:
        collector.bind(("127.0.0.1", 0))
        collector.settimeout(10)
        forwarder = SyslogForwarder(syslog_config(collector.getsockname()[1], protocol="udp"))
        try:
            forwarder.deliver(emitted(**HEAL))
            parsed = parse_rfc5424(collector.recv(65536))
            assert parsed["sd"]["event.action"] == "drift-reverted"
        finally:
            forwarder.close(flush_timeout=0)


# --- the Prometheus textfile --------------------------------------------------------------------------


def status(**extra: Any) -> dict[str, Any]:
    controls = [
        {"control": "ssh", "status": "healed", "heals": 3, "last_heal_at": 1700000100.5, "converged_at": 1700000200.0},
        {"control": "firewall", "status": "blocked", "heals": 0, "last_heal_at": None, "converged_at": 1700000201.0},
        {"control": "fail2ban", "status": "disabled", "heals": 0},
    ]
    return {"version": "0.1.0", "started_at": 1700000000.0, "config": {"error": None}, "controls": controls, **extra}


def samples(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_textfile_shows_compliance_heals_converges_build_info(tmp_path: Path) -> None:
    text = textfile.render(status(event_counts={"drift-reverted": 3}), SystemRoot.at(tmp_path))
    values = samples(text)
    assert values['vps_agent_control_compliant{control="ssh"}'] == 1
    assert values['vps_agent_control_compliant{control="firewall"}'] == 0
    assert 'vps_agent_control_compliant{control="fail2ban"}' not in values  # disabled: not guarded
    assert values['vps_agent_control_status{control="firewall",status="blocked"}'] == 1
    assert values['vps_agent_control_status{control="firewall",status="compliant"}'] == 0
    assert values['vps_agent_heals_total{control="ssh"}'] == 3
    assert values['vps_agent_last_converge_timestamp_seconds{control="ssh"}'] == 1700000200
    assert values['vps_agent_last_heal_timestamp_seconds{control="ssh"}'] == 1700000100.5
    assert values['vps_agent_events_total{action="drift-reverted"}'] == 3
    assert values["vps_agent_reboot_required"] == 0 and values["vps_agent_config_rejected"] == 0
    assert any(k.startswith('vps_agent_build_info{version="0.1.0",python="3.') for k in values)
    assert not any(k.startswith("vps_agent_last_upgrade") for k in values)  # no updates.json yet
    for family in {k.split("{")[0] for k in values}:
        assert text.count(f"# TYPE {family} ") == 1 and text.count(f"# HELP {family} ") == 1


def test_textfile_shows_upgrades_and_reboot_required(tmp_path: Path) -> None:
    root = SystemRoot.at(tmp_path)
    root.state_dir.mkdir(parents=True)
    state = {
        "last_started": 1700000000.0,
        "last_finished": 1700000300.0,
        "last_outcome": "failure",
        "next_run": 1700086400.0,
    }
    root.updates_state.write_text(json.dumps(state))
    root.reboot_required.parent.mkdir(parents=True)
    root.reboot_required.write_text("*** System restart required ***\n")
    os.utime(root.reboot_required, (1700000400, 1700000400))
    values = samples(textfile.render(status(), root))
    assert values["vps_agent_last_upgrade_timestamp_seconds"] == 1700000300
    assert values["vps_agent_last_upgrade_success"] == 0
    assert values['vps_agent_last_upgrade_outcome{outcome="failure"}'] == 1
    assert values["vps_agent_next_upgrade_timestamp_seconds"] == 1700086400
    assert values["vps_agent_upgrade_running"] == 0
    assert values["vps_agent_reboot_required"] == 1
    assert values["vps_agent_reboot_required_since_timestamp_seconds"] == 1700000400


def test_textfile_shows_the_syslog_counters(tmp_path: Path) -> None:
    syslog = {"target": "tcp://logs:514", "sent": 7, "dropped": 2, "buffered": 1, "connected": False}
    values = samples(textfile.render(status(outputs={"syslog": syslog}), SystemRoot.at(tmp_path)))
    assert values['vps_agent_syslog_dropped_total{target="tcp://logs:514"}'] == 2
    assert values['vps_agent_syslog_sent_total{target="tcp://logs:514"}'] == 7
    assert values['vps_agent_syslog_connected{target="tcp://logs:514"}'] == 0


class Results(list[str | None]):
    """What a TextfileWriter reports: each error (None after a good write), and which were refusals."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals: list[bool] = []

    def __call__(self, error: str | None, refused: bool) -> None:
        self.append(error)
        self.refusals.append(refused)


def test_textfile_writer_replaces_the_file_and_reports_an_unwritable_directory(tmp_path: Path) -> None:
    results = Results()
    path = tmp_path / "textfile/vps_agent.prom"
    writer = textfile.TextfileWriter(path, lambda: "vps_agent_x 1\n", results, min_interval=0.01)
    try:
        deadline = time.monotonic() + 5
        while not results and time.monotonic() < deadline:
            time.sleep(0.01)
        assert results == [f"{path.parent}: No such file or directory"] and writer.error
        path.parent.mkdir()
        writer.changed()
        while writer.written_at is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert path.read_text() == "vps_agent_x 1\n" and oct(path.stat().st_mode & 0o777) == "0o644"
        assert results == [f"{path.parent}: No such file or directory", None]
        assert [p.name for p in path.parent.iterdir()] == ["vps_agent.prom"]  # no temporary left behind
    finally:
        writer.close()


def test_a_status_source_that_raises_is_reported_and_the_writer_goes_on(tmp_path: Path) -> None:
    """Seen on a booted VPS: the metrics thread rendered status() before the daemon had its control socket
    (AttributeError), died, and no metrics were ever written until the next restart."""
    results = Results()
    path = tmp_path / "vps_agent.prom"
    broken = [True]

    def render() -> str:
        if broken[0]:
            raise AttributeError("'Daemon' object has no attribute 'ipc'")
        return "vps_agent_x 1\n"

    writer = textfile.TextfileWriter(path, render, results, min_interval=0.01)
    try:
        deadline = time.monotonic() + 5
        while not results and time.monotonic() < deadline:
            time.sleep(0.01)
        assert results == [
            "internal error rendering the metrics: AttributeError: 'Daemon' object has no attribute 'ipc'"
        ]
        assert not path.exists()
        broken[0] = False
        writer.changed()
        while writer.written_at is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert path.read_text() == "vps_agent_x 1\n" and results[-1] is None
    finally:
        writer.close()


def test_textfile_default_path_without_node_exporter_is_a_note_not_an_error(tmp_path: Path) -> None:
    results = Results()
    path = tmp_path / "var/lib/prometheus/node-exporter/vps_agent.prom"
    writer = textfile.TextfileWriter(path, lambda: "", results, skip_missing_directory=True)
    writer.close()
    writer.write_now()
    assert results == [] and writer.error is None and writer.note and "does not exist" in writer.note


def debian_node_exporter(root: Path, prometheus: int = 4242) -> Path:
    """Debian's layout: user prometheus owns /var/lib/prometheus; node-exporter/ in it is root's."""
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/passwd").write_text(f"root:x:0:0::/root:/bin/bash\nprometheus:x:{prometheus}:{prometheus}::/:/x\n")
    textfile_dir = root / "var/lib/prometheus/node-exporter"
    textfile_dir.mkdir(parents=True)
    os.chown(textfile_dir.parent, prometheus, prometheus)
    return textfile_dir


def test_textfile_is_written_in_debians_layout_where_prometheus_owns_the_parent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    textfile_dir = debian_node_exporter(root)
    results = Results()
    owners = textfile.collector_owners(SystemRoot.at(root))
    assert owners == fs.Owners(frozenset({4242}), frozenset({4242}))
    writer = textfile.TextfileWriter(textfile_dir / "vps_agent.prom", lambda: "x 1\n", results, owners=lambda: owners)
    writer.close()
    writer.write_now()
    assert results == [] and (textfile_dir / "vps_agent.prom").read_text() == "x 1\n"


def test_textfile_dir_swapped_for_a_symlink_by_prometheus_is_refused_and_nothing_written_there(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    textfile_dir = debian_node_exporter(root)
    chosen = tmp_path / "etc/ssh/sshd_config.d"  # where the attacker points it: somewhere root writes
    chosen.mkdir(parents=True)
    os.rename(textfile_dir, textfile_dir.with_name("node-exporter.old"))
    os.symlink(chosen, textfile_dir)
    os.lchown(textfile_dir, 4242, 4242)
    results = Results()
    system = SystemRoot.at(root)
    writer = textfile.TextfileWriter(
        textfile_dir / "vps_agent.prom", lambda: "x 1\n", results,
        owners=lambda: textfile.collector_owners(system), skip_missing_directory=True,
    )  # fmt: skip
    writer.close()
    writer.write_now()
    assert os.listdir(chosen) == []
    [error] = results
    assert error == (
        f"{textfile_dir}: is a symlink to '{chosen}' and {textfile_dir.parent} is owned by uid 4242; not following it"
    )
    assert results.refusals == [True] and writer.note is None  # a refusal, not "node_exporter is not installed"
    textfile.remove_stale(textfile_dir / "vps_agent.prom", textfile.collector_owners(system))
    assert os.listdir(chosen) == []


def test_textfile_dir_owned_by_another_user_or_writable_by_others_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    textfile_dir = debian_node_exporter(root)
    owners = textfile.collector_owners(SystemRoot.at(root))
    results = Results()
    writer = textfile.TextfileWriter(textfile_dir / "vps_agent.prom", lambda: "", results, owners=lambda: owners)
    writer.close()
    (textfile_dir / "vps_agent.prom").unlink(missing_ok=True)  # the thread's first write, before the change
    os.chown(textfile_dir, 1000, 1000)
    writer.write_now()
    os.chown(textfile_dir, 0, 0)
    os.chmod(textfile_dir, 0o777)
    writer.write_now()
    assert results == [f"{textfile_dir}: is owned by uid 1000", f"{textfile_dir}: is writable by others (mode 0777)"]
    assert not (textfile_dir / "vps_agent.prom").exists()


def test_a_refused_textfile_directory_is_an_output_failed_event_naming_it_in_full(tmp_path: Path) -> None:
    events = ev.null_events()
    outputs = Outputs(SystemRoot.at(tmp_path), events, dict)
    long_dir = "/var/lib/prometheus/node-exporter"
    why = "is a symlink to '/etc/ssh/sshd_config.d' and /var/lib/prometheus is owned by uid 998; not following it"
    error = f"{long_dir}: {why}"
    outputs._textfile_result(error, True)
    [failed] = events.sinks.recent(10)
    assert failed["event"]["action"] == "output-failed" and failed["output"] == "prometheus_textfile"
    assert f"refused, {long_dir} is a symlink to '/etc/ssh/sshd_config.d'" in failed["message"]
    assert "not following it; the agent writes metrics only into a directory" in failed["message"]
    assert outputs.textfile_problem == failed["error"]

"""Metrics for node_exporter's textfile collector: one .prom file in the Prometheus text format, replaced
atomically (node_exporter reads only *.prom, and never a half-written one), from a thread of its own."""

from __future__ import annotations

import json
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from agent.paths import SystemRoot
from agent.system import fs

# every status a control can show (agent/engine/transaction.py and runner.py), exported as a state set
CONTROL_STATES = (
    "compliant",
    "healed",
    "drifted",
    "blocked",
    "failed",
    "error",
    "paused",
    "flapping",
    "disabled",
    "starting",
)
_IN_COMPLIANCE = ("compliant", "healed")
UPGRADE_OUTCOMES = ("success", "failure", "timeout")

Labels = dict[str, str]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int) or (math.isfinite(value) and value == int(value) and abs(value) < 2**53):
        return str(int(value))
    return repr(float(value))


class Exposition:
    """Families in the Prometheus text format (0.0.4): HELP and TYPE once, then the samples."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[Labels, float]]) -> None:
        rows = list(samples)
        if not rows:
            return
        self._lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for labels, value in rows:
            inner = ",".join(f'{key}="{_escape(text)}"' for key, text in labels.items())
            self._lines.append(f"{name}{{{inner}}} {_number(value)}" if inner else f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def _read_updates(path: Path) -> dict[str, Any] | None:
    """The upgrade scheduler's state (updates.json); None when absent or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _timestamp(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def render(status: dict[str, Any], root: SystemRoot) -> str:
    """The whole file from the daemon's status (the same data `vps-agentctl status --json` shows)."""
    out = Exposition()
    controls = status.get("controls", [])
    out.family(
        "vps_agent_build_info",
        "gauge",
        "vps-agent's version and the Python running it (always 1).",
        [({"version": str(status.get("version", "")), "python": platform.python_version()}, 1)],
    )
    if status.get("started_at"):
        out.family(
            "vps_agent_start_time_seconds",
            "gauge",
            "When the daemon started (Unix time).",
            [({}, status["started_at"])],
        )
    out.family(
        "vps_agent_config_rejected",
        "gauge",
        "1 while the config file is rejected and the previous (or last good) one is in force.",
        [({}, 1 if status.get("config", {}).get("error") else 0)],
    )
    out.family(
        "vps_agent_control_compliant",
        "gauge",
        "1 when the control is at its baseline (compliant or healed, or paused without drift), else 0; "
        "absent while disabled or starting.",
        [({"control": c["control"]}, _compliant(c)) for c in controls if c["status"] not in ("disabled", "starting")],
    )
    out.family(
        "vps_agent_control_status",
        "gauge",
        "The control's status as a state set: 1 for the current status, 0 for the others.",
        [({"control": c["control"], "status": s}, c["status"] == s) for c in controls for s in CONTROL_STATES],
    )
    out.family(
        "vps_agent_heals_total",
        "counter",
        "Drifts reverted per control since the daemon started.",
        [({"control": c["control"]}, c.get("heals", 0)) for c in controls],
    )
    out.family(
        "vps_agent_last_converge_timestamp_seconds",
        "gauge",
        "When the control was last checked (and healed if needed), Unix time.",
        [({"control": c["control"]}, c["converged_at"]) for c in controls if c.get("converged_at")],
    )
    out.family(
        "vps_agent_last_heal_timestamp_seconds",
        "gauge",
        "When the control was last healed, Unix time.",
        [({"control": c["control"]}, c["last_heal_at"]) for c in controls if c.get("last_heal_at")],
    )
    out.family(
        "vps_agent_events_total",
        "counter",
        "Events emitted since the daemon started, per event.action.",
        [({"action": action}, n) for action, n in sorted(status.get("event_counts", {}).items())],
    )
    _upgrade_families(out, _read_updates(root.updates_state))
    _reboot_families(out, root.reboot_required)
    _syslog_families(out, status.get("outputs", {}).get("syslog"))
    return out.text()


def _compliant(control: dict[str, Any]) -> int:
    if control["status"] == "paused":
        return 0 if control.get("drift") else 1
    return 1 if control["status"] in _IN_COMPLIANCE else 0


def _upgrade_families(out: Exposition, state: dict[str, Any] | None) -> None:
    if state is None:
        return
    finished, started = _timestamp(state.get("last_finished")), _timestamp(state.get("last_started"))
    outcome, next_run = state.get("last_outcome"), _timestamp(state.get("next_run"))
    if finished is not None:
        out.family(
            "vps_agent_last_upgrade_timestamp_seconds",
            "gauge",
            "When the last package upgrade run finished, Unix time.",
            [({}, finished)],
        )
    if started is not None:
        out.family(
            "vps_agent_last_upgrade_start_timestamp_seconds",
            "gauge",
            "When the last package upgrade run started, Unix time.",
            [({}, started)],
        )
        out.family(
            "vps_agent_upgrade_running",
            "gauge",
            "1 while a package upgrade run is under way.",
            [({}, finished is None or started > finished)],
        )
    if outcome in UPGRADE_OUTCOMES:
        out.family(
            "vps_agent_last_upgrade_success",
            "gauge",
            "1 if the last package upgrade run succeeded, 0 if it failed or timed out.",
            [({}, outcome == "success")],
        )
        out.family(
            "vps_agent_last_upgrade_outcome",
            "gauge",
            "The last package upgrade run's outcome as a state set.",
            [({"outcome": o}, outcome == o) for o in UPGRADE_OUTCOMES],
        )
    if next_run is not None:
        out.family(
            "vps_agent_next_upgrade_timestamp_seconds",
            "gauge",
            "When the next package upgrade run is scheduled, Unix time.",
            [({}, next_run)],
        )


def _reboot_families(out: Exposition, flag: Path) -> None:
    try:
        since: float | None = flag.stat().st_mtime
    except OSError:
        since = None
    out.family(
        "vps_agent_reboot_required",
        "gauge",
        "1 while /run/reboot-required exists (a package asked for a reboot).",
        [({}, since is not None)],
    )
    if since is not None:
        out.family(
            "vps_agent_reboot_required_since_timestamp_seconds",
            "gauge",
            "When /run/reboot-required appeared (its mtime), Unix time.",
            [({}, since)],
        )


def _syslog_families(out: Exposition, syslog: dict[str, Any] | None) -> None:
    if not syslog:
        return
    target = {"target": syslog["target"]}
    out.family(
        "vps_agent_syslog_sent_total", "counter", "Events delivered to the remote syslog.", [(target, syslog["sent"])]
    )
    out.family(
        "vps_agent_syslog_dropped_total",
        "counter",
        "Events dropped because the remote syslog buffer was full (the collector unreachable or too slow).",
        [(target, syslog["dropped"])],
    )
    out.family(
        "vps_agent_syslog_buffered_events",
        "gauge",
        "Events waiting for the remote syslog.",
        [(target, syslog["buffered"])],
    )
    out.family(
        "vps_agent_syslog_connected",
        "gauge",
        "1 while connected to the remote syslog collector.",
        [(target, syslog["connected"])],
    )


COLLECTOR_USER = "prometheus"  # whom Debian's prometheus-node-exporter runs as, and gives /var/lib/prometheus


def collector_owners(root: SystemRoot) -> fs.Owners:
    """Who besides root may own the directories on the way to the textfile: the prometheus user (and
    its group may write there). Debian's postinst gives it /var/lib/prometheus, and node_exporter runs
    as it and serves whatever that directory holds anyway; a directory it could swap is only ever
    reached without following its symlinks, so the agent writes nothing it could not have written."""
    try:
        passwd = fs.read_text(root.passwd, follow_symlinks=True) or ""
    except (fs.UnsafeFile, OSError):
        return fs.Owners()
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == COLLECTOR_USER and fields[2].isdigit() and fields[3].isdigit():
            return fs.Owners(frozenset({int(fields[2])}), frozenset({int(fields[3])}))
    return fs.Owners()


class TextfileWriter:
    """Rewrites the file at most once per min_interval after a change, and every refresh seconds anyway
    (reboot-required and updates.json change without telling the agent).

    The directory is opened one component at a time, never through a symlink someone other than root
    could have put there, each owned by root or the prometheus user (fs.open_directory), and the file
    is written through that descriptor: a prometheus that swaps node-exporter/ for a symlink gets a
    refusal (an output-failed event naming the directory and why), not a file where it pointed."""

    def __init__(
        self,
        path: Path,
        render_text: Callable[[], str],
        on_result: Callable[[str | None, bool], None],
        *,
        refresh: float = 30.0,
        min_interval: float = 1.0,
        skip_missing_directory: bool = False,
        owners: Callable[[], fs.Owners] = fs.Owners,
    ) -> None:
        self.path = path
        self._owners = owners
        self.refused = False  # the last error was a refusal (an unsafe directory), not a failed write
        # the default path: no node_exporter (no directory) is not an error, nothing is written
        self._skip_missing_directory = skip_missing_directory
        self.note: str | None = None
        self._render = render_text
        # (None after a good write, else the error; and whether it was a refusal), only when it changes
        self._on_result = on_result
        self._refresh, self._min_interval = refresh, min_interval
        self._cond = threading.Condition()
        self._dirty = True
        self._stop = False
        self.written_at: float | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="metrics-textfile", daemon=True)
        self._thread.start()

    def changed(self) -> None:
        with self._cond:
            self._dirty = True
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(10)

    def status(self) -> dict[str, Any]:
        return {"path": str(self.path), "written_at": self.written_at, "error": self.error, "note": self.note}

    def _loop(self) -> None:
        last = 0.0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._dirty or self._stop, timeout=self._refresh)
                if self._stop:
                    return
                pause = last + self._min_interval - time.monotonic()
            if pause > 0:
                with self._cond:
                    self._cond.wait_for(lambda: self._stop, timeout=pause)
                    if self._stop:
                        return
            with self._cond:
                self._dirty = False
            last = time.monotonic()
            self.write_now()

    def write_now(self) -> None:
        if self._skip_missing_directory and not os.path.lexists(self.path.parent):
            self.note = f"not written: {self.path.parent} does not exist (is prometheus-node-exporter installed?)"
            return
        self.note = None
        error: str | None = None
        refused = False
        try:
            text = self._render()
        except Exception as exc:  # a bug in a status source must not end the metrics thread for good
            error = f"internal error rendering the metrics: {type(exc).__name__}: {exc}"
        else:
            try:
                with fs.opened_directory(self.path.parent, self._owners()) as directory:
                    fs.atomic_write_at(directory, self.path.name, text.encode(), mode=0o644, durable=False)
            except fs.UnsafeFile as exc:
                error, refused = f"{exc.path}: {exc.why}", True
            except OSError as exc:
                error = f"{self.path.parent}: {exc.strerror or exc}"
            else:
                self.written_at = time.time()
        self.refused = refused
        if error != self.error:
            self.error = error
            self._on_result(error, refused)


def remove_stale(path: Path, owners: fs.Owners | None = None) -> None:
    """A textfile the agent no longer writes must go: node_exporter would serve it frozen forever
    (removed through its directory opened as for writing: never through a planted symlink)."""
    try:
        with fs.opened_directory(path.parent, owners or fs.Owners()) as directory:
            fs.remove_at(directory, path.name)
    except (fs.UnsafeFile, OSError):
        pass

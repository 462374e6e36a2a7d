"""The one event emitter: structlog (22.3 API) -> ECS-named JSON -> stdout or the journal, a JSON-lines file,
a ring buffer, and listeners (remote syslog, the metrics textfile; see agent/sinks)."""

from __future__ import annotations

import collections
import datetime
import errno
import functools
import grp
import json
import os
import socket
import sys
import threading
from collections.abc import Callable, Generator, MutableMapping
from pathlib import Path
from typing import IO, Any, Protocol

from agent.sinks import catalog

# event.action values users and scripts match on; keep them stable.
AGENT_STARTED = "agent-started"
AGENT_STOPPING = "agent-stopping"
CONFIG_RELOADED = "config-reloaded"
CONFIG_REJECTED = "config-rejected"
CONFIG_MISSING = "config-missing"
DRIFT_DETECTED = "drift-detected"
DRIFT_REVERTED = "drift-reverted"
REMEDIATION_FAILED = "remediation-failed"
REMEDIATION_BLOCKED = "remediation-blocked"
REMEDIATION_PENDING = "remediation-pending"
KEY_LOGIN_PROVEN = "key-login-proven"
KEY_LOGIN_FORGOTTEN = "key-login-forgotten"
OBSERVE_FAILED = "observe-failed"
FLAPPING = "flapping"
PAUSED = "paused"
RESUMED = "resumed"
SERVICE_STARTED = "service-started"
PACKAGE_MANAGER_BUSY = "package-manager-busy"
UPGRADE_STARTED = "upgrade-started"
UPGRADE_FINISHED = "upgrade-finished"
UPGRADE_STATE_RESET = "upgrade-state-reset"
REBOOT_REQUIRED = "reboot-required"
REBOOT_DEFERRED = "reboot-deferred"
REBOOTING = "rebooting"
PORT_MOVE_STARTED = "port-move-started"
PORT_MOVE_CONFIRMED = "port-move-confirmed"
PORT_MOVE_ROLLED_BACK = "port-move-rolled-back"
PORT_MOVE_CANCELLED = "port-move-cancelled"
PORT_MOVE_STATE_RESET = "port-move-state-reset"
FINDINGS_CLEARED = "findings-cleared"
OUTPUT_FAILED = "output-failed"
TRANSACTION_RECOVERED = "transaction-recovered"

_LEVELS = {"debug", "info", "warning", "error", "critical"}


def _utc_timestamp() -> str:
    now = datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


class Journal(Protocol):
    """Native journal output (agent/sinks/journald.py): replaces the JSON lines on stdout."""

    def deliver(self, event: dict[str, Any]) -> None: ...


class EventSinks:
    """Where rendered events go: stdout or the journal, a reopenable file, a ring buffer, and listeners.

    Listeners run in the emitting thread (often a heal): each must return at once, never block.
    """

    def __init__(self, file_path: Path | None, *, to_stdout: bool, ring_size: int) -> None:
        self.file_path = file_path
        self.to_stdout = to_stdout
        self.journal: Journal | None = None
        self.journal_error: str | None = None
        self.listeners: tuple[Callable[[dict[str, Any]], None], ...] = ()
        self.listener_error: str | None = None
        # (control, rendered JSON line): a line is a third of the memory of the dict it came from
        self.ring: collections.deque[tuple[str | None, str]] = collections.deque(maxlen=ring_size)
        self.counts: collections.Counter[str] = collections.Counter()  # per event.action, since start
        self._lock = threading.Lock()
        self._new_event = threading.Condition(self._lock)
        self._sequence = 0
        self._file: IO[bytes] | None = None
        self.file_unwritten = 0  # events the file could not take (a full or read-only disk), since start
        self.file_error: str | None = None
        self.reopen()

    def retarget(self, file_path: Path | None, *, to_stdout: bool) -> None:
        """A reloaded config's events.file and events.stdout (the ring keeps its size until a restart)."""
        with self._lock:
            moved = file_path != self.file_path
            self.file_path, self.to_stdout = file_path, to_stdout
        if moved:
            self.reopen()

    def reopen(self) -> None:
        """Reopen the events file: logrotate moved it away, SIGHUP brings us here."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self.file_path is None:
                return
            try:
                self.file_path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
                fd = os.open(
                    self.file_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640
                )
                _share_with_log_readers(fd)
                # unbuffered: a write the disk refuses is not kept to land later, torn, in front of the next
                self._file = os.fdopen(fd, "ab", buffering=0)
                self.file_error = None
            except OSError as exc:
                self.file_error = f"{self.file_path}: {exc.strerror}"

    def write(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, separators=(",", ":"), ensure_ascii=False, default=str)
        with self._lock:
            self._sequence += 1
            self.ring.append((event.get("control"), line))
            self.counts[str(event.get("event", {}).get("action"))] += 1
            if self._file is not None:
                self._write_line((line + "\n").encode())
            self._new_event.notify_all()
            journal, listeners = self.journal, self.listeners
        for listener in listeners:
            try:
                listener(event)
            except Exception as exc:  # a bug in an output must never fail the heal that emitted the event
                self.listener_error = f"{type(exc).__name__}: {exc}"
        if journal is not None:
            try:
                journal.deliver(event)
                self.journal_error = None
                return
            except (OSError, ValueError) as exc:
                # journald gone (a container without it, a restart): stdout still reaches someone
                self.journal_error = f"the journal refused an event: {exc}"
        if self.to_stdout:
            try:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            except (OSError, ValueError):
                pass

    def _write_line(self, data: bytes) -> None:
        """One event line, whole, or counted as unwritten; a line cut short by a full disk is ended, so
        the next event starts a line of its own. Holds self._lock."""
        assert self._file is not None
        try:
            written = self._file.write(data) or 0
            if written < len(data):
                self._file.write(b"\n")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            self.file_unwritten += 1
            self.file_error = f"{self.file_path}: {exc.strerror} ({self.file_unwritten} events not written)"
            return
        if self.file_error is not None and self.file_unwritten:
            self.file_error = None  # the disk has room again

    def counts_by_action(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def recent(self, count: int, control: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            lines = [line for owner, line in self.ring if control is None or owner == control]
        return [json.loads(line) for line in lines[-count:]] if count > 0 else []

    def follow(
        self, control: str | None = None, stop: threading.Event | None = None, backlog: int = 0
    ) -> Generator[dict[str, Any] | None, None, None]:
        """Yield the last `backlog` events, then events as they arrive (`vps-agentctl events -f`): none
        emitted in between is lost or shown twice. None at least once a second: nothing new, a chance
        for the reader to see whether its client is still there (agent/ipc/server.py)."""
        with self._lock:
            seen = self._sequence
            lines = [line for owner, line in self.ring if control is None or owner == control]
        for line in lines[-backlog:] if backlog > 0 else []:
            yield json.loads(line)
        while stop is None or not stop.is_set():
            with self._lock:
                self._new_event.wait_for(functools.partial(self._newer_than, seen), timeout=1.0)
                fresh = self._sequence - seen
                batch = list(self.ring)[-fresh:] if fresh else []
                seen = self._sequence
            for owner, line in batch:
                if control is None or owner == control:
                    yield json.loads(line)
            yield None

    def _newer_than(self, sequence: int) -> bool:
        return self._sequence > sequence

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _share_with_log_readers(fd: int) -> None:
    """Debian's convention for logs: root:adm 0640, so collectors in group adm can ship them."""
    try:
        adm = grp.getgrnam("adm").gr_gid
    except KeyError:
        return
    if os.geteuid() == 0:
        os.fchown(fd, 0, adm)


class _SinkLogger:
    """structlog's "logger": receives the finished event dict from the processor chain."""

    def __init__(self, sinks: EventSinks) -> None:
        self._sinks = sinks

    def msg(self, event: dict[str, Any]) -> None:
        self._sinks.write(event)

    info = debug = warning = error = critical = msg


def _to_ecs(logger: object, method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """Shape a flat structlog event into ECS-named fields."""
    action = event_dict.pop("event")
    kind = catalog.lookup(action)
    shaped: dict[str, Any] = {
        "@timestamp": event_dict.pop("timestamp", None) or _utc_timestamp(),
        "message": event_dict.pop("message", None) or action,
        "log": {"level": method if method in _LEVELS else "info", "logger": "vps-agent"},
        "host": {"name": event_dict.pop("host_name")},
        "event": {
            "kind": "event",
            "module": "vps-agent",
            "action": action,
            "category": list(kind.category),
            "type": list(kind.type),
            "outcome": event_dict.pop("outcome", "unknown"),
        },
    }
    control = event_dict.pop("control", None)
    if control is not None:
        shaped["control"] = control
    file_path = event_dict.pop("file_path", None)
    if file_path is not None:
        shaped["file"] = {"path": file_path}
    user_name = event_dict.pop("user_name", None)
    if user_name is not None:
        shaped["user"] = {"name": user_name}  # ECS user.name: the account an event is about
    transaction_id = event_dict.pop("transaction_id", None)
    if transaction_id is not None:
        shaped["transaction"] = {"id": transaction_id}
    duration_ms = event_dict.get("duration_ms")
    if duration_ms is not None:
        shaped["event"]["duration"] = int(duration_ms * 1_000_000)
    shaped.update(event_dict)
    return ((shaped,), {})


class Events:
    """emit(action, ...) is the only way the agent says anything."""

    def __init__(self, sinks: EventSinks, host_name: str | None = None) -> None:
        self.sinks = sinks
        self._host_name = host_name
        self._log: Any = None

    def _logger(self) -> Any:
        # structlog (and the asyncio it imports) costs ~35 ms to import: loaded at the first event, so the
        # console's read-only verbs (check, diff, status), which emit none, never pay it
        if self._log is None:
            import structlog

            self._log = structlog.wrap_logger(
                _SinkLogger(self.sinks),
                processors=[structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"), _to_ecs],
                wrapper_class=structlog.BoundLogger,
                host_name=self._host_name or socket.gethostname(),
            )
        return self._log

    def emit(
        self,
        action: str,
        *,
        outcome: str = "unknown",
        message: str | None = None,
        control: str | None = None,
        level: str = "info",
        **fields: Any,
    ) -> None:
        clean = {k: v for k, v in fields.items() if v is not None}
        method = getattr(self._logger(), level if level in _LEVELS else "info")
        method(action, outcome=outcome, message=message, control=control, **clean)

    def of(self, control: str, transaction_id: str | None = None) -> ControlEvents:
        """The events of one control (within a converge, of one transaction), every one named one way."""
        return ControlEvents(self, control, transaction_id)


class ControlEvents:
    """The one helper for a control's events: `control` and `transaction.id` set, the message prefixed with
    the control's name ("ssh: drift reverted in 4 ms ..."), as the transaction, the runner's reports, the
    daemon's pause and resume, the proofs thread and start-up recovery all emit them."""

    def __init__(self, events: Events, control: str, transaction_id: str | None = None) -> None:
        self.events = events
        self.control = control
        self.transaction_id = transaction_id

    def emit(self, action: str, message: str, *, outcome: str = "unknown", level: str = "info", **fields: Any) -> None:
        fields.setdefault("transaction_id", self.transaction_id)
        self.events.emit(
            action, outcome=outcome, control=self.control, level=level, message=f"{self.control}: {message}", **fields
        )


def null_events() -> Events:
    """Events that go only to the ring buffer (for `check` and tests)."""
    return Events(EventSinks(None, to_stdout=False, ring_size=100))

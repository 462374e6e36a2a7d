"""Native journal fields through python3-systemd: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, a fixed
MESSAGE_ID per event type, and every event field in UPPER_SNAKE (event.action -> EVENT_ACTION)."""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from agent.sinks import catalog

IDENTIFIER = "vps-agent"
_NOT_NAME = re.compile(r"[^A-Z0-9]+")
_MAX_NAME = 64  # journald refuses longer field names


def field_name(dotted: str) -> str:
    """event.action -> EVENT_ACTION, @timestamp -> TIMESTAMP; always a valid journal field name."""
    name = _NOT_NAME.sub("_", dotted.upper()).strip("_") or "FIELD"
    if name[0].isdigit():
        name = "F_" + name
    return name[:_MAX_NAME]


def journal_fields(event: dict[str, Any], pid: int | None = None) -> dict[str, str]:
    """The fields of one journal entry (MESSAGE included)."""
    kind = catalog.lookup(str(event.get("event", {}).get("action", "")))
    fields: dict[str, str] = {}
    for dotted, value in catalog.flatten(event):
        if value is None or dotted == "message":
            continue
        fields[field_name(dotted)] = catalog.as_text(value)
    fields.update(
        MESSAGE=str(event.get("message", "")),
        MESSAGE_ID=kind.message_id,
        PRIORITY=str(catalog.severity(event)),
        SYSLOG_IDENTIFIER=IDENTIFIER,
        SYSLOG_PID=str(pid if pid is not None else os.getpid()),
    )
    return fields


def stdout_is_the_journal(environ: Mapping[str, str] = os.environ) -> bool:
    """systemd sets JOURNAL_STREAM=dev:inode when stdout goes to the journal (see systemd.exec(5))."""
    try:
        device, inode = (int(part) for part in environ.get("JOURNAL_STREAM", "").split(":"))
        info = os.fstat(1)
    except (ValueError, OSError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


class JournalSink:
    """Sends each event to journald as native fields; the caller falls back to stdout on an error."""

    def __init__(self, send: Callable[..., None]) -> None:
        self._send = send

    @classmethod
    def load(cls) -> JournalSink | None:
        """None when python3-systemd is not installed."""
        try:
            journal = importlib.import_module("systemd.journal")
        except ImportError:
            return None
        send: Callable[..., None] = journal.send
        return cls(send)

    def deliver(self, event: dict[str, Any]) -> None:
        fields = journal_fields(event)
        message = fields.pop("MESSAGE")
        # CODE_FUNC given: otherwise python-systemd names this function as where every event came from
        self._send(message, CODE_FUNC=str(event.get("event", {}).get("action", "")), **fields)

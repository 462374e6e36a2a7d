"""One table for every event type: its journal MESSAGE_ID and its ECS categorization.

The MESSAGE_IDs are fixed forever (journalctl MESSAGE_ID=... and alerts match on them); a new action gets
a new random 128-bit id (python3 -c 'import uuid; print(uuid.uuid4().hex)'), never a reused one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EventType:
    message_id: str
    category: tuple[str, ...]  # ECS event.category
    type: tuple[str, ...]  # ECS event.type
    subject: str  # one line for the journal catalog (journalctl -x)


CATALOG: dict[str, EventType] = {
    "agent-started": EventType("280818f655cc4064933c051ae9cba4c1", ("process",), ("start",), "vps-agent started"),
    "agent-stopping": EventType("0eefbf0cf69644a19f81709cf32a2be0", ("process",), ("end",), "vps-agent stopping"),
    "config-reloaded": EventType(
        "9f054bfd78f24f96bf1ba42450e82752", ("configuration",), ("change",), "vps-agent configuration reloaded"
    ),
    "config-rejected": EventType(
        "0610bf5cf1e94e3393a7c400b159bb9e", ("configuration",), ("error",), "vps-agent configuration rejected"
    ),
    "config-missing": EventType(
        "fcb2738f738045f9a5a3ea06882c19e1", ("configuration",), ("info",), "vps-agent on the defaults: no config file"
    ),
    "drift-detected": EventType(
        "09f35bf5f74d412387379352eb40bdd4", ("configuration",), ("change",), "Drift from the baseline detected"
    ),
    "drift-reverted": EventType(
        "651deaf9af8049c99d010dc419f1f070", ("configuration",), ("change",), "Drift reverted to the baseline"
    ),
    "remediation-failed": EventType(
        "e2e68181df9745a3bab1c6a1e8817547", ("configuration",), ("error",), "Drift could not be reverted"
    ),
    "remediation-blocked": EventType(
        "59dbd215fc4f40ee9a1ee000c2d86537", ("configuration",), ("info",), "Remediation blocked by a lockout check"
    ),
    "remediation-pending": EventType(
        "12ca10ec110547a6bdb03c0c0228f669",
        ("configuration",),
        ("info",),
        "Safe settings applied; the rest waits for the admin's proof",
    ),
    "key-login-proven": EventType(
        "5ab437408e774ee7bf7b378e11e7a461", ("authentication",), ("info",), "An admin's SSH key login was proven"
    ),
    "key-login-forgotten": EventType(
        "50f7e3e3a99f433ca07c40c041ff1836", ("authentication",), ("change",), "An admin's proven SSH key is gone"
    ),
    "observe-failed": EventType(
        "d408506f02ce485f884313f1ada94bf4", ("configuration",), ("error",), "The effective state could not be read"
    ),
    "flapping": EventType(
        "55fb00ec9a4c4278a6ad1324db5b013c", ("configuration",), ("error",), "A control is flapping, backing off"
    ),
    "paused": EventType("60a903c4bc9e4379a3f1c4ecaf474a6c", ("configuration",), ("change",), "A control was paused"),
    "resumed": EventType("0305672e14964c7e9328c89fe725ffd9", ("configuration",), ("change",), "A control was resumed"),
    "service-started": EventType(
        "b0f4af8a753548219b91409c261542c2", ("process",), ("start",), "A guarded service was started"
    ),
    "upgrade-started": EventType(
        "e17e5332c7704ee79323a2d619def62b", ("package",), ("start",), "Package upgrade started"
    ),
    "upgrade-finished": EventType(
        "66ec2c821cbb4be8abf559e31821018e", ("package",), ("installation",), "Package upgrade finished"
    ),
    "reboot-required": EventType(
        "3cbb2a86eabf4a478ef3723b56523388", ("package", "host"), ("info",), "A reboot is required"
    ),
    "output-failed": EventType(
        "a585f63b331b4bd5bb0372caec83b947", ("process",), ("error",), "An event or metrics output is failing"
    ),
    "package-manager-busy": EventType(
        "743b874d674b4e44a39f137aff8e1c45", ("package",), ("info",), "A guard waits for dpkg to finish"
    ),
    "upgrade-state-reset": EventType(
        "4ba6309d65fc440abcf97048db690e94", ("package",), ("error",), "The upgrade scheduler's state was unreadable"
    ),
    "reboot-deferred": EventType(
        "c11d816d5b12419ca40758c841398c9f", ("host",), ("info",), "A required reboot waits: users are logged in"
    ),
    "rebooting": EventType("abebe5623bdb4d7dad4643df207f9c09", ("host",), ("change",), "vps-agent reboots the host"),
    "port-move-started": EventType(
        "74805b1780c84eadaeddfa7cef128254", ("configuration",), ("change",), "SSH port move started: both ports open"
    ),
    "port-move-confirmed": EventType(
        "b6185a70454b4478bc38d1900d77afe9", ("configuration",), ("change",), "SSH port move confirmed: old port closed"
    ),
    "port-move-rolled-back": EventType(
        "dc11d3993fa8458c9074ad0635d0e801", ("configuration",), ("change",), "SSH port move rolled back, unconfirmed"
    ),
    "port-move-cancelled": EventType(
        "4f6604e0d2c843e2bcf837c34e741425", ("configuration",), ("change",), "SSH port move cancelled"
    ),
    "findings-cleared": EventType(
        "70739e9227f94eb6b83737c42e05ade7", ("configuration",), ("end",), "Findings the agent reported are gone"
    ),
    "port-move-state-reset": EventType(
        "a754dd68cb8b4dde9467dd3ac3fd12c8",
        ("configuration",),
        ("error",),
        "The SSH port move's state file could not be read or saved",
    ),
    "transaction-recovered": EventType(
        "cff2a56ad2cd4128b30da04b105ad6ef",
        ("configuration",),
        ("change",),
        "A transaction cut short by a crash was rolled back at start-up",
    ),
}

_UNLISTED = uuid.UUID("7f0c4e55-0b0a-4f43-9d0e-2f7c7d9e1a10")

# log.level -> syslog severity, which is also the journal's PRIORITY
SEVERITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


def lookup(action: str) -> EventType:
    """The table's entry; an action missing from it still gets a stable id (derived from its name)."""
    known = CATALOG.get(action)
    if known is not None:
        return known
    return EventType(uuid.uuid5(_UNLISTED, action).hex, ("process",), ("info",), f"vps-agent: {action}")


def severity(event: dict[str, Any]) -> int:
    return SEVERITY.get(str(event.get("log", {}).get("level", "info")), 6)


def flatten(event: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """ECS nesting as dotted names: {"event": {"action": x}} -> ("event.action", x); lists stay whole."""
    for key, value in event.items():
        if isinstance(value, dict):
            for inner, leaf in flatten(value):
                yield f"{key}.{inner}", leaf
        else:
            yield key, value


def as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)

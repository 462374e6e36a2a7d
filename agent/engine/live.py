"""Live changes (a ruleset, a jail's ignore list): the commands a transaction applies and undoes, and the
undo as the intent record keeps it, so start-up recovery can run it should the daemon die mid-way."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent.controls.base import CommandChange, Invocation, ValidationError
from agent.system.run import run


def record(invocation: Invocation) -> dict[str, Any]:
    """An undo as the intent record keeps it (agent/system/backups.py)."""
    return {
        "argv": list(invocation.argv),
        "input": invocation.input_text,
        "env": dict(invocation.env),
        "timeout": invocation.timeout,
    }


def from_record(kept: Mapping[str, Any]) -> Invocation:
    """An intent record's undo back as an invocation (30 s at most: start-up waits for it)."""
    input_text = kept.get("input")
    return Invocation(
        tuple(str(a) for a in kept.get("argv", [])),
        str(input_text) if input_text is not None else None,
        tuple((str(k), str(v)) for k, v in dict(kept.get("env") or {}).items()),
        30.0,
    )


def invoke(invocation: Invocation, failure: str) -> None:
    """Run one apply or check; raises ValidationError with the tool's words ("refuses", "failed")."""
    result = run(
        invocation.argv, input_text=invocation.input_text, env=dict(invocation.env), timeout=invocation.timeout
    )
    if not result.ok:
        raise ValidationError(f"{' '.join(invocation.argv)} {failure}: {result.error_text()}")


def said(invocation: Invocation) -> str:
    """Run an undo; what it said, for the event ("argv: ok" or the tool's error)."""
    result = run(
        invocation.argv, input_text=invocation.input_text, env=dict(invocation.env), timeout=invocation.timeout
    )
    return f"{' '.join(invocation.argv)}: " + ("ok" if result.ok else result.error_text())


def undo(applied: Sequence[CommandChange]) -> list[str]:
    """Undo applied commands newest first; what each undo said."""
    return [said(command.undo) for command in reversed(applied) if command.undo is not None]

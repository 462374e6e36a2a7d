"""Placeholder of the trusted sshd journal door (replaced by the issue14-journal branch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SshdLogin:
    user: str
    method: str
    address: str
    port: int
    local_port: int | None
    pid: int
    at: float
    key: str = ""


def sshd_logins(since: float | None = None, after_cursor: str | None = None) -> tuple[list[SshdLogin], str | None]:
    return [], after_cursor

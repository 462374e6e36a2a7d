"""The one door to subprocesses: argv lists only (never a shell), a timeout always, C locale."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
_BASE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "LANG": "C"}


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration_ms: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def error_text(self) -> str:
        """What the tool said about its failure, for events and status."""
        text = (self.stderr or self.stdout).strip()
        return text if text else f"{self.argv[0]} exited with status {self.returncode}"


class CommandFailed(Exception):
    def __init__(self, completed: Completed) -> None:
        self.completed = completed
        super().__init__(f"{' '.join(completed.argv)}: {completed.error_text()}")


def run(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = False,
    input_text: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Completed:
    """Run a command; a missing binary or a timeout comes back as a failed Completed, not a raise."""
    merged = dict(_BASE_ENV)
    if env:
        merged.update(env)
    started = time.monotonic()
    try:
        proc = _spawn(list(argv), timeout=timeout, input_text=input_text, env=merged)
    except FileNotFoundError:
        proc = subprocess.CompletedProcess(list(argv), 127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess(list(argv), 124, "", f"{argv[0]}: timed out after {timeout:g}s")
    completed = Completed(
        tuple(argv), proc.returncode, proc.stdout or "", proc.stderr or "", (time.monotonic() - started) * 1000
    )
    if check and not completed.ok:
        raise CommandFailed(completed)
    return completed


def _spawn(
    argv: list[str], *, timeout: float, input_text: str | None, env: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    # Unit tests replace this function; keep it the only place that creates a process.
    return subprocess.run(
        argv,
        input=input_text,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        env=dict(env),
        stdin=None if input_text is not None else subprocess.DEVNULL,
        close_fds=True,
        cwd="/",
    )


def concurrently(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Independent calls (tools that only read, or only test) at once: each but the first in a thread
    of its own, the first in the caller's. The results in the calls' order; the first call's exception
    (in that order) is raised once all have ended. A heal's tool runs are most of its time, and the two
    address families' `iptables-save` or `iptables-restore --test` need not wait for each other."""
    if len(calls) < 2:
        return [call() for call in calls]
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException | None] = [None] * len(calls)

    def one(index: int) -> None:
        try:
            results[index] = calls[index]()
        except BaseException as exc:  # handed to the caller below
            errors[index] = exc

    threads = [threading.Thread(target=one, args=(i,), name="tool-run", daemon=True) for i in range(1, len(calls))]
    for thread in threads:
        thread.start()
    one(0)
    for thread in threads:
        thread.join()
    for error in errors:
        if error is not None:
            raise error
    return results


def which(name: str) -> str | None:
    for directory in _BASE_ENV["PATH"].split(":"):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None

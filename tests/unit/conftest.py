"""Unit tests run on a fake root and may not start a process they did not declare."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pytest

from agent.system import run as run_door

Answer = Callable[[list[str]], tuple[int, str, str]]


@dataclass
class DeclaredCommands:
    """The processes a unit test allows, by argv prefix, with the answer each one gives."""

    answers: list[tuple[tuple[str, ...], Answer]] = field(default_factory=list)
    calls: list[list[str]] = field(default_factory=list)
    inputs: list[str | None] = field(default_factory=list)  # what each call got on stdin

    def expect(self, prefix: Sequence[str], *, stdout: str = "", stderr: str = "", returncode: int = 0) -> None:
        self.expect_with(prefix, lambda argv: (returncode, stdout, stderr))

    def expect_with(self, prefix: Sequence[str], answer: Answer) -> None:
        # newest declaration wins, so a test can change an answer half way
        self.answers.insert(0, (tuple(prefix), answer))

    def real(self, prefix: Sequence[str]) -> None:
        """Let the real tool answer (read-only ones only, e.g. `systemd-analyze calendar`)."""

        def answer(argv: list[str]) -> tuple[int, str, str]:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env={"LC_ALL": "C"})
            return done.returncode, done.stdout, done.stderr

        self.expect_with(prefix, answer)

    def spawn(self, argv: list[str], input_text: str | None = None, **_: object) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)
        self.inputs.append(input_text)
        for prefix, answer in self.answers:
            if tuple(argv[: len(prefix)]) == prefix:
                returncode, stdout, stderr = answer(argv)
                return subprocess.CompletedProcess(argv, returncode, stdout, stderr)
        raise AssertionError(f"unit test started an undeclared process: {argv}")


@pytest.fixture(autouse=True)
def commands(monkeypatch: pytest.MonkeyPatch) -> Iterator[DeclaredCommands]:
    declared = DeclaredCommands()
    monkeypatch.setattr(run_door, "_spawn", declared.spawn)
    yield declared

"""What a config file did wrong: file, line, dotted key, what was expected and what was found."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Described:
    """A found value shown as prose ("a list", "byte 0xff") rather than as a Python literal."""

    text: str

    def __repr__(self) -> str:
        return self.text


def _show(got: object) -> str:
    if isinstance(got, bool):
        return "true" if got else "false"
    if got is None:
        return "null"
    text = repr(got)
    return text if len(text) <= 80 else text[:77] + "..."


class ConfigError(Exception):
    """A config file that cannot be used; str() is one line: file:line: key: expected X, got Y."""

    def __init__(
        self,
        file: str,
        line: int | None,
        key: str,
        expected: str,
        got: object = None,
        *,
        problem: str | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.expected = expected
        self.got = got
        # set only for YAML syntax errors, which are reported as "invalid YAML: <problem>"
        self.problem = problem
        super().__init__(self._message())

    @classmethod
    def invalid_yaml(cls, file: str, line: int | None, problem: str) -> ConfigError:
        return cls(file, line, "", "valid YAML", Described(problem), problem=problem)

    def _message(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.problem is not None:
            return f"{where}: invalid YAML: {self.problem}"
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} expected {self.expected}, got {_show(self.got)}"

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self) -> tuple[Any, ...]:
        # keyword-only `problem` would be lost by the default Exception pickling
        return (_rebuild_error, (self.file, self.line, self.key, self.expected, self.got, self.problem))


def _rebuild_error(
    file: str, line: int | None, key: str, expected: str, got: object, problem: str | None
) -> ConfigError:
    return ConfigError(file, line, key, expected, got, problem=problem)

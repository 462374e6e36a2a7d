"""What a config file did wrong: file, line, column, dotted key, what was expected and what was found (and
a "did you mean" for a misspelt key); ConfigErrors holds every one a file has, so it is fixed in one go."""

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
    """A config file that cannot be used; str() is one line: file:line:column: key: expected X, got Y."""

    def __init__(
        self,
        file: str,
        line: int | None,
        key: str,
        expected: str,
        got: object = None,
        *,
        problem: str | None = None,
        column: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.column = column  # 1-based, like the line
        self.hint = hint  # "did you mean 'port'?"
        self.key = key
        self.expected = expected
        self.got = got
        # set only for YAML syntax errors, which are reported as "invalid YAML: <problem>"
        self.problem = problem
        super().__init__(self._message())

    @classmethod
    def invalid_yaml(cls, file: str, line: int | None, problem: str, column: int | None = None) -> ConfigError:
        return cls(file, line, "", "valid YAML", Described(problem), problem=problem, column=column)

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        return (self,)

    def _message(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.line is not None and self.column is not None:
            where += f":{self.column}"
        if self.problem is not None:
            return f"{where}: invalid YAML: {self.problem}"
        # a key is the admin's text: a control character in it (a stray CR) is shown escaped, so that one
        # error stays one line (found by tests/unit/test_properties_config.py: `firewall:\n  "\\r": 1`)
        key = f" {_printable(self.key)}:" if self.key else ""
        hint = f"; {self.hint}" if self.hint else ""
        return f"{where}:{key} expected {self.expected}, got {_show(self.got)}{hint}"

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self) -> tuple[Any, ...]:
        # keyword-only `problem` would be lost by the default Exception pickling
        fields = (self.file, self.line, self.key, self.expected, self.got, self.problem, self.column, self.hint)
        return (_rebuild_error, fields)


class ConfigErrors(ConfigError):
    """Every error of one file, in file order; its fields are the first's, str() has one line per error."""

    def __init__(self, errors: list[ConfigError]) -> None:
        flat = sorted((e for error in errors for e in error.errors), key=_position)
        self._errors = tuple(flat)
        first = flat[0]
        super().__init__(
            first.file, first.line, first.key, first.expected, first.got,
            problem=first.problem, column=first.column, hint=first.hint,
        )  # fmt: skip

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        return self._errors

    def _message(self) -> str:
        return "\n".join(ConfigError._message(e) for e in self._errors)

    def __reduce__(self) -> tuple[Any, ...]:
        return (ConfigErrors, (list(self._errors),))


def _position(error: ConfigError) -> tuple[int, int]:
    return (error.line or 0, error.column or 0)


def _rebuild_error(
    file: str,
    line: int | None,
    key: str,
    expected: str,
    got: object,
    problem: str | None,
    column: int | None = None,
    hint: str | None = None,
) -> ConfigError:
    return ConfigError(file, line, key, expected, got, problem=problem, column=column, hint=hint)


def _printable(text: str) -> str:
    """text with every non-printable character escaped as repr() would (\\r, \\x00, \\u2028)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)

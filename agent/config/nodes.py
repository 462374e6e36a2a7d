"""Walking composed YAML nodes (never constructed, so no tag is ever executed): where a node sits, its
plain value, mappings, sections and lists, and the scalar parsers every section shares."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from agent.config.durations import DURATION_HELP, MAX_DURATION, format_duration, parse_duration
from agent.config.errors import ConfigError, ConfigErrors, Described

_T = TypeVar("_T")

Parse = Callable[["At", Node], Any]


@dataclass(frozen=True)
class At:
    """Where in the document a node sits: the source name and the dotted key."""

    source: str
    key: str

    def child(self, name: str) -> At:
        return At(self.source, f"{self.key}.{name}" if self.key else name)

    def item(self, index: int) -> At:
        return At(self.source, f"{self.key}[{index}]")

    def fail(self, node: Node, expected: str, got: object | None = None, hint: str | None = None) -> NoReturn:
        raise self.error(node, expected, got, hint)

    def error(self, node: Node, expected: str, got: object | None = None, hint: str | None = None) -> ConfigError:
        found = node_value(node) if got is None else got
        mark = node.start_mark
        return ConfigError(self.source, line_of(mark), self.key, expected, found, column=column_of(mark), hint=hint)


def line_of(mark: yaml.Mark) -> int:
    """The 1-based line an editor (and `sed -n Np`) shows: YAML also breaks lines at a lone CR, U+0085,
    U+2028 and U+2029, so its own count can name a line the file does not have."""
    buffer = getattr(mark, "buffer", None)
    if isinstance(buffer, str):
        return buffer.count("\n", 0, mark.index) + 1
    return int(mark.line) + 1


def column_of(mark: yaml.Mark) -> int:
    """The 1-based column on that line (counted from the last newline, as an editor counts)."""
    buffer = getattr(mark, "buffer", None)
    if isinstance(buffer, str):
        return mark.index - (buffer.rfind("\n", 0, mark.index) + 1) + 1
    return int(mark.column) + 1


_STRICT_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]{0,18})")
_STRICT_FLOAT = re.compile(r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_TAG = "tag:yaml.org,2002:"


def node_value(node: Node) -> object:
    """The plain Python value of a scalar, or a Described for anything a config value cannot be."""
    if isinstance(node, MappingNode):
        return Described("a mapping")
    if isinstance(node, SequenceNode):
        return Described("a list")
    assert isinstance(node, ScalarNode)
    text: str = node.value
    if node.tag == _TAG + "str":
        return text
    if node.tag == _TAG + "null":
        return None
    if node.tag == _TAG + "bool":
        flag = yaml.constructor.SafeConstructor.bool_values.get(text.lower())
        return Described(text) if flag is None else flag
    # YAML 1.1 ints also cover 0x1f, 0o17, 017, 1_000 and 10:00 (= 600); refuse those surprises
    if node.tag == _TAG + "int" and _STRICT_INT.fullmatch(text):
        return int(text)
    if node.tag == _TAG + "float" and _STRICT_FLOAT.fullmatch(text) and math.isfinite(float(text)):
        return float(text)
    if node.tag.startswith(_TAG) and node.tag[len(_TAG) :] in ("int", "float"):
        return Described(text)
    return Described(f"{text!r} tagged {node.tag}")


def is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _TAG + "null"


def mapping(
    at: At, node: Node, allowed: Collection[str] | None, problems: list[ConfigError] | None = None
) -> dict[str, tuple[Node, Node]]:
    """key -> (key node, value node), refusing non-mappings, odd keys, duplicates and unknown keys: the first
    raises, or with `problems`, each is added there and the other keys are still returned."""
    choices = ", ".join(allowed) if allowed is not None else ""
    if not isinstance(node, MappingNode):
        at.fail(node, f"a mapping with keys: {choices}" if allowed is not None else "a mapping")
    found: list[ConfigError] = []
    entries: dict[str, tuple[Node, Node]] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, ScalarNode):
            found.append(at.error(key_node, "a plain key"))
            continue
        name: str = key_node.value
        if allowed is not None and name not in allowed:
            near = difflib.get_close_matches(name, list(allowed), n=1)
            hint = f"did you mean {near[0]!r}?" if near else None
            found.append(at.child(name).error(key_node, f"one of: {choices}", name, hint))
            continue
        if name in entries:
            first = line_of(entries[name][0].start_mark)
            again = Described(f"a second {name!r} (first on line {first})")
            found.append(at.child(name).error(key_node, "each key once", again))
            continue
        entries[name] = (key_node, value_node)
    if found and problems is None:
        raise found[0]
    if problems is not None:
        problems.extend(found)
    return entries


def each_value(
    at: At, entries: dict[str, tuple[Node, Node]], parsers: dict[str, Parse], problems: list[ConfigError]
) -> dict[str, Any]:
    """Every entry parsed, each error added to problems (so a file shows them all at once, not one a run)."""
    values = {}
    for name, (_, value) in entries.items():
        try:
            values[name] = parsers[name](at.child(name), value)
        except ConfigError as error:
            problems.extend(error.errors)
    return values


def raise_any(problems: list[ConfigError]) -> None:
    if problems:
        raise problems[0] if len(problems) == 1 else ConfigErrors(problems)


def section(cls: Callable[..., _T], parsers: dict[str, Parse]) -> Callable[[At, Node], _T]:
    def parse(at: At, node: Node) -> _T:
        # a section whose keys are all commented out is null: it means "all defaults"
        if is_null(node):
            return cls()
        problems: list[ConfigError] = []
        values = each_value(at, mapping(at, node, parsers, problems), parsers, problems)
        raise_any(problems)
        return cls(**values)

    return parse


def sequence(at: At, node: Node, expected: str) -> list[Node]:
    if is_null(node):
        return []
    if not isinstance(node, SequenceNode):
        at.fail(node, expected)
    items: list[Node] = node.value
    return items


# ---------------------------------------------------------------------------------------------------
# Scalar parsers


def boolean(at: At, node: Node) -> bool:
    value = node_value(node)
    if not isinstance(value, bool):
        at.fail(node, "true or false")
    return value


def integer(lo: int, hi: int | None = None) -> Parse:
    expected = f"an integer {lo}..{hi}" if hi is not None else f"an integer >= {lo}"

    def parse(at: At, node: Node) -> int:
        value = node_value(node)
        if type(value) is not int or value < lo or (hi is not None and value > hi):
            at.fail(node, expected)
        return value

    return parse


def choice(options: tuple[str, ...], aliases: dict[str, str] | None = None) -> Parse:
    expected = "one of: " + ", ".join(options)

    def parse(at: At, node: Node) -> str:
        value = node_value(node)
        if isinstance(value, str) and value.lower() in options:
            return value.lower()
        if isinstance(value, str) and aliases is not None and value.lower() in aliases:
            return aliases[value.lower()]
        at.fail(node, expected)

    return parse


def duration(
    minimum: float = 0.0,
    *,
    above_minimum: bool = False,
    maximum: float = MAX_DURATION,
    permanent: bool = False,
) -> Parse:
    low = f"more than {format_duration(minimum)}" if above_minimum else f"at least {format_duration(minimum)}"
    expected = f"{DURATION_HELP} ({low}, at most {format_duration(maximum)})"
    if permanent:
        expected += ", or -1 for permanent"

    def parse(at: At, node: Node) -> float:
        value = node_value(node)
        if permanent and value in (-1, "-1") and not isinstance(value, bool):
            return -1.0
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            at.fail(node, expected)
        try:
            seconds = parse_duration(value)
        except ValueError:
            at.fail(node, expected)
        if seconds > maximum or seconds < minimum or (above_minimum and seconds == minimum):
            at.fail(node, expected)
        return seconds

    return parse


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def line_text(at: At, node: Node, expected: str) -> str:
    """A non-empty single-line string: anything else could inject lines into a generated file."""
    value = node_value(node)
    if not isinstance(value, str) or not value.strip() or _CONTROL_CHARS.search(value):
        at.fail(node, expected)
    return value

"""YAML -> validated, frozen, typed dataclasses for /etc/vps-agent/config.yaml.

The file is composed into YAML nodes (never constructed, so no tag is ever executed) and walked
against the schema below; every error names the file, the 1-based line, the dotted key, what was
expected and what was found.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import os
import posixpath
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from agent.schedule import ScheduleError, Window, check_calendar

MAX_CONFIG_BYTES = 1024 * 1024
# threading/asyncio timers overflow somewhere past ~292 years; ten years is longer than any sane use
MAX_DURATION = 3650 * 86400.0

_T = TypeVar("_T")


# ---------------------------------------------------------------------------------------------------
# Errors


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


# ---------------------------------------------------------------------------------------------------
# Durations

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_BARE_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_DURATION = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?\s*(?:ms|s|m|h|d|w)\s*)+")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)")
_DURATION_HELP = "a duration such as 15ms, 30s, 10m, 1h, 1d, 1w or 1h30m"


def parse_duration(text: str | int | float) -> float:
    """Seconds in "15ms", "30s", "10m", "1h", "1d", "1w", "1h30m"; a bare number means seconds."""
    if isinstance(text, bool):
        raise ValueError(f"invalid duration {text!r}: expected {_DURATION_HELP}")
    if isinstance(text, (int, float)):
        seconds = float(text)
    elif isinstance(text, str):
        stripped = text.strip()
        if _BARE_NUMBER.fullmatch(stripped):
            seconds = float(stripped)
        elif _DURATION.fullmatch(stripped):
            seconds = 0.0
            for number, unit in _DURATION_PART.findall(stripped):
                # dividing keeps "15ms" == 0.015 exactly, where 15 * 0.001 would not be
                seconds += float(number) / 1000 if unit == "ms" else float(number) * _UNIT_SECONDS[unit]
        else:
            raise ValueError(f"invalid duration {text!r}: expected {_DURATION_HELP}")
    else:
        raise TypeError(f"duration must be a str, int or float, not {type(text).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {text!r}: expected {_DURATION_HELP}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact unit for display: 600 -> "10m", 90 -> "90s", 0.015 -> "15ms"."""
    if isinstance(seconds, bool) or not math.isfinite(seconds):
        raise ValueError(f"cannot format {seconds!r} as a duration")
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0s"
    if seconds == int(seconds):
        whole = int(seconds)
        for unit in ("w", "d", "h", "m"):
            size = int(_UNIT_SECONDS[unit])
            if whole % size == 0:
                return f"{whole // size}{unit}"
        return f"{whole}s"
    millis = seconds * 1000
    if abs(millis - round(millis)) < 1e-6:
        return f"{round(millis)}ms"
    return f"{millis:.6f}".rstrip("0").rstrip(".") + "ms"


# ---------------------------------------------------------------------------------------------------
# The schema


@dataclass(frozen=True)
class SshConfig:
    enabled: bool = True
    port: int = 22
    # a port change is two-phase: both ports open until a login on the new one (or `vps-agentctl
    # confirm`) proves it; without that proof in this long, everything returns to the old port
    confirm_timeout: float = 600.0
    permit_root_login: str = "no"
    password_authentication: bool = False
    # further sshd keywords in the user's order, values rendered as sshd expects them
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PortRule:
    port: int
    port_end: int | None = None
    # empty means from anywhere
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class FirewallConfig:
    enabled: bool = True
    mode: str = "enforce"
    allow_tcp: tuple[PortRule, ...] = ()
    allow_udp: tuple[PortRule, ...] = ()
    poll_interval: float = 1.0  # only where the backend sends no netlink events (iptables-legacy)


@dataclass(frozen=True)
class Fail2banConfig:
    enabled: bool = True
    install: bool = True
    maxretry: int = 5
    findtime: float = 600.0
    # -1 means a permanent ban, as in fail2ban itself
    bantime: float = 3600.0
    ignoreip: tuple[str, ...] = ("127.0.0.1/8", "::1")


@dataclass(frozen=True)
class UpdatesConfig:
    enabled: bool = True
    schedule: str = "daily 03:30"
    mode: str = "upgrade"
    randomized_delay: float = 1800.0
    lock_timeout: float = 600.0  # how long apt waits for another holder of the dpkg lock
    time_limit: float = 3600.0  # for a whole run: update, upgrade, reports
    reboot_window: str | None = None  # "HH:MM-HH:MM" local time: reboot there when one is required
    reboot_with_users: bool = False  # reboot even while someone is logged in


@dataclass(frozen=True)
class AccountsConfig:
    enabled: bool = True
    admin_user: str | None = None
    # create admin_user when it is missing (home, group sudo, admin_keys); never with a password
    create_admin: bool = False
    admin_keys: tuple[str, ...] = ()  # public key lines, "ssh-ed25519 AAAA... comment"


@dataclass(frozen=True)
class EngineConfig:
    debounce: float = 0.015
    reconcile_interval: float = 300.0
    flap_max_heals: int = 5
    flap_window: float = 60.0
    flap_backoff: float = 300.0


SYSLOG_FACILITIES = {
    **{name: code for code, name in enumerate(("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news"))},
    **{"uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11},
    **{f"local{n}": 16 + n for n in range(8)},
}
DEFAULT_PROMETHEUS_TEXTFILE = "/var/lib/prometheus/node-exporter/vps_agent.prom"


@dataclass(frozen=True)
class SyslogConfig:
    """Remote syslog (RFC 5424): where to, and how much to hold while the collector is unreachable."""

    target: str  # as written: udp://host[:port] or tcp://host[:port]
    protocol: str  # "udp" or "tcp"
    host: str
    port: int
    tls: bool = False
    ca_file: str | None = None  # None: the system's CAs
    buffer: int = 1000
    facility: str = "daemon"


@dataclass(frozen=True)
class EventsConfig:
    file: str = "/var/log/vps-agent/events.jsonl"
    stdout: bool = True
    ring_size: int = 500
    # None: native journal fields when python3-systemd is there and stdout is the journal (under systemd)
    journald: bool | None = None
    syslog: SyslogConfig | None = None
    prometheus_textfile: str | None = DEFAULT_PROMETHEUS_TEXTFILE


@dataclass(frozen=True)
class BackupsConfig:
    # backup sets retained per control
    keep: int = 20


@dataclass(frozen=True)
class Config:
    ssh: SshConfig = field(default_factory=SshConfig)
    firewall: FirewallConfig = field(default_factory=FirewallConfig)
    fail2ban: Fail2banConfig = field(default_factory=Fail2banConfig)
    updates: UpdatesConfig = field(default_factory=UpdatesConfig)
    accounts: AccountsConfig = field(default_factory=AccountsConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    backups: BackupsConfig = field(default_factory=BackupsConfig)
    source: str = "<defaults>"


def default_config() -> Config:
    return Config()


# ---------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; an empty file means all defaults."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as stream:
            data = stream.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(name, None, "", "a readable YAML file", Described(err.strerror or str(err))) from err
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(name, None, "", "a file of at most 1 MiB", Described(f"more than {MAX_CONFIG_BYTES} bytes"))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            name, line, "", "UTF-8 text", Described(f"byte 0x{data[err.start]:02x} at offset {err.start}")
        ) from err
    return parse_config(text, source=name)


def parse_config(text: str, source: str = "<string>") -> Config:
    """Validate config text; `source` names it in errors and in Config.source."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(
            source, None, "", "a file of at most 1 MiB", Described(f"more than {MAX_CONFIG_BYTES} characters")
        )
    root = _compose(text, source)
    at = _At(source, "")
    if root is None or _is_null(root):
        return Config(source=source)
    entries = _mapping(at, root, _SECTIONS)
    sections = {name: _SECTIONS[name](at.child(name), value) for name, (_, value) in entries.items()}
    return Config(source=source, **sections)


def _compose(text: str, source: str) -> Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "unparseable"
        if err.context and err.problem:
            context_line = f" (line {err.context_mark.line + 1})" if err.context_mark else ""
            problem = f"{err.context}{context_line}: {err.problem}"
        raise ConfigError.invalid_yaml(source, mark.line + 1 if mark else None, problem) from err
    except yaml.reader.ReaderError as err:
        # non-printable characters (NUL, other C0 controls): binary rather than YAML
        line = text.count("\n", 0, err.position) + 1
        code = err.character if isinstance(err.character, int) else ord(err.character)
        found = Described(f"control character U+{code:04X}")
        raise ConfigError(source, line, "", "UTF-8 text", found) from err
    except yaml.YAMLError as err:
        raise ConfigError.invalid_yaml(source, None, str(err)) from err
    except RecursionError as err:
        raise ConfigError.invalid_yaml(source, None, "nesting too deep") from err


# ---------------------------------------------------------------------------------------------------
# Walking nodes

_Parse = Callable[["_At", Node], Any]


@dataclass(frozen=True)
class _At:
    """Where in the document a node sits: the source name and the dotted key."""

    source: str
    key: str

    def child(self, name: str) -> _At:
        return _At(self.source, f"{self.key}.{name}" if self.key else name)

    def item(self, index: int) -> _At:
        return _At(self.source, f"{self.key}[{index}]")

    def fail(self, node: Node, expected: str, got: object | None = None) -> NoReturn:
        found = _value(node) if got is None else got
        raise ConfigError(self.source, node.start_mark.line + 1, self.key, expected, found)


_STRICT_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]{0,18})")
_STRICT_FLOAT = re.compile(r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_TAG = "tag:yaml.org,2002:"


def _value(node: Node) -> object:
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


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _TAG + "null"


def _mapping(at: _At, node: Node, allowed: Collection[str] | None) -> dict[str, tuple[Node, Node]]:
    """key -> (key node, value node), refusing non-mappings, odd keys, duplicates and unknown keys."""
    choices = ", ".join(allowed) if allowed is not None else ""
    if not isinstance(node, MappingNode):
        at.fail(node, f"a mapping with keys: {choices}" if allowed is not None else "a mapping")
    entries: dict[str, tuple[Node, Node]] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, ScalarNode):
            at.fail(key_node, "a plain key")
        name: str = key_node.value
        if allowed is not None and name not in allowed:
            at.child(name).fail(key_node, f"one of: {choices}", name)
        if name in entries:
            first = entries[name][0].start_mark.line + 1
            at.child(name).fail(key_node, "each key once", Described(f"a second {name!r} (first on line {first})"))
        entries[name] = (key_node, value_node)
    return entries


def _section(cls: Callable[..., _T], parsers: dict[str, _Parse]) -> Callable[[_At, Node], _T]:
    def parse(at: _At, node: Node) -> _T:
        # a section whose keys are all commented out is null: it means "all defaults"
        if _is_null(node):
            return cls()
        entries = _mapping(at, node, parsers)
        return cls(**{name: parsers[name](at.child(name), value) for name, (_, value) in entries.items()})

    return parse


def _sequence(at: _At, node: Node, expected: str) -> list[Node]:
    if _is_null(node):
        return []
    if not isinstance(node, SequenceNode):
        at.fail(node, expected)
    items: list[Node] = node.value
    return items


# ---------------------------------------------------------------------------------------------------
# Scalar parsers


def _boolean(at: _At, node: Node) -> bool:
    value = _value(node)
    if not isinstance(value, bool):
        at.fail(node, "true or false")
    return value


def _integer(lo: int, hi: int | None = None) -> _Parse:
    expected = f"an integer {lo}..{hi}" if hi is not None else f"an integer >= {lo}"

    def parse(at: _At, node: Node) -> int:
        value = _value(node)
        if type(value) is not int or value < lo or (hi is not None and value > hi):
            at.fail(node, expected)
        return value

    return parse


def _choice(options: tuple[str, ...], aliases: dict[str, str] | None = None) -> _Parse:
    expected = "one of: " + ", ".join(options)

    def parse(at: _At, node: Node) -> str:
        value = _value(node)
        if isinstance(value, str) and value.lower() in options:
            return value.lower()
        if isinstance(value, str) and aliases is not None and value.lower() in aliases:
            return aliases[value.lower()]
        at.fail(node, expected)

    return parse


def _duration(
    minimum: float = 0.0,
    *,
    above_minimum: bool = False,
    maximum: float = MAX_DURATION,
    permanent: bool = False,
) -> _Parse:
    low = f"more than {format_duration(minimum)}" if above_minimum else f"at least {format_duration(minimum)}"
    expected = f"{_DURATION_HELP} ({low}, at most {format_duration(maximum)})"
    if permanent:
        expected += ", or -1 for permanent"

    def parse(at: _At, node: Node) -> float:
        value = _value(node)
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


def _line_text(at: _At, node: Node, expected: str) -> str:
    """A non-empty single-line string: anything else could inject lines into a generated file."""
    value = _value(node)
    if not isinstance(value, str) or not value.strip() or _CONTROL_CHARS.search(value):
        at.fail(node, expected)
    return value


# ---------------------------------------------------------------------------------------------------
# ssh


_SSHD_KEYWORD = re.compile(r"[A-Za-z][A-Za-z0-9]*")
# these have their own keys (port, permit_root_login, ...) or would restructure the drop-in
_RESERVED_SSHD_KEYWORDS = frozenset({"port", "permitrootlogin", "passwordauthentication", "include", "match"})
_RESERVED_HELP = (
    "an sshd keyword other than Port, PermitRootLogin, PasswordAuthentication "
    "(set with ssh.port, ssh.permit_root_login, ssh.password_authentication), Include or Match"
)


_PERMIT_ROOT_LOGIN = _choice(
    ("yes", "no", "prohibit-password", "forced-commands-only"),
    # sshd's old name for prohibit-password, still accepted by sshd
    {"without-password": "prohibit-password"},
)


def _permit_root_login(at: _At, node: Node) -> str:
    value = _value(node)
    # YAML 1.1 reads a bare no/yes as a boolean
    if isinstance(value, bool):
        return "yes" if value else "no"
    parsed: str = _PERMIT_ROOT_LOGIN(at, node)
    return parsed


def _password_authentication(at: _At, node: Node) -> bool:
    value = _value(node)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("yes", "no"):
        return value.lower() == "yes"
    at.fail(node, "true or false (or yes/no)")


def _sshd_options(at: _At, node: Node) -> tuple[tuple[str, str], ...]:
    if _is_null(node):
        return ()
    seen: dict[str, str] = {}
    options: list[tuple[str, str]] = []
    for keyword, (key_node, value_node) in _mapping(at, node, None).items():
        where = at.child(keyword)
        if not _SSHD_KEYWORD.fullmatch(keyword):
            where.fail(key_node, "an sshd keyword (letters and digits, starting with a letter)", keyword)
        folded = keyword.lower()
        if folded in _RESERVED_SSHD_KEYWORDS:
            where.fail(key_node, _RESERVED_HELP, keyword)
        if folded in seen:
            # sshd keywords are case-insensitive and the first one wins, so a second is a mistake
            where.fail(key_node, "each sshd keyword once", Described(f"{keyword!r} after {seen[folded]!r}"))
        seen[folded] = keyword
        value = _value(value_node)
        if isinstance(value, bool):
            rendered = "yes" if value else "no"
        elif type(value) is int:
            rendered = str(value)
        else:
            rendered = _line_text(where, value_node, "a string, integer or true/false on one line")
        options.append((keyword, rendered))
    return tuple(options)


# ---------------------------------------------------------------------------------------------------
# firewall

_PORT_RANGE = re.compile(r"\s*([0-9]{1,5})\s*-\s*([0-9]{1,5})\s*")
_PORT_OR_RANGE_HELP = 'a port 1..65535 or a range "LO-HI" with LO < HI'
_RULE_HELP = 'a port 1..65535, a range "LO-HI", or a mapping {port: ..., from: [...]}'


def _port_or_range(at: _At, node: Node, expected: str) -> tuple[int, int | None]:
    value = _value(node)
    if type(value) is int and 1 <= value <= 65535:
        return value, None
    if isinstance(value, str):
        match = _PORT_RANGE.fullmatch(value)
        if match:
            low, high = int(match[1]), int(match[2])
            if 1 <= low < high <= 65535:
                return low, high
    at.fail(node, expected)


def _ip_networks(at: _At, node: Node, *, canonical: bool) -> tuple[str, ...]:
    networks: list[str] = []
    for index, item in enumerate(_sequence(at, node, "a list of IP addresses or networks")):
        value = _value(item)
        try:
            if not isinstance(value, str):
                raise ValueError(value)
            network = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            at.item(index).fail(item, "an IP address or network such as 10.0.0.0/8 or 2001:db8::/32")
        networks.append(str(network) if canonical else value.strip())
    return tuple(networks)


def _port_rule(at: _At, node: Node) -> PortRule:
    if not isinstance(node, MappingNode):
        port, port_end = _port_or_range(at, node, _RULE_HELP)
        return PortRule(port, port_end)
    entries = _mapping(at, node, ("port", "from"))
    if "port" not in entries:
        at.child("port").fail(node, _PORT_OR_RANGE_HELP, Described("nothing (the key is missing)"))
    port, port_end = _port_or_range(at.child("port"), entries["port"][1], _PORT_OR_RANGE_HELP)
    sources: tuple[str, ...] = ()
    if "from" in entries:
        sources = _ip_networks(at.child("from"), entries["from"][1], canonical=True)
        if not sources:
            # an empty list would silently mean "from anywhere"
            at.child("from").fail(entries["from"][1], "a non-empty list of IP networks (omit from: for anywhere)")
    return PortRule(port, port_end, sources)


def _port_rules(at: _At, node: Node) -> tuple[PortRule, ...]:
    items = _sequence(at, node, f"a list of rules, each {_RULE_HELP}")
    return tuple(_port_rule(at.item(index), item) for index, item in enumerate(items))


# ---------------------------------------------------------------------------------------------------
# updates, accounts, events

_SIMPLE_SCHEDULE = re.compile(r"(?i)(?:(daily)|weekly\s+(mon|tue|wed|thu|fri|sat|sun))\s+([0-9]{1,2}):([0-9]{2})")
_SCHEDULE_HELP = '"daily HH:MM", "weekly <mon..sun> HH:MM", or a systemd OnCalendar expression (one line, < 200 chars)'


def _schedule(at: _At, node: Node) -> str:
    value = _line_text(at, node, _SCHEDULE_HELP).strip()
    if len(value) >= 200:
        at.fail(node, _SCHEDULE_HELP)
    words = value.split()
    # bare "daily"/"weekly" are valid OnCalendar shorthands; with more words they must be our form
    if words[0].lower() in ("daily", "weekly") and len(words) > 1:
        match = _SIMPLE_SCHEDULE.fullmatch(value)
        if not match or int(match[3]) > 23 or int(match[4]) > 59:
            at.fail(node, _SCHEDULE_HELP)
        clock = f"{int(match[3]):02d}:{match[4]}"
        return f"daily {clock}" if match[1] else f"weekly {match[2].lower()} {clock}"
    problem = check_calendar(value)  # systemd's own parser judges OnCalendar syntax
    if problem is not None:
        # systemd says "Failed to parse calendar specification '<value>': <reason>": the reason is what
        # the admin needs, and must survive the shortening of long values in the message
        reason = problem.rpartition(": ")[2] or problem
        at.fail(node, _SCHEDULE_HELP, Described(f"{value!r}, which systemd-analyze rejects: {reason}"))
    return value


def _reboot_window(at: _At, node: Node) -> str | None:
    expected = 'null (never reboot by itself) or a local time window "HH:MM-HH:MM", e.g. "03:00-05:00"'
    value = _value(node)
    if value is None:
        return None
    if not isinstance(value, str):
        at.fail(node, expected)
    try:
        return str(Window.parse(value))
    except ScheduleError:
        at.fail(node, expected)


_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]*[$]?")


def _admin_user(at: _At, node: Node) -> str | None:
    expected = "null or a non-root user name matching ^[a-z_][a-z0-9_-]*[$]?$ (at most 32 chars)"
    value = _value(node)
    if value is None:
        return None
    if not isinstance(value, str) or not _USER_NAME.fullmatch(value) or len(value) > 32 or value == "root":
        at.fail(node, expected)
    return value


# what OpenSSH 9 accepts in authorized_keys by default (ssh-dss is off since 7.0)
_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
_KEY_HELP = f"a public key on one line, as in a .pub file: TYPE BASE64 [COMMENT], TYPE one of: {', '.join(_KEY_TYPES)}"


def _public_key(at: _At, node: Node) -> str:
    value = _value(node)
    if isinstance(value, str) and "PRIVATE KEY" in value:
        at.fail(node, _KEY_HELP, Described("a private key (it never belongs here: use the .pub file)"))
    parts = _line_text(at, node, _KEY_HELP).split(None, 2)
    if len(parts) < 2 or parts[0] not in _KEY_TYPES:
        at.fail(node, _KEY_HELP)
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        at.fail(node, _KEY_HELP, Described(f"{parts[0]} with a key that is not base64"))
    # the key names its own type first (an SSH string), then its numbers: a mixed-up or cut paste fails here
    named = parts[0].encode()
    if (
        blob[:4] != len(named).to_bytes(4, "big")
        or blob[4 : 4 + len(named)] != named
        or len(blob) < 4 + len(named) + 32
    ):
        at.fail(node, _KEY_HELP, Described(f"{parts[0]} with a key that is truncated or of another type"))
    return " ".join(parts)


def _public_keys(at: _At, node: Node) -> tuple[str, ...]:
    keys: list[str] = []
    for index, item in enumerate(_sequence(at, node, f"a list of public keys, each {_KEY_HELP}")):
        key = _public_key(at.item(index), item)
        same = [n for n, k in enumerate(keys) if k.split()[1] == key.split()[1]]
        if same:
            at.item(index).fail(item, "each key once", Described(f"the key of item {same[0]} again"))
        keys.append(key)
    return tuple(keys)


_ACCOUNTS_KEYS: dict[str, _Parse] = {
    "enabled": _boolean,
    "admin_user": _admin_user,
    "create_admin": _boolean,
    "admin_keys": _public_keys,
}


def _accounts(at: _At, node: Node) -> AccountsConfig:
    if _is_null(node):
        return AccountsConfig()
    if isinstance(node, MappingNode):
        for key_node, _ in node.value:
            if isinstance(key_node, ScalarNode) and "pass" in str(key_node.value).lower():
                # a password in a file that is backed up, shipped and read by tools is a leaked password
                expected = "no password: the agent never takes one from its config (set it on the host: passwd NAME)"
                at.child(str(key_node.value)).fail(key_node, expected, Described("a password key"))
    entries = _mapping(at, node, _ACCOUNTS_KEYS)
    values = {name: _ACCOUNTS_KEYS[name](at.child(name), value) for name, (_, value) in entries.items()}
    config = AccountsConfig(**values)
    if config.create_admin:
        create_node = entries["create_admin"][1]
        if config.admin_user is None:
            why = "false while accounts.admin_user is null (the agent creates only the user named there)"
            at.child("create_admin").fail(create_node, why)
        if not config.admin_keys:
            keys_node = entries["admin_keys"][1] if "admin_keys" in entries else create_node
            why = "at least one public key when accounts.create_admin is true (the admin gets no password)"
            at.child("admin_keys").fail(keys_node, why, Described("none"))
    return config


def _absolute_path(at: _At, node: Node) -> str:
    expected = "an absolute path on one line"
    value = _line_text(at, node, expected)
    if not posixpath.isabs(value) or value.endswith("/"):
        at.fail(node, expected + ", naming a file")
    return value


def _journald(at: _At, node: Node) -> bool | None:
    value = _value(node)
    if isinstance(value, bool):
        return value
    if value == "auto":
        return None
    at.fail(node, "auto, true or false")


_SYSLOG_TARGET = re.compile(
    r"(udp|tcp)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)(?::([0-9]{1,5}))?/?"
)
_SYSLOG_TARGET_HELP = 'a URL "udp://HOST[:PORT]" or "tcp://HOST[:PORT]" (an IPv6 address in brackets)'


def _syslog(at: _At, node: Node) -> SyslogConfig | None:
    if _is_null(node):
        return None
    entries = _mapping(at, node, ("target", "tls", "ca_file", "buffer", "facility"))
    if "target" not in entries:
        at.child("target").fail(node, _SYSLOG_TARGET_HELP, Described("nothing (the key is missing)"))
    target_at, target_node = at.child("target"), entries["target"][1]
    target = _line_text(target_at, target_node, _SYSLOG_TARGET_HELP).strip()
    match = _SYSLOG_TARGET.fullmatch(target)
    if not match:
        target_at.fail(target_node, _SYSLOG_TARGET_HELP)
    protocol, host = match[1], match[2]
    if host.startswith("["):
        try:
            host = str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            target_at.fail(target_node, _SYSLOG_TARGET_HELP)
    tls = _boolean(at.child("tls"), entries["tls"][1]) if "tls" in entries else False
    if tls and protocol != "tcp":
        at.child("tls").fail(entries["tls"][1], "false with a udp:// target (TLS needs tcp://)", True)
    port = int(match[3]) if match[3] else (6514 if tls else 514)
    if not 1 <= port <= 65535:
        target_at.fail(target_node, _SYSLOG_TARGET_HELP + " with a port 1..65535")
    ca_file = None
    if "ca_file" in entries and not _is_null(entries["ca_file"][1]):
        ca_file = _absolute_path(at.child("ca_file"), entries["ca_file"][1])
        if not tls:
            at.child("ca_file").fail(entries["ca_file"][1], "null unless tls is true", ca_file)
    buffer = _integer(10, 1_000_000)(at.child("buffer"), entries["buffer"][1]) if "buffer" in entries else 1000
    facility = "daemon"
    if "facility" in entries:
        facility = _choice(tuple(SYSLOG_FACILITIES))(at.child("facility"), entries["facility"][1])
    return SyslogConfig(target, protocol, host, port, tls, ca_file, buffer, facility)


def _prometheus_textfile(at: _At, node: Node) -> str | None:
    if _is_null(node):
        return None
    expected = "null, or an absolute path of a file ending in .prom (node_exporter reads only those)"
    path = _absolute_path(at, node)
    if not path.endswith(".prom") or path.endswith("/.prom"):
        at.fail(node, expected)
    return path


def locate_key(path: str, key: str) -> int | None:
    """The 1-based line of a dotted key in a config file (for errors found only at run time), or None."""
    try:
        with open(path, encoding="utf-8") as stream:
            node: Node | None = yaml.compose(stream.read(MAX_CONFIG_BYTES), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return None
    line = None
    for name in key.split("."):
        if not isinstance(node, MappingNode):
            return None
        found = [(k, v) for k, v in node.value if isinstance(k, ScalarNode) and k.value == name]
        if not found:
            return None
        line, node = found[0][0].start_mark.line + 1, found[0][1]
    return line


_SECTIONS: dict[str, _Parse] = {
    "ssh": _section(
        SshConfig,
        {
            "enabled": _boolean,
            "port": _integer(1, 65535),
            "confirm_timeout": _duration(10.0, maximum=86400.0),
            "permit_root_login": _permit_root_login,
            "password_authentication": _password_authentication,
            "options": _sshd_options,
        },
    ),
    "firewall": _section(
        FirewallConfig,
        {
            "enabled": _boolean,
            "mode": _choice(("enforce", "report")),
            "allow_tcp": _port_rules,
            "allow_udp": _port_rules,
            "poll_interval": _duration(0.1, maximum=3600.0),
        },
    ),
    "fail2ban": _section(
        Fail2banConfig,
        {
            "enabled": _boolean,
            "install": _boolean,
            "maxretry": _integer(1),
            "findtime": _duration(above_minimum=True),
            "bantime": _duration(above_minimum=True, permanent=True),
            "ignoreip": lambda at, node: _ip_networks(at, node, canonical=False),
        },
    ),
    "updates": _section(
        UpdatesConfig,
        {
            "enabled": _boolean,
            "schedule": _schedule,
            "mode": _choice(("upgrade", "security-only", "dist-upgrade")),
            "randomized_delay": _duration(),
            "lock_timeout": _duration(maximum=86400.0),
            "time_limit": _duration(60.0, maximum=86400.0),
            "reboot_window": _reboot_window,
            "reboot_with_users": _boolean,
        },
    ),
    "accounts": _accounts,
    "engine": _section(
        EngineConfig,
        {
            "debounce": _duration(above_minimum=True, maximum=10.0),
            "reconcile_interval": _duration(1.0),
            "flap_max_heals": _integer(1),
            "flap_window": _duration(above_minimum=True),
            "flap_backoff": _duration(above_minimum=True),
        },
    ),
    "events": _section(
        EventsConfig,
        {
            "file": _absolute_path,
            "stdout": _boolean,
            # the ring lives in memory; a typo of a few extra zeros should not eat the host
            "ring_size": _integer(10, 1_000_000),
            "journald": _journald,
            "syslog": _syslog,
            "prometheus_textfile": _prometheus_textfile,
        },
    ),
    "backups": _section(BackupsConfig, {"keep": _integer(1)}),
}

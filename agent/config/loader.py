"""Reading and validating /etc/vps-agent/config.yaml: bytes -> text -> YAML nodes -> a Config."""

from __future__ import annotations

import difflib
import os
import re

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from agent.config import fields
from agent.config.errors import ConfigError, Described
from agent.config.nodes import (
    At,
    Parse,
    boolean,
    choice,
    column_of,
    duration,
    each_value,
    integer,
    is_null,
    line_of,
    mapping,
    node_value,
    raise_any,
    section,
    sequence,
)
from agent.config.schema import (
    PROFILES,
    SYSCTL_DEFAULTS,
    BackupsConfig,
    Config,
    EngineConfig,
    EventsConfig,
    Fail2banConfig,
    FirewallConfig,
    SshConfig,
    SysctlConfig,
    UpdatesConfig,
)

MAX_CONFIG_BYTES = 1024 * 1024


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
    at = At(source, "")
    if root is None or is_null(root):
        return Config(source=source)
    problems: list[ConfigError] = []
    sections = each_value(at, mapping(at, root, SECTIONS, problems), SECTIONS, problems)
    raise_any(problems)
    return Config(source=source, **sections)


def _compose(text: str, source: str) -> Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "unparseable"
        if err.context and err.problem:
            context_line = f" (line {line_of(err.context_mark)})" if err.context_mark else ""
            problem = f"{err.context}{context_line}: {err.problem}"
        line, column = (line_of(mark), column_of(mark)) if mark else (None, None)
        raise ConfigError.invalid_yaml(source, line, problem, column) from err
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
        line, node = line_of(found[0][0].start_mark), found[0][1]
    return line


# the sysctl section (here: fields.py is full)
_SYSCTL_KEY = re.compile(r"[a-z][a-z0-9_]*(?:\.[A-Za-z0-9_-]+)+")
_SYSCTL_KEY_HELP = "a sysctl key in dotted form, e.g. net.ipv4.conf.all.rp_filter"
_SYSCTL_VALUE = re.compile(r"[A-Za-z0-9_.:,/+-]+(?: [A-Za-z0-9_.:,/+-]+)*")
_SYSCTL_VALUE_HELP = 'a value as the kernel prints it: an integer, or words such as "32768 60999"'


def _sysctl_set(at: At, node: Node) -> tuple[tuple[str, str], ...]:
    if is_null(node):
        return ()
    values = []
    for key, (key_node, value_node) in mapping(at, node, None).items():
        if not _SYSCTL_KEY.fullmatch(key):
            at.child(key).fail(key_node, _SYSCTL_KEY_HELP, key)
        value = node_value(value_node)
        text = re.sub(" +", " ", str(value).strip(" ")) if type(value) in (int, str) else ""
        if not _SYSCTL_VALUE.fullmatch(text):
            at.child(key).fail(value_node, _SYSCTL_VALUE_HELP)
        values.append((key, text))
    return tuple(values)


def _sysctl_unset(at: At, node: Node) -> tuple[str, ...]:
    defaults = dict(SYSCTL_DEFAULTS)
    keys = []
    for index, item in enumerate(sequence(at, node, "a list of keys of the default set")):
        key = node_value(item)
        if not isinstance(key, str) or key not in defaults:
            at.item(index).fail(item, "a key of the default set (see vps-agent.yaml(5)); other keys are not managed")
        keys.append(key)
    return tuple(keys)


_SYSCTL_KEYS: dict[str, Parse] = {
    "enabled": boolean,
    "mode": choice(("enforce", "report")),
    "poll_interval": duration(0.1, maximum=3600.0),
    "set": _sysctl_set,
    "unset": _sysctl_unset,
}


def sysctl(at: At, node: Node) -> SysctlConfig:
    if is_null(node):
        return SysctlConfig()
    entries = mapping(at, node, _SYSCTL_KEYS)
    config = SysctlConfig(**{name: _SYSCTL_KEYS[name](at.child(name), value) for name, (_, value) in entries.items()})
    both = [key for key, _ in config.set if key in config.unset]
    if both:
        unset_node = entries["unset"][1]
        why = "keys not also in sysctl.set (set overrides a default, unset leaves it alone: pick one)"
        at.child("unset").fail(unset_node, why, Described(", ".join(both)))
    return config


def _profile(at: At, node: Node) -> str:
    value = node_value(node)
    if isinstance(value, str) and value.lower() in PROFILES:
        return value.lower()
    near = difflib.get_close_matches(value.lower(), PROFILES, n=1) if isinstance(value, str) else []
    at.fail(node, "one of: " + ", ".join(PROFILES), hint=f"did you mean {near[0]!r}?" if near else None)


SECTIONS: dict[str, Parse] = {
    "ssh": section(
        SshConfig,
        {
            "enabled": boolean,
            "port": integer(1, 65535),
            "confirm_timeout": duration(10.0, maximum=86400.0),
            "permit_root_login": fields.permit_root_login,
            "password_authentication": fields.password_authentication,
            "options": fields.sshd_options,
        },
    ),
    "firewall": section(
        FirewallConfig,
        {
            "enabled": boolean,
            "mode": choice(("enforce", "report")),
            "allow_tcp": fields.port_rules,
            "allow_udp": fields.port_rules,
            "poll_interval": duration(0.1, maximum=3600.0),
        },
    ),
    "fail2ban": section(
        Fail2banConfig,
        {
            "enabled": boolean,
            "install": boolean,
            "maxretry": integer(1),
            "findtime": duration(above_minimum=True),
            "bantime": duration(above_minimum=True, permanent=True),
            "ignoreip": lambda at, node: fields.ip_networks(at, node, canonical=False),
        },
    ),
    "updates": section(
        UpdatesConfig,
        {
            "enabled": boolean,
            "schedule": fields.schedule,
            "mode": choice(("upgrade", "security-only", "dist-upgrade")),
            "randomized_delay": duration(),
            "lock_timeout": duration(maximum=86400.0),
            "time_limit": duration(60.0, maximum=86400.0),
            "reboot_window": fields.reboot_window,
            "reboot_with_users": boolean,
        },
    ),
    "accounts": fields.accounts,
    "sysctl": sysctl,
    "engine": section(
        EngineConfig,
        {
            "debounce": duration(above_minimum=True, maximum=10.0),
            "reconcile_interval": duration(1.0),
            "flap_max_heals": integer(1),
            "flap_window": duration(above_minimum=True),
            "flap_backoff": duration(above_minimum=True),
        },
    ),
    "events": section(
        EventsConfig,
        {
            "file": fields.absolute_path,
            "stdout": boolean,
            # the ring lives in memory; a typo of a few extra zeros should not eat the host
            "ring_size": integer(10, 1_000_000),
            "journald": fields.journald,
            "syslog": fields.syslog,
            "prometheus_textfile": fields.prometheus_textfile,
        },
    ),
    "backups": section(BackupsConfig, {"keep": integer(1)}),
    "profile": lambda at, node: _profile(at, node),
}

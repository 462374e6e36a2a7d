"""Reading and validating /etc/vps-agent/config.yaml: bytes -> text -> YAML nodes -> a Config."""

from __future__ import annotations

import os

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from agent.config import fields
from agent.config.errors import ConfigError, Described
from agent.config.nodes import At, Parse, boolean, choice, duration, integer, is_null, line_of, mapping, section
from agent.config.schema import (
    BackupsConfig,
    Config,
    EngineConfig,
    EventsConfig,
    Fail2banConfig,
    FirewallConfig,
    SshConfig,
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
    entries = mapping(at, root, SECTIONS)
    sections = {name: SECTIONS[name](at.child(name), value) for name, (_, value) in entries.items()}
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
        raise ConfigError.invalid_yaml(source, line_of(mark) if mark else None, problem) from err
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
}

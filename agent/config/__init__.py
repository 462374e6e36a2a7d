"""YAML -> validated, frozen, typed dataclasses for /etc/vps-agent/config.yaml.

The file is composed into YAML nodes (never constructed, so no tag is ever executed) and walked
against the schema; every error names the file, the 1-based line and column, the dotted key, what
was expected and what was found, and a file's errors are reported all at once (ConfigErrors).

  schema.py     the frozen dataclasses and their defaults
  loader.py     file -> text -> nodes -> Config, and the table of sections with their parsers
  nodes.py      the node walker and the scalar parsers every section shares
  fields.py     the validators of single fields (sshd options, port rules, schedules, keys, syslog)
  durations.py  "10m" <-> 600.0
  edit.py       one key of a file set in place, the rest byte-identical (vps-agentctl enforce)
  errors.py     ConfigError, ConfigErrors
"""

from agent.config.durations import MAX_DURATION, format_duration, parse_duration
from agent.config.edit import UneditableConfig, set_key
from agent.config.errors import ConfigError, ConfigErrors, Described
from agent.config.loader import MAX_CONFIG_BYTES, load_config, locate_key, parse_config
from agent.config.schema import (
    DEFAULT_PROMETHEUS_TEXTFILE,
    SYSCTL_DEFAULTS,
    SYSLOG_FACILITIES,
    AccountsConfig,
    BackupsConfig,
    Config,
    EngineConfig,
    EventsConfig,
    Fail2banConfig,
    FirewallConfig,
    PortRule,
    SshConfig,
    SysctlConfig,
    SyslogConfig,
    UpdatesConfig,
    default_config,
)

__all__ = [
    "DEFAULT_PROMETHEUS_TEXTFILE",
    "MAX_CONFIG_BYTES",
    "MAX_DURATION",
    "SYSCTL_DEFAULTS",
    "SYSLOG_FACILITIES",
    "AccountsConfig",
    "BackupsConfig",
    "Config",
    "ConfigError",
    "ConfigErrors",
    "Described",
    "EngineConfig",
    "EventsConfig",
    "Fail2banConfig",
    "FirewallConfig",
    "PortRule",
    "SshConfig",
    "SysctlConfig",
    "SyslogConfig",
    "UneditableConfig",
    "UpdatesConfig",
    "default_config",
    "format_duration",
    "load_config",
    "locate_key",
    "parse_config",
    "parse_duration",
    "set_key",
]

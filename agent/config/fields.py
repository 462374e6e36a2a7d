"""The field validators of the sections that need more than a scalar parser: ssh, firewall, updates,
accounts, events."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import posixpath
import re

from yaml.nodes import MappingNode, Node, ScalarNode

from agent.config.errors import ConfigError, Described
from agent.config.nodes import (
    At,
    Parse,
    boolean,
    choice,
    each_value,
    integer,
    is_null,
    line_text,
    mapping,
    node_value,
    raise_any,
    sequence,
)
from agent.config.schema import (
    SYSLOG_FACILITIES,
    AccountsConfig,
    PortRule,
    SyslogConfig,
)
from agent.schedule import ScheduleError, Window, check_calendar, simple_form

# ---------------------------------------------------------------------------------------------------
# ssh


_SSHD_KEYWORD = re.compile(r"[A-Za-z][A-Za-z0-9]*")
# these have their own keys (port, permit_root_login, ...) or would restructure the drop-in
_RESERVED_SSHD_KEYWORDS = frozenset({"port", "permitrootlogin", "passwordauthentication", "include", "match"})
_RESERVED_HELP = (
    "an sshd keyword other than Port, PermitRootLogin, PasswordAuthentication "
    "(set with ssh.port, ssh.permit_root_login, ssh.password_authentication), Include or Match"
)


_PERMIT_ROOT_LOGIN = choice(
    ("yes", "no", "prohibit-password", "forced-commands-only"),
    # sshd's old name for prohibit-password, still accepted by sshd
    {"without-password": "prohibit-password"},
)


def permit_root_login(at: At, node: Node) -> str:
    value = node_value(node)
    # YAML 1.1 reads a bare no/yes as a boolean
    if isinstance(value, bool):
        return "yes" if value else "no"
    parsed: str = _PERMIT_ROOT_LOGIN(at, node)
    return parsed


def password_authentication(at: At, node: Node) -> bool:
    value = node_value(node)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("yes", "no"):
        return value.lower() == "yes"
    at.fail(node, "true or false (or yes/no)")


def sshd_options(at: At, node: Node) -> tuple[tuple[str, str], ...]:
    if is_null(node):
        return ()
    seen: dict[str, str] = {}
    options: list[tuple[str, str]] = []
    for keyword, (key_node, value_node) in mapping(at, node, None).items():
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
        value = node_value(value_node)
        if isinstance(value, bool):
            rendered = "yes" if value else "no"
        elif type(value) is int:
            rendered = str(value)
        else:
            rendered = line_text(where, value_node, "a string, integer or true/false on one line")
        options.append((keyword, rendered))
    return tuple(options)


# ---------------------------------------------------------------------------------------------------
# firewall

_PORT_RANGE = re.compile(r"\s*([0-9]{1,5})\s*-\s*([0-9]{1,5})\s*")
_PORT_OR_RANGE_HELP = 'a port 1..65535 or a range "LO-HI" with LO < HI'
_RULE_HELP = 'a port 1..65535, a range "LO-HI", or a mapping {port: ..., from: [...]}'


def _port_or_range(at: At, node: Node, expected: str) -> tuple[int, int | None]:
    value = node_value(node)
    if type(value) is int and 1 <= value <= 65535:
        return value, None
    if isinstance(value, str):
        match = _PORT_RANGE.fullmatch(value)
        if match:
            low, high = int(match[1]), int(match[2])
            if 1 <= low < high <= 65535:
                return low, high
    at.fail(node, expected)


def ip_networks(at: At, node: Node, *, canonical: bool) -> tuple[str, ...]:
    networks: list[str] = []
    for index, item in enumerate(sequence(at, node, "a list of IP addresses or networks")):
        value = node_value(item)
        try:
            if not isinstance(value, str):
                raise ValueError(value)
            network = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            at.item(index).fail(item, "an IP address or network such as 10.0.0.0/8 or 2001:db8::/32")
        networks.append(str(network) if canonical else value.strip())
    return tuple(networks)


def _port_rule(at: At, node: Node) -> PortRule:
    if not isinstance(node, MappingNode):
        port, port_end = _port_or_range(at, node, _RULE_HELP)
        return PortRule(port, port_end)
    entries = mapping(at, node, ("port", "from"))
    if "port" not in entries:
        at.child("port").fail(node, _PORT_OR_RANGE_HELP, Described("nothing (the key is missing)"))
    port, port_end = _port_or_range(at.child("port"), entries["port"][1], _PORT_OR_RANGE_HELP)
    sources: tuple[str, ...] = ()
    if "from" in entries:
        sources = ip_networks(at.child("from"), entries["from"][1], canonical=True)
        if not sources:
            # an empty list would silently mean "from anywhere"
            at.child("from").fail(entries["from"][1], "a non-empty list of IP networks (omit from: for anywhere)")
    return PortRule(port, port_end, sources)


def port_rules(at: At, node: Node) -> tuple[PortRule, ...]:
    items = sequence(at, node, f"a list of rules, each {_RULE_HELP}")
    rules: list[PortRule] = []
    problems: list[ConfigError] = []
    for index, item in enumerate(items):
        try:
            rules.append(_port_rule(at.item(index), item))
        except ConfigError as error:
            problems.extend(error.errors)  # every bad rule at once
    raise_any(problems)
    return tuple(rules)


# ---------------------------------------------------------------------------------------------------
# updates, accounts, events

_SCHEDULE_HELP = '"daily HH:MM", "weekly <mon..sun> HH:MM", or a systemd OnCalendar expression (one line, < 200 chars)'


def schedule(at: At, node: Node) -> str:
    value = line_text(at, node, _SCHEDULE_HELP).strip()
    if len(value) >= 200:
        at.fail(node, _SCHEDULE_HELP)
    words = value.split()
    # bare "daily"/"weekly" are valid OnCalendar shorthands; with more words they must be our form
    if words[0].lower() in ("daily", "weekly") and len(words) > 1:
        form = simple_form(value)
        if form is None:
            at.fail(node, _SCHEDULE_HELP)
        return str(form)
    problem = check_calendar(value)  # systemd's own parser judges OnCalendar syntax
    if problem is not None:
        # systemd says "Failed to parse calendar specification '<value>': <reason>": the reason is what
        # the admin needs, and must survive the shortening of long values in the message
        reason = problem.rpartition(": ")[2] or problem
        at.fail(node, _SCHEDULE_HELP, Described(f"{value!r}, which systemd-analyze rejects: {reason}"))
    return value


def reboot_window(at: At, node: Node) -> str | None:
    expected = 'null (never reboot by itself) or a local time window "HH:MM-HH:MM", e.g. "03:00-05:00"'
    value = node_value(node)
    if value is None:
        return None
    if not isinstance(value, str):
        at.fail(node, expected)
    try:
        return str(Window.parse(value))
    except ScheduleError:
        at.fail(node, expected)


_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]*[$]?")


def _admin_user(at: At, node: Node) -> str | None:
    expected = "null or a non-root user name matching ^[a-z_][a-z0-9_-]*[$]?$ (at most 32 chars)"
    value = node_value(node)
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


def _public_key(at: At, node: Node) -> str:
    value = node_value(node)
    if isinstance(value, str) and "PRIVATE KEY" in value:
        at.fail(node, _KEY_HELP, Described("a private key (it never belongs here: use the .pub file)"))
    parts = line_text(at, node, _KEY_HELP).split(None, 2)
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


def _public_keys(at: At, node: Node) -> tuple[str, ...]:
    keys: list[str] = []
    for index, item in enumerate(sequence(at, node, f"a list of public keys, each {_KEY_HELP}")):
        key = _public_key(at.item(index), item)
        same = [n for n, k in enumerate(keys) if k.split()[1] == key.split()[1]]
        if same:
            at.item(index).fail(item, "each key once", Described(f"the key of item {same[0]} again"))
        keys.append(key)
    return tuple(keys)


_ACCOUNTS_KEYS: dict[str, Parse] = {
    "enabled": boolean,
    "admin_user": _admin_user,
    "create_admin": boolean,
    "admin_keys": _public_keys,
}


def accounts(at: At, node: Node) -> AccountsConfig:
    if is_null(node):
        return AccountsConfig()
    if isinstance(node, MappingNode):
        for key_node, _ in node.value:
            if isinstance(key_node, ScalarNode) and "pass" in str(key_node.value).lower():
                # a password in a file that is backed up, shipped and read by tools is a leaked password
                expected = "no password: the agent never takes one from its config (set it on the host: passwd NAME)"
                at.child(str(key_node.value)).fail(key_node, expected, Described("a password key"))
    problems: list[ConfigError] = []
    entries = mapping(at, node, _ACCOUNTS_KEYS, problems)
    values = each_value(at, entries, _ACCOUNTS_KEYS, problems)
    raise_any(problems)
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


def absolute_path(at: At, node: Node) -> str:
    expected = "an absolute path on one line"
    value = line_text(at, node, expected)
    if not posixpath.isabs(value) or value.endswith("/"):
        at.fail(node, expected + ", naming a file")
    return value


def journald(at: At, node: Node) -> bool | None:
    value = node_value(node)
    if isinstance(value, bool):
        return value
    if value == "auto":
        return None
    at.fail(node, "auto, true or false")


_SYSLOG_TARGET = re.compile(
    r"(udp|tcp)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)(?::([0-9]{1,5}))?/?"
)
_SYSLOG_TARGET_HELP = 'a URL "udp://HOST[:PORT]" or "tcp://HOST[:PORT]" (an IPv6 address in brackets)'


def syslog(at: At, node: Node) -> SyslogConfig | None:
    if is_null(node):
        return None
    entries = mapping(at, node, ("target", "tls", "ca_file", "buffer", "facility"))
    if "target" not in entries:
        at.child("target").fail(node, _SYSLOG_TARGET_HELP, Described("nothing (the key is missing)"))
    target_at, target_node = at.child("target"), entries["target"][1]
    target = line_text(target_at, target_node, _SYSLOG_TARGET_HELP).strip()
    match = _SYSLOG_TARGET.fullmatch(target)
    if not match:
        target_at.fail(target_node, _SYSLOG_TARGET_HELP)
    protocol, host = match[1], match[2]
    if host.startswith("["):
        try:
            host = str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            target_at.fail(target_node, _SYSLOG_TARGET_HELP)
    tls = boolean(at.child("tls"), entries["tls"][1]) if "tls" in entries else False
    if tls and protocol != "tcp":
        at.child("tls").fail(entries["tls"][1], "false with a udp:// target (TLS needs tcp://)", True)
    port = int(match[3]) if match[3] else (6514 if tls else 514)
    if not 1 <= port <= 65535:
        target_at.fail(target_node, _SYSLOG_TARGET_HELP + " with a port 1..65535")
    ca_file = None
    if "ca_file" in entries and not is_null(entries["ca_file"][1]):
        ca_file = absolute_path(at.child("ca_file"), entries["ca_file"][1])
        if not tls:
            at.child("ca_file").fail(entries["ca_file"][1], "null unless tls is true", ca_file)
    buffer = integer(10, 1_000_000)(at.child("buffer"), entries["buffer"][1]) if "buffer" in entries else 1000
    facility = "daemon"
    if "facility" in entries:
        facility = choice(tuple(SYSLOG_FACILITIES))(at.child("facility"), entries["facility"][1])
    return SyslogConfig(target, protocol, host, port, tls, ca_file, buffer, facility)


def prometheus_textfile(at: At, node: Node) -> str | None:
    if is_null(node):
        return None
    expected = "null, or an absolute path of a file ending in .prom (node_exporter reads only those)"
    path = absolute_path(at, node)
    if not path.endswith(".prom") or path.endswith("/.prom"):
        at.fail(node, expected)
    return path

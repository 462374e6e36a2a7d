"""The SSH guard's data: what it observes and wants (SshdObserved, SshdDesired), the drop-ins it renders,
and the few readings of `sshd -T` output that the guard's diff, plan and lockout check share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent import accounts
from agent.controls.base import (
    HeldSetting,
    unified,
)
from agent.controls.ssh.sshd_config import (
    MAIN_CONFIG,
    ConfigGraph,
    Directive,
    include_covers,
    sshd_lines,
)
from agent.paths import SystemRoot

PENALTY_EXEMPT = "PerSourcePenaltyExemptList"
MARKER = "vps-agent"
ACCESS_KEYWORDS = (
    "permitrootlogin",
    "passwordauthentication",
    "pubkeyauthentication",
    "allowusers",
    "denyusers",
    "allowgroups",
    "denygroups",
    "authorizedkeysfile",
    "authenticationmethods",
)
# keywords of ssh.options that can take a way in away: judged by the same lockout check as the rest
CUTTING_OPTIONS = frozenset(ACCESS_KEYWORDS) - {"permitrootlogin", "passwordauthentication"}
SYNONYMS = {"without-password": "prohibit-password"}


def without_exempt(text: str) -> str:
    return "".join(line for line in text.splitlines(True) if not line.startswith(PENALTY_EXEMPT + " "))


def norm(value: str) -> str:
    text = value.strip().strip('"').lower()
    return SYNONYMS.get(text, text)


@dataclass(frozen=True)
class SshdObserved:
    effective: Mapping[str, tuple[str, ...]]
    graph: ConfigGraph
    dropin: bytes | None
    dropin_problem: str | None  # e.g. a symlink planted at the drop-in path
    running: bool | None  # None: not known (a fake root without sshd)
    socket_activated: bool = False  # ssh.socket (Ubuntu 22.10+) owns the listening socket
    socket_dropin: bytes | None = None


@dataclass(frozen=True)
class SshdDesired:
    settings: tuple[tuple[str, str], ...]  # (Keyword, value) in drop-in order
    effective: Mapping[str, tuple[str, ...]]  # lower-case keyword -> values as `sshd -T` prints them
    dropin_text: str
    socket_text: str = ""  # ssh.socket's drop-in, where socket activation is in use
    admin_port: str = "22"  # ssh.port: where the admin logs in once any move is done (for the advice)
    held: tuple[HeldSetting, ...] = ()  # the strict profile's settings that wait (agent/controls/ssh/strict.py)

    def accepts(self, keyword: str, value: str) -> bool:
        """Whether a directive elsewhere agrees with what the agent wants for keyword."""
        wanted = {norm(v) for v in self.effective.get(keyword, ())}
        wanted.update(norm(v) for k, v in self.settings if k.lower() == keyword)
        return norm(value) in wanted


def render_socket_dropin(ports: Sequence[str]) -> str:
    """ssh.socket's drop-in: the unit's own ListenStream= reset, then IPv4 and IPv6 per port (Ubuntu's
    unit binds [::] IPv6-only, so both families are listed)."""
    lines = [
        "# Managed by vps-agent: ssh.socket listens where the SSH guard's port(s) say.",
        "# Change /etc/vps-agent/config.yaml (ssh.port) instead, then run `vps-agentctl reload`.",
        "[Socket]",
        "ListenStream=",
    ]
    for port in ports:
        lines += [f"ListenStream=0.0.0.0:{port}", f"ListenStream=[::]:{port}"]
    return "\n".join(lines) + "\n"


def render_dropin(settings: Sequence[tuple[str, str]]) -> str:
    lines = [
        "# Managed by vps-agent; drift from this file is reverted within milliseconds.",
        "# Change /etc/vps-agent/config.yaml instead, then run `vps-agentctl reload`.",
        "# To edit sshd by hand for a while: `vps-agentctl pause --for 30m ssh`.",
    ]
    lines.extend(f"{keyword} {value}" for keyword, value in settings)
    return "\n".join(lines) + "\n"


def lines_of(graph: ConfigGraph, system_path: str) -> list[str]:
    """The file's lines with their ends, as sshd counts them: a neutralised line keeps its own end."""
    return sshd_lines(graph.text_of(system_path) or "")


def listen_port(address: str) -> str | None:
    if address.startswith("["):
        _, _, rest = address.partition("]")
        return rest[1:] if rest.startswith(":") else None
    if address.count(":") == 1:
        return address.split(":", 1)[1]
    return None


def include_present(root: SystemRoot, graph: ConfigGraph, dropin: str) -> bool:
    """sshd_config itself (outside any Match) has an Include that pulls in the agent's drop-in."""
    return any(
        d.keyword == "include" and d.path == MAIN_CONFIG and not d.in_match and include_covers(root, d, dropin)
        for d in graph.directives
    )


def conflicts(graph: ConfigGraph, desired: SshdDesired, dropin: str) -> list[Directive]:
    """The directives outside the agent's drop-in that contradict what it wants: another Port, a
    ListenAddress with another port, a guarded keyword with another value."""
    guarded = {k.lower() for k, _ in desired.settings}
    ports = {v for k, v in desired.settings if k == "Port"}
    found = []
    for directive in graph.directives:
        if directive.path == dropin:
            continue
        if directive.keyword == "port":
            if directive.first_arg not in ports:
                found.append(directive)
        elif directive.keyword == "listenaddress":
            explicit = listen_port(directive.first_arg)
            if explicit is not None and explicit not in ports:
                found.append(directive)
        elif directive.keyword in guarded and not desired.accepts(directive.keyword, directive.value):
            found.append(directive)
    return found


def wanted_text(desired: SshdDesired, keyword: str) -> str:
    if keyword == "listenaddress":
        keyword = "port"
    for key, value in desired.settings:
        if key.lower() == keyword:
            return f"{key} {value}"
    return keyword


CUT_KEYWORDS = frozenset({"permitrootlogin", "passwordauthentication"})


def policy(
    observed: Mapping[str, tuple[str, ...]], desired: SshdDesired, settings: Mapping[str, str]
) -> accounts.AccessPolicy:
    """Who could log in with these settings of the agent's drop-in on top of the effective config."""
    after = dict(observed)
    for keyword in settings:
        after[keyword] = desired.effective.get(keyword) or (settings[keyword],)
        if keyword == "passwordauthentication":
            after[keyword] = (settings[keyword],)
    return accounts.AccessPolicy(
        permit_root_login=norm(first(after, "permitrootlogin", "prohibit-password")),
        password_authentication=first(after, "passwordauthentication", "yes") == "yes",
        pubkey_authentication=first(after, "pubkeyauthentication", "yes") == "yes",
        authorized_keys_files=after.get("authorizedkeysfile", (".ssh/authorized_keys",))[0].split(),
        allow_users=words(after, "allowusers"),
        deny_users=words(after, "denyusers"),
        allow_groups=words(after, "allowgroups"),
        deny_groups=words(after, "denygroups"),
        authentication_methods=words(after, "authenticationmethods"),
    )


def words(values: Mapping[str, tuple[str, ...]], key: str) -> tuple[str, ...]:
    """sshd -T prints a list keyword once per value, or once with the values separated by spaces."""
    return tuple(word for value in values.get(key, ()) for word in value.split())


def first(values: Mapping[str, tuple[str, ...]], key: str, default: str) -> str:
    found = values.get(key)
    return found[0].lower() if found else default


def same(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    return sorted(norm(x) for x in a) == sorted(norm(x) for x in b)


def effective_diff(observed: SshdObserved, desired: SshdDesired) -> str:
    keys = [k.lower() for k, _ in desired.settings]
    have = "".join(f"{k} {v}\n" for k in keys for v in observed.effective.get(k, ()))
    want = "".join(f"{k} {v}\n" for k in keys for v in desired.effective.get(k, ()))
    return unified(have, want, " sshd -T")


def describe(observed: SshdObserved) -> dict[str, Any]:
    """The few facts `status` shows for the SSH guard."""
    effective = observed.effective
    return {
        "port": " ".join(effective.get("port", ())),
        "permitrootlogin": first(effective, "permitrootlogin", "?"),
        "passwordauthentication": first(effective, "passwordauthentication", "?"),
    }

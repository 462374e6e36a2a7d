"""The SSH guard: sshd's *effective* Port, PermitRootLogin, PasswordAuthentication and listed keywords.

sshd takes the first value it meets and Debian's sshd_config includes sshd_config.d/*.conf first, so
the agent owns a first-sorting drop-in, keeps the Include, and comments out conflicting directives
elsewhere. Truth is `sshd -T`, never one file's text.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent import accounts
from agent.config import Config
from agent.controls.base import (
    Blocked,
    Changes,
    Control,
    Drift,
    DriftItem,
    FileChange,
    ObserveError,
    ReloadOutcome,
    ValidationError,
    WatchSpec,
    unified,
)
from agent.controls.sshd_config import (
    DEFAULT_INCLUDE,
    MAIN_CONFIG,
    ConfigGraph,
    Directive,
    include_covers,
    parse_effective,
    read_graph,
)
from agent.paths import SystemRoot
from agent.system import fs
from agent.system.run import run
from agent.system.services import Service, ServiceManager

SSHD = "/usr/sbin/sshd"
MARKER = "vps-agent"
_ACCESS_KEYWORDS = (
    "permitrootlogin",
    "passwordauthentication",
    "pubkeyauthentication",
    "allowusers",
    "denyusers",
    "allowgroups",
    "denygroups",
    "authorizedkeysfile",
)
_SYNONYMS = {"without-password": "prohibit-password"}


def _norm(value: str) -> str:
    text = value.strip().strip('"').lower()
    return _SYNONYMS.get(text, text)


@dataclass(frozen=True)
class SshdObserved:
    effective: Mapping[str, tuple[str, ...]]
    graph: ConfigGraph
    dropin: bytes | None
    dropin_problem: str | None  # e.g. a symlink planted at the drop-in path
    running: bool | None  # None: not known (a fake root without sshd)


@dataclass(frozen=True)
class SshdDesired:
    settings: tuple[tuple[str, str], ...]  # (Keyword, value) in drop-in order
    effective: Mapping[str, tuple[str, ...]]  # lower-case keyword -> values as `sshd -T` prints them
    dropin_text: str

    def accepts(self, keyword: str, value: str) -> bool:
        """Whether a directive elsewhere agrees with what the agent wants for keyword."""
        wanted = {_norm(v) for v in self.effective.get(keyword, ())}
        wanted.update(_norm(v) for k, v in self.settings if k.lower() == keyword)
        return _norm(value) in wanted


class SshdControl(Control):
    name = "ssh"

    def __init__(self, root: SystemRoot, services: ServiceManager | None = None) -> None:
        super().__init__(root)
        self.services = services or ServiceManager(root)
        self._normalised: dict[tuple[tuple[str, str], ...], Mapping[str, tuple[str, ...]]] = {}

    def enabled(self, config: Config) -> bool:
        return config.ssh.enabled

    def watches(self, config: Config) -> Sequence[WatchSpec]:
        dirs = {self.root.ssh_dir, self.root.sshd_config_d}
        dirs.update(self.root.path(p).parent for p, _ in read_graph(self.root).texts)
        specs = [WatchSpec(d) for d in sorted(dirs)]
        # the lockout invariants: a blocked guard unblocks as soon as an admin gets a way in
        specs.extend(accounts.watches(self.root))
        return specs

    # observe ------------------------------------------------------------------------------------------

    def observe(self) -> SshdObserved:
        self._ensure_privsep_dir()
        graph = read_graph(self.root)
        for path, why in graph.unreadable:
            if path != self._dropin_system_path:
                raise ObserveError(f"{path}: {why}", path)
        dropin, problem = self._read_dropin()
        result = run([SSHD, "-T", "-f", MAIN_CONFIG], timeout=15)
        if result.ok:
            effective = parse_effective(result.stdout)
            return SshdObserved(effective, graph, dropin, problem, self._running(effective))
        error = result.error_text()
        if result.returncode == 127:
            raise ObserveError(f"{SSHD} not found: is openssh-server installed?", MAIN_CONFIG)
        if problem is None and self._dropin_system_path not in error:
            raise ObserveError(f"sshd -T rejects the current configuration: {error}", MAIN_CONFIG)
        # the agent's own drop-in broke sshd's parse (garbage in it, a link to something else): ours to rewrite
        return SshdObserved({}, graph, dropin, problem or f"sshd rejects it: {error}", None)

    def _read_dropin(self) -> tuple[bytes | None, str | None]:
        try:
            return fs.read_regular(self.root.sshd_dropin), None
        except fs.UnsafeFile as exc:
            return None, exc.why
        except IsADirectoryError:
            return None, "is a directory"

    def _running(self, effective: Mapping[str, tuple[str, ...]]) -> bool | None:
        if not self.root.is_host:
            return None
        return self.services.is_running(self._service(effective))

    def _service(self, effective: Mapping[str, tuple[str, ...]] | None = None) -> Service:
        pidfile = (effective or {}).get("pidfile", ("/run/sshd.pid",))[0]
        return Service("ssh.service", pidfile, "sshd", (SSHD,))

    def _ensure_privsep_dir(self) -> None:
        # sshd -t/-T refuse to run without it; systemd creates it only while ssh.service runs.
        if self.root.is_host and not self.root.sshd_privsep_dir.is_dir():
            fs.ensure_dir(self.root.sshd_privsep_dir, 0o755)

    @property
    def _dropin_system_path(self) -> str:
        return self.root.system_name(self.root.sshd_dropin)

    # desired ------------------------------------------------------------------------------------------

    def desired(self, config: Config) -> SshdDesired:
        ssh = config.ssh
        settings: list[tuple[str, str]] = [
            ("Port", str(ssh.port)),
            ("PermitRootLogin", ssh.permit_root_login),
            ("PasswordAuthentication", "yes" if ssh.password_authentication else "no"),
        ]
        settings.extend((k, v) for k, v in ssh.options)
        frozen = tuple(settings)
        return SshdDesired(frozen, self._normalise(frozen), render_dropin(frozen))

    def _normalise(self, settings: tuple[tuple[str, str], ...]) -> Mapping[str, tuple[str, ...]]:
        """The values as `sshd -T` will print them (1m -> 60, prohibit-password -> without-password)."""
        if settings in self._normalised:
            return self._normalised[settings]
        argv = [SSHD, "-T", "-f", "/dev/null"]
        for keyword, value in settings:
            argv += ["-o", f"{keyword}={value}"]
        self._ensure_privsep_dir()
        result = run(argv, timeout=15)
        if not result.ok:
            raise ValidationError(f"sshd rejects the configured ssh settings: {result.error_text()}")
        printed = parse_effective(result.stdout)
        wanted = {k.lower() for k, _ in settings}
        normalised = {k: v for k, v in printed.items() if k in wanted or k in _ACCESS_KEYWORDS}
        self._normalised[settings] = normalised
        return normalised

    # diff ---------------------------------------------------------------------------------------------

    def diff(self, observed: SshdObserved, desired: SshdDesired) -> Drift | None:
        items: list[DriftItem] = []
        dropin_path = self._dropin_system_path
        for keyword, _ in desired.settings:
            key = keyword.lower()
            want = desired.effective.get(key, ())
            have = observed.effective.get(key, ())
            if {_norm(v) for v in want} != {_norm(v) for v in have}:
                items.append(DriftItem(key, "effective", " ".join(want), " ".join(have) or "(unset)"))
        if observed.dropin_problem:
            items.append(DriftItem("agent drop-in", dropin_path, "a regular file", observed.dropin_problem))
        elif observed.dropin is None:
            items.append(DriftItem("agent drop-in", dropin_path, "present", "missing"))
        elif observed.dropin.decode("utf-8", "replace") != desired.dropin_text:
            items.append(DriftItem("agent drop-in", dropin_path, "the agent's content", "modified"))
        if not self._include_present(observed.graph):
            items.append(DriftItem("include", MAIN_CONFIG, f"Include {DEFAULT_INCLUDE}", "missing"))
        for directive in self._conflicts(observed.graph, desired):
            items.append(
                DriftItem(
                    directive.keyword,
                    directive.path,
                    _wanted_text(desired, directive.keyword),
                    directive.value,
                    directive.line,
                )
            )
        if observed.running is False:
            items.append(DriftItem("sshd", "service", "running", "not running"))
        if not items:
            return None
        return Drift(self.name, tuple(items), _effective_diff(observed, desired))

    def _include_present(self, graph: ConfigGraph) -> bool:
        return any(
            d.keyword == "include"
            and d.path == MAIN_CONFIG
            and not d.in_match
            and include_covers(self.root, d, self._dropin_system_path)
            for d in graph.directives
        )

    def _conflicts(self, graph: ConfigGraph, desired: SshdDesired) -> list[Directive]:
        guarded = {k.lower() for k, _ in desired.settings}
        port = next(v for k, v in desired.settings if k == "Port")
        conflicts = []
        for directive in graph.directives:
            if directive.path == self._dropin_system_path:
                continue
            if directive.keyword == "port":
                if directive.first_arg != port:
                    conflicts.append(directive)
            elif directive.keyword == "listenaddress":
                explicit = _listen_port(directive.first_arg)
                if explicit is not None and explicit != port:
                    conflicts.append(directive)
            elif directive.keyword in guarded and not desired.accepts(directive.keyword, directive.value):
                conflicts.append(directive)
        return conflicts

    # plan ---------------------------------------------------------------------------------------------

    def plan(self, observed: SshdObserved, desired: SshdDesired, drift: Drift) -> Changes:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        edits: dict[str, list[str]] = {}
        notes: list[str] = []
        for directive in self._conflicts(observed.graph, desired):
            lines = edits.setdefault(directive.path, _lines_of(observed.graph, directive.path))
            original = lines[directive.line - 1]
            wanted = _wanted_text(desired, directive.keyword)
            lines[directive.line - 1] = (
                f"# [{MARKER} {stamp}] neutralised, the agent keeps {wanted}: {original.strip()}"
            )
            notes.append(f"comment out {directive.path}:{directive.line} ({original.strip()})")
        if not self._include_present(observed.graph):
            lines = edits.setdefault(MAIN_CONFIG, _lines_of(observed.graph, MAIN_CONFIG))
            at = _first_directive_index(lines)
            lines[at:at] = [
                f"# [{MARKER} {stamp}] Include restored: the agent's settings live in sshd_config.d",
                f"Include {DEFAULT_INCLUDE}",
            ]
            notes.append(f"restore 'Include {DEFAULT_INCLUDE}' at the top of {MAIN_CONFIG}")
        files: list[FileChange] = []
        diffs: list[str] = []
        for system_path in edits:
            if self.root.path(system_path).is_symlink():
                raise fs.UnsafeFile(
                    self.root.path(system_path),
                    "is a symlink; the agent edits files in place and does not follow links",
                )
        for system_path, lines in edits.items():
            before = observed.graph.text_of(system_path) or ""
            after = "\n".join(lines) + "\n"
            files.append(FileChange(self.root.path(system_path), system_path, after.encode(), None, "neutralise"))
            diffs.append(unified(before, after, system_path))
        current = observed.dropin.decode("utf-8", "replace") if observed.dropin is not None else ""
        if observed.dropin_problem or current != desired.dropin_text:
            files.insert(
                0,
                FileChange(
                    self.root.sshd_dropin, self._dropin_system_path, desired.dropin_text.encode(), 0o644, "drop-in"
                ),
            )
            diffs.insert(0, unified(current, desired.dropin_text, self._dropin_system_path))
            notes.insert(0, f"write {self._dropin_system_path}")
        if observed.running is False:
            notes.append("start ssh.service")
        return Changes(tuple(files), tuple(notes), "".join(diffs))

    # preconditions ------------------------------------------------------------------------------------

    def preconditions(self, observed: SshdObserved, desired: SshdDesired) -> Blocked | None:
        """Tightening login rules needs a way in that survives it: a sudo user (or root) who can log in."""
        after = dict(observed.effective)
        after.update(desired.effective)
        if all(_same(observed.effective.get(k, ()), after.get(k, ())) for k in _ACCESS_KEYWORDS):
            return None
        policy = accounts.AccessPolicy(
            permit_root_login=_norm(_first(after, "permitrootlogin", "prohibit-password")),
            password_authentication=_first(after, "passwordauthentication", "yes") == "yes",
            pubkey_authentication=_first(after, "pubkeyauthentication", "yes") == "yes",
            authorized_keys_files=after.get("authorizedkeysfile", (".ssh/authorized_keys",))[0].split(),
            allow_users=after.get("allowusers", ()),
            deny_users=after.get("denyusers", ()),
            allow_groups=after.get("allowgroups", ()),
            deny_groups=after.get("denygroups", ()),
        )
        facts = accounts.read_facts(self.root)
        ways, problems = accounts.ways_to_root(self.root, facts, policy)
        if ways:
            return None
        password = "yes" if policy.password_authentication else "no"
        rules = f"PermitRootLogin {policy.permit_root_login}, PasswordAuthentication {password}"
        return Blocked((f"applying {rules} would leave no way to get root over SSH",) + tuple(problems))

    # validate / reload --------------------------------------------------------------------------------

    def validate(self, changes: Changes) -> SshdObserved:
        """sshd's own check of the written config. `sshd -T` is its extended test mode: every check of
        `sshd -t`, plus the effective config, which serves as the transaction's observe-again (the
        reload does not change what the files say) and saves a third sshd run per heal."""
        self._ensure_privsep_dir()
        result = run([SSHD, "-T", "-f", MAIN_CONFIG], timeout=15)
        if not result.ok:
            raise ValidationError(f"sshd test mode (sshd -T) rejects it: {result.error_text()}")
        dropin, problem = self._read_dropin()
        # running stays unknown here: the reload that follows starts sshd when it was down
        return SshdObserved(parse_effective(result.stdout), read_graph(self.root), dropin, problem, None)

    def reload(self) -> ReloadOutcome:
        outcome = self.services.reload(self._service())
        return ReloadOutcome(outcome.ok, outcome.detail, {"service_action": outcome.action})

    def facts(self, observed: SshdObserved) -> dict[str, Any]:
        return describe(observed)


def render_dropin(settings: Sequence[tuple[str, str]]) -> str:
    lines = [
        "# Managed by vps-agent; drift from this file is reverted within milliseconds.",
        "# Change /etc/vps-agent/config.yaml instead, then run `vps-agentctl reload`.",
        "# To edit sshd by hand for a while: `vps-agentctl pause --for 30m ssh`.",
    ]
    lines.extend(f"{keyword} {value}" for keyword, value in settings)
    return "\n".join(lines) + "\n"


def _lines_of(graph: ConfigGraph, system_path: str) -> list[str]:
    return (graph.text_of(system_path) or "").splitlines()


def _first_directive_index(lines: list[str]) -> int:
    for index, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#"):
            return index
    return len(lines)


def _listen_port(address: str) -> str | None:
    if address.startswith("["):
        _, _, rest = address.partition("]")
        return rest[1:] if rest.startswith(":") else None
    if address.count(":") == 1:
        return address.split(":", 1)[1]
    return None


def _wanted_text(desired: SshdDesired, keyword: str) -> str:
    if keyword == "listenaddress":
        keyword = "port"
    for key, value in desired.settings:
        if key.lower() == keyword:
            return f"{key} {value}"
    return keyword


def _first(values: Mapping[str, tuple[str, ...]], key: str, default: str) -> str:
    found = values.get(key)
    return found[0].lower() if found else default


def _same(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    return sorted(_norm(x) for x in a) == sorted(_norm(x) for x in b)


def _effective_diff(observed: SshdObserved, desired: SshdDesired) -> str:
    keys = [k.lower() for k, _ in desired.settings]
    have = "".join(f"{k} {v}\n" for k in keys for v in observed.effective.get(k, ()))
    want = "".join(f"{k} {v}\n" for k in keys for v in desired.effective.get(k, ()))
    return unified(have, want, " sshd -T")


def describe(observed: SshdObserved) -> dict[str, Any]:
    """The few facts `status` shows for the SSH guard."""
    effective = observed.effective
    return {
        "port": " ".join(effective.get("port", ())),
        "permitrootlogin": _first(effective, "permitrootlogin", "?"),
        "passwordauthentication": _first(effective, "passwordauthentication", "?"),
    }

"""The fail2ban guard: the sshd jail enabled, on the SSH port(s), with the configured limits, running.

fail2ban reads jail.conf < jail.d/*.conf < jail.local < jail.d/*.local, each group in name order, a
later value winning. The agent owns jail.d/zz-vps-agent.local (read last but for names sorting
after it) and comments out a guarded key of the sshd jail in any .local that sorts after it. Truth
is `fail2ban-client -d`, the parsed configuration fail2ban itself would load, never one file's text.
"""

from __future__ import annotations

import ast
import datetime
import ipaddress
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent import accounts
from agent.config import Config, parse_duration
from agent.controls.base import (
    Blocked,
    Changes,
    CommandChange,
    Control,
    Drift,
    DriftItem,
    FileChange,
    Invocation,
    ObserveError,
    ReloadOutcome,
    ValidationError,
    WatchSpec,
    unified,
)
from agent.controls.firewall import ssh_ports
from agent.controls.jail_lines import Assignment, assignments, line_end, split_lines
from agent.paths import AGENT_JAIL_NAME, SystemRoot
from agent.portmove import PortMoves
from agent.sshd_ports import SshdPorts
from agent.system import apt, dpkg, fs, netfilter
from agent.system.netfilter import Backend
from agent.system.run import run
from agent.system.services import ServiceManager

CLIENT = "fail2ban-client"
PACKAGE = "fail2ban"
JAIL = "sshd"
UNIT = "fail2ban.service"
MARKER = "vps-agent"
# the keys the agent guards in [sshd], in the order its file sets them
KEYS = (
    "enabled",
    "port",
    "maxretry",
    "findtime",
    "bantime",
    "ignoreip",
    "banaction",
    "backend",
    "journalmatch",
    "mode",
)
# With the journal backend, only what sshd's own unit logged as root counts (the key-login proof's door,
# agent/system/journal.py): the filter's stock match, `_SYSTEMD_UNIT=sshd.service + _COMM=sshd`, is an OR
# that misses OpenSSH 9.8+'s `sshd-session` in Debian's ssh.service (Debian 13: nothing ever banned) and
# takes any process named sshd writing to /dev/log (a local user getting any address banned).
# journald learns _SYSTEMD_UNIT and _COMM from /proc, which a short-lived preauth process has often left by then
# (seen on a booted Debian 12: the guesser's `Connection closed ... [preauth]` lines carry _UID=0 alone); _UID
# comes from the socket's credentials, always there and unforgeable by another user: root's sshd lines count.
JOURNALMATCH = (
    "_SYSTEMD_UNIT=ssh.service _UID=0 + _SYSTEMD_UNIT=sshd.service _UID=0"
    " + SYSLOG_IDENTIFIER=sshd _UID=0 + SYSLOG_IDENTIFIER=sshd-session _UID=0"
)
# After a start or reload the server adds the jail's actions a moment after the jail itself (fail2ban 1.1
# answered `No actions for jail sshd` right after a reload): a heal is done once the jail can ban.
ACTIONS_WAIT = 15.0  # seconds
# Debian's sshd filter in `mode = normal` does not count `Connection closed by authenticating user root A port
# P [preauth]`, all a password guesser leaves once sshd takes no passwords; `aggressive` (ddos + extra)
# does. The dump has no mode: its failregex that counts those closes as failures tells it.
# 1.0.2: ^<F-MLFFORGET>(Connection (?:closed|reset)|Disconnected)..., 1.1.0: ^<F-MLFFORGET>(?:Connection ...;
# in normal mode the same line is wrapped in <F-NOFAIL>
_COUNTS_PREAUTH_CLOSE = re.compile(r"\^<F-MLFFORGET>\((?:\?:)?Connection \(\?:closed\|reset\)")


def banaction_for(backend: Backend) -> str:
    """Bans must land in the firewall the system uses: native nftables, or iptables (-nft or -legacy)."""
    return "nftables-multiport" if backend.name == "nftables" else "iptables-multiport"


@dataclass(frozen=True)
class JailFile:
    """One .local that fail2ban reads after the agent's file."""

    system_path: str
    text: str


@dataclass(frozen=True)
class Fail2banObserved:
    effective: dict[str, str] | None  # the sshd jail's guarded keys per `fail2ban-client -d`; None: jail off
    agent_file: bytes | None
    agent_file_problem: str | None
    later: tuple[JailFile, ...]  # jail.d/*.local sorting after the agent's file
    jail_conf: bytes | None  # for the one-time jail.conf.orig copy
    running: bool | None  # None: not known (a fake root: fail2ban is never started there)
    banned: int | None = None  # `fail2ban-client status sshd`: currently banned
    installed: bool = True  # False only where the guard may install it (fail2ban.install, the host)
    runtime_ignore: tuple[str, ...] | None = None  # the running jail's ignore list (None: not asked)
    banned_ips: tuple[str, ...] = ()
    # live SSH sessions of sudo admins (logind), whose addresses the running jail must ignore; None: unknown
    admin_sessions: tuple[accounts.SshSession, ...] | None = None


@dataclass(frozen=True)
class Fail2banDesired:
    effective: dict[str, str]  # key -> value as `fail2ban-client -d` prints it
    text: str  # the agent's jail file


def render_jail(values: dict[str, str]) -> str:
    lines = [
        "# Managed by vps-agent; drift from this file is reverted within milliseconds.",
        "# Change /etc/vps-agent/config.yaml (fail2ban:) instead, then run `vps-agentctl reload`.",
        "# To edit fail2ban by hand for a while: `vps-agentctl pause --for 30m fail2ban`.",
        f"[{JAIL}]",
    ]
    lines.extend(f"{key} = {values[key]}" for key in KEYS if key in values)
    return "\n".join(lines) + "\n"


def parse_dump(text: str, jail: str = JAIL) -> dict[str, str] | None:
    """`fail2ban-client -d` prints one Python literal per command the server would get; the jail's
    guarded keys from them. None: the jail is not started (disabled)."""
    values: dict[str, str] = {}
    started = False
    for line in text.splitlines():
        if not line.startswith("["):
            continue
        try:
            command = ast.literal_eval(line)
        except (ValueError, SyntaxError):
            continue
        if not isinstance(command, list) or len(command) < 2 or command[1] != jail:
            continue
        verb = command[0]
        if verb == "add" and len(command) > 2:
            values["backend"] = str(command[2])
        elif verb == "start":
            started = True
        elif verb == "set" and len(command) > 3:
            key = command[2]
            if key in ("maxretry", "findtime", "bantime"):
                values[key] = str(command[3])
            elif key == "addignoreip":
                values["ignoreip"] = " ".join(str(a) for a in command[3:])
            elif key == "addjournalmatch":
                match = " ".join(str(a) for a in command[3:])
                values["journalmatch"] = f"{values['journalmatch']} + {match}" if "journalmatch" in values else match
            elif key == "addaction" and "banaction" not in values:
                values["banaction"] = str(command[3])
        elif verb in ("multi-set", "set") and len(command) > 3 and command[2] == "addfailregex":
            regexes = command[3] if isinstance(command[3], list) else command[3:]
            counts = any(_COUNTS_PREAUTH_CLOSE.match(str(r)) for r in regexes)
            values["mode"] = "aggressive" if counts or values.get("mode") == "aggressive" else "normal"
        elif verb == "multi-set" and len(command) > 4 and command[2] == "action":
            params = {p[0]: p[1] for p in command[4] if isinstance(p, list) and len(p) == 2}
            if command[3] == values.get("banaction") and "port" in params:
                values["port"] = str(params["port"])
    if not started:
        return None
    values["enabled"] = "true"
    values.setdefault("ignoreip", "")
    return values


def parse_actions(text: str) -> list[str]:
    """`fail2ban-client get sshd actions`: "The jail sshd has the following actions:" then the names, comma
    separated; `No actions for jail sshd` while there are none."""
    lines = text.strip().splitlines()
    if not lines or not lines[0].startswith("The jail "):
        return []
    return [name.strip() for line in lines[1:] for name in line.split(",") if name.strip()]


def wait_until_banning(timeout: float | None = None, pause: float = 0.2) -> str | None:
    """Wait for the running sshd jail to have its ban action; None once it has, else what was last seen."""
    timeout = ACTIONS_WAIT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while True:
        result = run([CLIENT, "get", JAIL, "actions"], timeout=15)
        if result.ok and parse_actions(result.stdout):
            return None
        if time.monotonic() >= deadline:
            seen = (result.stdout.strip() or result.error_text()) if result.ok else result.error_text()
            return f"the {JAIL} jail has no ban action {timeout:g}s later ({seen})"
        time.sleep(pause)


def parse_status(text: str) -> int | None:
    """`fail2ban-client status sshd` -> how many addresses are banned now."""
    match = re.search(r"Currently banned:\s*(\d+)", text)
    return int(match.group(1)) if match else None


def parse_banned_ips(text: str) -> tuple[str, ...]:
    """`fail2ban-client status sshd` -> the addresses banned now."""
    match = re.search(r"Banned IP list:[ \t]*(.*)", text)
    return tuple(match.group(1).split()) if match else ()


def parse_ignore_list(text: str) -> tuple[str, ...]:
    """`fail2ban-client get sshd ignoreip`: "These IP addresses/networks are ignored:" then one `|- A` per
    entry (the last `` `- A``), or "No IP address/network is ignored"."""
    return tuple(line.strip()[2:].strip() for line in text.splitlines() if line.strip()[:2] in ("|-", "`-"))


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def _ignored(address: str, entries: Sequence[str]) -> bool:
    """Whether an ignore list (addresses, networks, names) already covers address."""
    wanted = _network(address)
    for entry in entries:
        network = _network(entry)
        if entry == address:
            return True
        if wanted is not None and network is not None and wanted.version == network.version:
            if wanted.subnet_of(network):  # type: ignore[arg-type]
                return True
    return False


def overrides(text: str, jail: str = JAIL) -> list[Assignment]:
    """Every guarded key set in [jail] in one file's text, where fail2ban's parser reads it."""
    return [a for a in assignments(text) if a.section == jail and a.key in KEYS]


class Fail2banControl(Control):
    name = "fail2ban"

    def __init__(
        self,
        root: SystemRoot,
        services: ServiceManager | None = None,
        listening_ports: Callable[[], frozenset[int]] | None = None,
        detect_backend: Callable[[], Backend] = netfilter.detect_backend,
        moves: PortMoves | None = None,
        password_logins: Callable[[Config], bool | None] = lambda config: None,
    ) -> None:
        super().__init__(root)
        self.moves = moves or PortMoves(root)
        # whether sshd takes passwords (None: unknown): what the SSH guard holds it to, or the effective setting
        self._password_logins = password_logins
        self._files_changed = True  # the transaction in flight rewrites a file: fail2ban must reload
        self._keep_ignored: tuple[str, ...] = ()  # live admin sessions' addresses, to add again after a reload
        self._renames_action = ""  # "old -> new" when the transaction in flight changes the ban action's name
        self._sessions_seen: tuple[accounts.SshSession, ...] | None = None  # for a heal's facts (-t -d has none)
        self.services = services or ServiceManager(root)
        self._listening_ports = listening_ports or SshdPorts(root)  # agent/sshd_ports.py
        self._detect_backend = detect_backend
        self._backend: Backend | None = None
        self._install = False  # from the config desired() last saw: observe() takes no config
        self._after_reload: tuple[bool, int | None] | None = None  # (running, banned) the last reload saw

    def enabled(self, config: Config) -> bool:
        return config.fail2ban.enabled

    def watches(self, config: Config) -> Sequence[WatchSpec]:
        names = frozenset({"jail.conf", "jail.local", "jail.d", "fail2ban.conf", "fail2ban.local"})
        return (
            WatchSpec(self.root.fail2ban_dir, names),
            WatchSpec(self.root.fail2ban_jail_d),
            # logind's session files: a sudo admin's SSH login or logout changes what the jail ignores
            WatchSpec(self.root.logind_sessions),
            # the jail's mode follows sshd's PasswordAuthentication (the SSH guard's own heals trigger
            # fail2ban through the engine; these catch a hand edit while the SSH guard is off)
            WatchSpec(self.root.ssh_dir, frozenset({"sshd_config", "sshd_config.d"})),
            WatchSpec(self.root.sshd_config_d),
            # the server removes its socket when it stops, and systemd removes /run/fail2ban
            # (RuntimeDirectory=) when it crashes or is killed: noticed at once, no poll needed
            WatchSpec(self.root.fail2ban_run_dir, frozenset({"fail2ban.sock"})),
        )

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = self._detect_backend()
        return self._backend

    @property
    def _agent_system_path(self) -> str:
        return self.root.system_name(self.root.fail2ban_agent_jail)

    # observe ------------------------------------------------------------------------------------------

    def observe(self) -> Fail2banObserved:
        self._after_reload = None
        agent_file, problem = self._read_agent_file()
        later = self._later_files()
        jail_conf = fs.read_regular(self.root.fail2ban_dir / "jail.conf")
        result = run([CLIENT, "-d"], timeout=30)
        if result.returncode == 127:
            if not self._install:
                raise ObserveError(f"fail2ban is not installed ({CLIENT} not found): {self._not_installing()}")
            return Fail2banObserved(None, agent_file, problem, later, jail_conf, False, installed=False)
        if result.ok:
            effective = parse_dump(result.stdout)
        elif problem is None and AGENT_JAIL_NAME not in result.error_text():
            raise ObserveError(f"fail2ban-client -d rejects the current configuration: {result.error_text()}")
        else:
            # the agent's own file broke fail2ban's parse: ours to rewrite
            effective, problem = None, problem or f"fail2ban rejects it: {result.error_text()}"
        running = self.services.is_active(UNIT)
        banned: int | None = None
        banned_ips: tuple[str, ...] = ()
        runtime_ignore: tuple[str, ...] | None = None
        sessions: tuple[accounts.SshSession, ...] | None = None
        if running and effective is not None:
            status = run([CLIENT, "status", JAIL], timeout=15)
            if status.ok:
                banned, banned_ips = parse_status(status.stdout), parse_banned_ips(status.stdout)
            ignore = run([CLIENT, "get", JAIL, "ignoreip"], timeout=15)
            runtime_ignore = parse_ignore_list(ignore.stdout) if ignore.ok else None
            found = accounts.admin_sessions(self.root, accounts.read_facts(self.root))
            sessions = tuple(found) if found is not None else None
        self._sessions_seen = sessions
        return Fail2banObserved(
            effective,
            agent_file,
            problem,
            later,
            jail_conf,
            running,
            banned,
            True,
            runtime_ignore,
            banned_ips,
            sessions,
        )

    def _not_installing(self) -> str:
        if not self.root.is_host:
            return "a fake root: the agent never installs packages there"
        return "fail2ban.install is false: install it with `apt-get install fail2ban`"

    def _read_agent_file(self) -> tuple[bytes | None, str | None]:
        try:
            return fs.read_regular(self.root.fail2ban_agent_jail), None
        except fs.UnsafeFile as exc:
            return None, exc.why
        except IsADirectoryError:
            return None, "is a directory"

    def _later_files(self) -> tuple[JailFile, ...]:
        try:
            names = sorted(p.name for p in self.root.fail2ban_jail_d.iterdir())
        except FileNotFoundError:
            return ()
        later = []
        for name in names:
            if name.endswith(".local") and name > AGENT_JAIL_NAME:
                path = self.root.fail2ban_jail_d / name
                text = fs.read_text(path)
                if text is not None:
                    later.append(JailFile(self.root.system_name(path), text))
        return tuple(later)

    # desired ------------------------------------------------------------------------------------------

    def desired(self, config: Config) -> Fail2banDesired:
        f2b = config.fail2ban
        self._install = f2b.install and self.root.is_host
        values = {
            "enabled": "true",
            "port": ",".join(str(p) for p in ssh_ports(config, self._listening_ports(), self.moves)),
            "maxretry": str(f2b.maxretry),
            "findtime": _seconds(f2b.findtime),
            "bantime": _seconds(f2b.bantime),
            "ignoreip": " ".join(f2b.ignoreip),
            "banaction": banaction_for(self.backend),
        }
        if not self.root.auth_log.exists():
            values["backend"] = "systemd"  # Debian 12 logs to the journal only: no auth.log to read
            values["journalmatch"] = JOURNALMATCH
        if self._password_logins(config) is False:
            values["mode"] = "aggressive"  # with passwords on, the admin's own choice of mode stays
        return Fail2banDesired(values, render_jail(values))

    # diff ---------------------------------------------------------------------------------------------

    def diff(self, observed: Fail2banObserved, desired: Fail2banDesired) -> Drift | None:
        items: list[DriftItem] = []
        if not observed.installed:
            items.append(DriftItem("fail2ban", "package", "installed", "not installed"))
        have = observed.effective or {}
        for key, want in desired.effective.items():
            actual = have.get(key, "false" if key == "enabled" else "(unset)")
            if not _agrees(key, actual, want):
                items.append(DriftItem(key, f"effective [{JAIL}]", want, actual))
        path = self._agent_system_path
        if observed.agent_file_problem:
            items.append(DriftItem("agent jail file", path, "a regular file", observed.agent_file_problem))
        elif observed.agent_file is None:
            items.append(DriftItem("agent jail file", path, "present", "missing"))
        elif observed.agent_file.decode("utf-8", "replace") != desired.text:
            items.append(DriftItem("agent jail file", path, "the agent's content", "modified"))
        for jail_file, found in self._conflicts(observed, desired):
            items.append(
                DriftItem(found.key, jail_file.system_path, desired.effective[found.key], found.value, found.line)
            )
        if observed.running is False:
            items.append(DriftItem("fail2ban", "service", "active", "not active"))
        for _address, expected, actual in self._runtime_drift(observed, desired):
            items.append(
                DriftItem("ignoreip (live admin session)", f"running [{JAIL}]", expected, actual, damped=False)
            )
        if observed.jail_conf is not None and not self.root.fail2ban_jail_conf_orig.exists():
            # the guide's first step, taken as soon as there is a jail.conf (e.g. right after the install)
            orig = self.root.system_name(self.root.fail2ban_jail_conf_orig)
            items.append(DriftItem("jail.conf backup", orig, "kept", "not taken yet"))
        if not items:
            return None
        return Drift(self.name, tuple(items), _effective_diff(observed, desired))

    def _runtime_drift(self, observed: Fail2banObserved, desired: Fail2banDesired) -> list[tuple[str, str, str]]:
        """(address, expected, actual) for the running jail's ignore list: every live sudo admin session's
        address ignored (and not banned); a single address the agent added once its session is gone, out."""
        if observed.runtime_ignore is None or observed.admin_sessions is None:
            return []
        configured = desired.effective["ignoreip"].split()
        live = list(dict.fromkeys(session.address for session in observed.admin_sessions))
        found = []
        for address in live:
            if address in observed.banned_ips:
                found.append((address, f"{address} not banned (a live admin session)", "banned"))
            if not _ignored(address, observed.runtime_ignore):
                found.append((address, f"{address} ignored (a live admin session)", "not ignored"))
        for entry in observed.runtime_ignore:
            network = _network(entry)
            single = network is not None and network.num_addresses == 1
            if single and not _ignored(entry, configured) and entry not in live:
                found.append((entry, f"{entry} not ignored (its admin session has ended)", "ignored"))
        return found

    def _conflicts(self, observed: Fail2banObserved, desired: Fail2banDesired) -> list[tuple[JailFile, Assignment]]:
        return [
            (jail_file, found)
            for jail_file in observed.later
            for found in overrides(jail_file.text)
            if found.key in desired.effective and not _agrees(found.key, found.value, desired.effective[found.key])
        ]

    # plan ---------------------------------------------------------------------------------------------

    def plan(self, observed: Fail2banObserved, desired: Fail2banDesired, drift: Drift) -> Changes:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        files: list[FileChange] = []
        notes: list[str] = []
        diffs: list[str] = []
        if observed.jail_conf is not None and not self.root.fail2ban_jail_conf_orig.exists():
            orig = self.root.fail2ban_jail_conf_orig
            files.append(FileChange(orig, self.root.system_name(orig), observed.jail_conf, 0o600, "jail.conf.orig"))
            notes.append(f"keep the original jail.conf as {self.root.system_name(orig)}")
        current = observed.agent_file.decode("utf-8", "replace") if observed.agent_file is not None else ""
        if observed.agent_file_problem or current != desired.text:
            path = self._agent_system_path
            files.append(FileChange(self.root.fail2ban_agent_jail, path, desired.text.encode(), 0o644, "jail file"))
            diffs.append(unified(current, desired.text, path))
            notes.append(f"write {path}")
        edits: dict[str, tuple[JailFile, list[str]]] = {}
        for jail_file, found in self._conflicts(observed, desired):
            # every line of the file keeps its own bytes and line end (CRLF too); only the key's lines change
            _, lines = edits.setdefault(jail_file.system_path, (jail_file, split_lines(jail_file.text)))
            wanted = f"{found.key} = {desired.effective[found.key]}"
            line = lines[found.line - 1]
            lines[found.line - 1] = (
                f"# [{MARKER} {stamp}] neutralised, the agent keeps {wanted}: {line.strip()}{line_end(line) or chr(10)}"
            )
            for number in found.continued:  # a value continued on indented lines goes with its key
                line = lines[number - 1]
                lines[number - 1] = f"# [{MARKER}] {line.strip()}{line_end(line) or chr(10)}"
            notes.append(f"comment out {jail_file.system_path}:{found.line} ({found.key} = {found.value})")
        for system_path, (jail_file, lines) in edits.items():
            real = self.root.path(system_path)
            if real.is_symlink():
                raise fs.UnsafeFile(real, "is a symlink; the agent edits files in place and does not follow links")
            after = "".join(lines)
            files.append(FileChange(real, system_path, after.encode(), None, "neutralise"))
            diffs.append(unified(jail_file.text, after, system_path))
        commands: list[CommandChange] = []
        if not observed.installed:
            # after the jail file: the package's postinst starts fail2ban with the agent's jail already
            for step in apt.install_steps(
                [PACKAGE], repair=dpkg.needs_repair(self.root), via_systemd=apt.via_systemd(self.root)
            ):
                apply = Invocation(step.argv, env=step.env, timeout=step.timeout)
                commands.append(CommandChange(apply, None, reason=f"install {PACKAGE}"))
            notes.append(f"install {PACKAGE} (apt-get install --no-install-recommends {PACKAGE})")
        if observed.running is False:
            notes.append(f"start {UNIT}")
        for address, expected, _ in self._runtime_drift(observed, desired):
            if expected.endswith("not banned (a live admin session)"):
                verb, undo = "unbanip", None
            elif expected.endswith("ignored (a live admin session)"):
                verb, undo = "addignoreip", "delignoreip"
            else:
                verb, undo = "delignoreip", "addignoreip"
            apply = Invocation((CLIENT, "set", JAIL, verb, address), timeout=15)
            back = Invocation((CLIENT, "set", JAIL, undo, address), timeout=15) if undo else None
            commands.append(CommandChange(apply, back, reason=expected))
            notes.append(f"fail2ban-client set {JAIL} {verb} {address} ({expected})")
        self._files_changed = bool(files) or not observed.installed or observed.running is False
        was = (observed.effective or {}).get("banaction", "")
        want = desired.effective.get("banaction", "")
        self._renames_action = f"{was} -> {want}" if files and was and want and was != want else ""
        sessions = observed.admin_sessions or ()
        self._keep_ignored = tuple(dict.fromkeys(session.address for session in sessions))
        return Changes(tuple(files), tuple(notes), "".join(diffs), tuple(commands))

    # preconditions ------------------------------------------------------------------------------------

    def preconditions(self, observed: Fail2banObserved, desired: Fail2banDesired) -> Blocked | None:
        return None  # a jail bans attackers, never the way in that ignoreip keeps open

    # validate / reload --------------------------------------------------------------------------------

    def validate(self, changes: Changes) -> Fail2banObserved:
        """fail2ban's config test, which with -d also prints the configuration it tested: that serves as
        the transaction's observe-again and saves a third fail2ban-client run (~60 ms) per heal. With -d
        a jail's missing log file is not an error (the sshd jail reads the journal where there is none)."""
        result = run([CLIENT, "-t", "-d"], timeout=30)
        if not result.ok:
            raise ValidationError(f"fail2ban's config test (fail2ban-client -t) rejects it: {result.error_text()}")
        agent_file, problem = self._read_agent_file()
        jail_conf = fs.read_regular(self.root.fail2ban_dir / "jail.conf")
        # running stays unknown here: the reload that follows starts fail2ban when it was down
        return Fail2banObserved(parse_dump(result.stdout), agent_file, problem, self._later_files(), jail_conf, None)

    def reload(self) -> ReloadOutcome:
        if not self._files_changed:
            # only the running jail's ignore list changed (fail2ban-client set ...): a reload would undo it
            return ReloadOutcome(True, "the running sshd jail's ignore list updated; no reload needed")
        if not self.root.is_host:
            return ReloadOutcome(True, "a fake root: fail2ban is never started or reloaded")
        if not self.services.is_active(UNIT):
            started = self.services.enable_now(UNIT)
            self._after_reload = (started.ok, None)
            if started.ok and self.services.use_systemd:
                problem = wait_until_banning()
                if problem:
                    return ReloadOutcome(False, f"{started.detail}: {problem}", {"service_action": started.action})
            return ReloadOutcome(started.ok, started.detail, {"service_action": started.action})
        if self._renames_action:
            # fail2ban 1.1's reload (Debian 13) drops the old ban action and never adds the renamed one:
            # `No actions for jail sshd`, nothing banned, until a restart. Bans outlive it (fail2ban's db).
            outcome = self._restart(f"the ban action changes: {self._renames_action}")
        else:
            result = run([CLIENT, "reload"], timeout=60)
            if not result.ok:
                return ReloadOutcome(False, f"fail2ban-client reload: {result.error_text()}")
            problem = wait_until_banning()
            outcome = ReloadOutcome(True, "fail2ban-client reload", {"service_action": "reload"})
            if problem:  # whatever the cause, a restart is what gives the jail its action back
                outcome = self._restart(f"fail2ban-client reload: {problem}")
        if not outcome.ok:
            return outcome
        status = run([CLIENT, "status", JAIL], timeout=15)
        if not status.ok:
            return ReloadOutcome(False, f"the {JAIL} jail does not run after the reload: {status.error_text()}")
        self._after_reload = (True, parse_status(status.stdout))
        for address in self._keep_ignored:  # the reload reset the running jail's ignore list to the files'
            run([CLIENT, "set", JAIL, "addignoreip", address], timeout=15)
        return outcome

    def _restart(self, why: str) -> ReloadOutcome:
        """Restart fail2ban, then wait for the jail's ban action."""
        restarted = self.services.restart(UNIT)
        detail = f"{restarted.detail} ({why})"
        problem = wait_until_banning() if restarted.ok else None
        if problem:
            detail = f"{detail}: {problem}"
        return ReloadOutcome(restarted.ok and problem is None, detail, {"service_action": restarted.action})

    def facts(self, observed: Fail2banObserved) -> dict[str, Any]:
        effective = observed.effective or {}
        facts: dict[str, Any] = {
            "jail": JAIL if observed.effective is not None else f"{JAIL} (disabled)",
            "port": effective.get("port", ""),
            "backend": effective.get("backend", ""),
            "banaction": effective.get("banaction", ""),
        }
        running, banned = observed.running, observed.banned
        if running is None and self._after_reload is not None:
            running, banned = self._after_reload  # a heal's observe-again (the -t -d) came before its reload
        if running is not None:
            facts["service"] = "active" if running else "not active"
        if banned is not None:
            facts["banned"] = banned
        if observed.effective is not None and "mode" in observed.effective:
            facts["mode"] = observed.effective["mode"]
        sessions = observed.admin_sessions if observed.admin_sessions is not None else self._sessions_seen
        if sessions:
            facts["admin_sessions_ignored"] = ", ".join(f"{s.address} ({s.user})" for s in sessions)
        return facts


def _agrees(key: str, value: str, wanted: str) -> bool:
    """Whether a value fail2ban reads means what the agent wants ("10m" is 600 seconds)."""
    if value == wanted:
        return True
    if key in ("findtime", "bantime"):
        try:
            return parse_duration(value) == parse_duration(wanted)
        except ValueError:
            return False
    if key == "ignoreip":
        return value.split() == wanted.split()
    return False


def _seconds(value: float) -> str:
    return str(int(value))


def _effective_diff(observed: Fail2banObserved, desired: Fail2banDesired) -> str:
    have_values = observed.effective or {"enabled": "false"}
    have = "".join(f"{k} = {have_values[k]}\n" for k in KEYS if k in have_values and k in desired.effective)
    want = "".join(f"{k} = {desired.effective[k]}\n" for k in KEYS if k in desired.effective)
    return unified(have, want, f" fail2ban-client -d [{JAIL}]")

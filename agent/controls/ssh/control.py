"""The SSH guard: sshd's *effective* Port, PermitRootLogin, PasswordAuthentication and listed keywords.

sshd takes the first value it meets and Debian's sshd_config includes sshd_config.d/*.conf first, so
the agent owns a first-sorting drop-in, keeps the Include, and comments out conflicting directives
elsewhere. Truth is `sshd -T`, never one file's text.

Ubuntu 22.10 and later start sshd through ssh.socket: systemd owns the listening socket, and sshd's
Port is ignored (the classic lockout: Port changed, sshd "restarted", still on 22 — or on nothing).
Where ssh.socket is enabled, the guard also owns a drop-in for it (ListenStream= per port) and, after
changing it, runs `systemctl daemon-reload` and restarts ssh.socket.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from agent import accounts
from agent.config import Config
from agent.controls.base import (
    Changes,
    Control,
    Drift,
    DriftItem,
    FileChange,
    Held,
    HeldSetting,
    Meta,
    ObserveError,
    ReloadOutcome,
    ReloadPlan,
    SshPorts,
    ValidationError,
    WatchSpec,
    line_end,
    unified,
)
from agent.controls.ssh.keylogins import KeyLogins
from agent.controls.ssh.lockout import judge
from agent.controls.ssh.model import (
    ACCESS_KEYWORDS,
    MARKER,
    PENALTY_EXEMPT,
    SshdDesired,
    SshdObserved,
    conflicts,
    describe,
    effective_diff,
    include_present,
    lines_of,
    norm,
    render_dropin,
    render_socket_dropin,
    wanted_text,
    without_exempt,
)
from agent.controls.ssh.portmove import PortMoves
from agent.controls.ssh.sshd_config import (
    DEFAULT_INCLUDE,
    MAIN_CONFIG,
    SSHD,
    ensure_privsep_dir,
    parse_effective,
    read_graph,
)
from agent.controls.ssh.strict import strict_sshd
from agent.paths import SystemRoot
from agent.system import fs
from agent.system.run import run
from agent.system.services import Service, ServiceManager

SOCKET_UNIT = "ssh.socket"


class SshdControl(Control[SshdObserved, SshdDesired]):
    name = "ssh"

    def __init__(
        self,
        root: SystemRoot,
        moves: PortMoves,
        keylogins: KeyLogins,
        services: ServiceManager | None = None,
    ) -> None:
        """`moves` and `keylogins` are the daemon's own (agent/wiring.py: SshShared): the port move and the
        proofs thread see the same state the guard does."""
        super().__init__(root)
        self.services = services or ServiceManager(root)
        self.moves = moves
        self.keylogins = keylogins
        self._normalised: dict[tuple[tuple[str, str], ...], Mapping[str, tuple[str, ...]]] = {}
        self._passwords_held = False  # the last lockout check kept PasswordAuthentication yes
        self._sshd_defaults: Mapping[str, tuple[str, ...]] | None = None  # sshd -T -f /dev/null; None: not asked

    def meta(self, config: Config) -> Meta:
        return Meta.of(config.ssh)

    def password_logins_held_to(self, config: Config) -> bool:
        """Whether the guard holds sshd to taking passwords: the config's password_authentication, or yes while
        the lockout check keeps passwords on (no proven key login yet). A drift the guard is about to heal does
        not change it, so what follows sshd (fail2ban's jail mode) does not flip with every tamper."""
        return config.ssh.password_authentication or self._passwords_held

    def watches(self, config: Config) -> Sequence[WatchSpec]:
        dirs = {self.root.ssh_dir, self.root.sshd_config_d}
        dirs.update(self.root.path(p).parent for p, _ in read_graph(self.root).texts)
        specs = [WatchSpec(d) for d in sorted(dirs)]
        # the lockout invariants: a blocked guard unblocks as soon as an admin gets a way in
        specs.extend(accounts.watches(self.root))
        # an admin's login or logout changes the addresses PerSourcePenalties exempts
        specs.append(WatchSpec(self.root.logind_sessions))
        return specs

    # observe ------------------------------------------------------------------------------------------

    def observe(self, desired: SshdDesired) -> SshdObserved:
        ensure_privsep_dir(self.root)
        graph = read_graph(self.root)
        if not include_present(self.root, graph, self._dropin_system_path):
            # the heal puts the Include back: what the drop-ins hold then counts, and is neutralised with it
            graph = read_graph(self.root, restoring=DEFAULT_INCLUDE)
        for path, why in graph.unreadable:
            if path != self._dropin_system_path:
                raise ObserveError(f"{path}: {why}", path)
        dropin, problem = self._read_dropin()
        result = run([SSHD, "-T", "-f", MAIN_CONFIG], timeout=15)
        if result.ok:
            effective = parse_effective(result.stdout)
            socket, socket_dropin = self._socket_state()
            return SshdObserved(effective, graph, dropin, problem, self._running(effective), socket, socket_dropin)
        error = result.error_text()
        if result.returncode == 127:
            raise ObserveError(f"{SSHD} not found: is openssh-server installed?", MAIN_CONFIG)
        if problem is None and self._dropin_system_path not in error:
            raise ObserveError(f"sshd -T rejects the current configuration: {error}", MAIN_CONFIG)
        # the agent's own drop-in broke sshd's parse (garbage in it, a link to something else): ours to rewrite
        return SshdObserved({}, graph, dropin, problem or f"sshd rejects it: {error}", None)

    def _socket_state(self) -> tuple[bool, bytes | None]:
        """Whether ssh.socket is in use, and the agent's drop-in for it."""
        # the enablement link, not `systemctl is-active`: a file check costs nothing on the heal path
        activated = self.root.ssh_socket_enabled_link.exists()
        if not activated:
            return False, None
        try:
            return True, fs.read_regular(self.root.ssh_socket_dropin)
        except (fs.UnsafeFile, IsADirectoryError):
            return True, b""  # not ours to read: rewritten like any modified drop-in

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

    @property
    def _dropin_system_path(self) -> str:
        return self.root.system_name(self.root.sshd_dropin)

    # desired ------------------------------------------------------------------------------------------

    def desired(self, config: Config, ssh: SshPorts) -> SshdDesired:
        want = config.ssh  # the SSH guard owns the port: `ssh`, the ports others keep, follows from it
        self.keylogins.set_awaiting(())  # preconditions() says again whom it waits for, if anyone
        # one Port line per port: two while a port move is open (agent/controls/ssh/portmove.py)
        settings: list[tuple[str, str]] = [("Port", str(port)) for port in self.moves.ports(config)]
        settings += [
            ("PermitRootLogin", want.permit_root_login),
            ("PasswordAuthentication", "yes" if want.password_authentication else "no"),
        ]
        settings.extend((k, v) for k, v in want.options)
        options, strict = {k.lower() for k, _ in want.options}, None
        if config.profile == "strict":  # LogLevel VERBOSE among them
            passwords, port = want.password_authentication, str(want.port)
            strict = strict_sshd(self.root, self.keylogins, options, self._defaults(), passwords, port)
            settings.extend(strict.settings)
            self.keylogins.set_awaiting((), strict.awaiting)
        elif self.moves.verbose_logging(config) and "loglevel" not in options:
            settings.append(("LogLevel", "VERBOSE"))  # names the local port of each login: the move's proof
        if exempt := self._penalty_exemptions(config):
            settings.append((PENALTY_EXEMPT, exempt))
        return self._desired_from(tuple(settings), str(want.port), strict.held if strict else ())

    def _penalty_exemptions(self, config: Config) -> str:
        """OpenSSH 9.8+ (Debian 13) penalises a source address after failed logins (PerSourcePenalties, on by
        default) and then refuses its connections for up to 10 minutes: the admin mistyping a password in a
        second terminal would be shut out. The addresses of live SSH sessions of sudo admins (logind's, as for
        fail2ban's ignore list) are exempt while the session lasts. "" when none, where sshd has no such option,
        or where ssh.options sets it (the admin's list stays)."""
        if any(k.lower() == PENALTY_EXEMPT.lower() for k, _ in config.ssh.options) or (
            PENALTY_EXEMPT.lower() not in self._defaults()
        ):
            return ""
        sessions = accounts.admin_sessions(self.root, accounts.read_facts(self.root)) or ()
        addresses = []
        for session in sessions:
            try:
                addresses.append(str(ipaddress.ip_address(session.address)))
            except ValueError:
                continue  # a host name (UseDNS yes) is no address sshd can match
        return ",".join(sorted(set(addresses)))

    def _defaults(self) -> Mapping[str, tuple[str, ...]]:
        """What this sshd does with no config (`sshd -T -f /dev/null`), asked once: {} if it fails."""
        if self._sshd_defaults is None:
            ensure_privsep_dir(self.root)
            result = run([SSHD, "-T", "-f", "/dev/null"], timeout=15)
            self._sshd_defaults = parse_effective(result.stdout) if result.ok else {}
        return self._sshd_defaults

    def _desired_from(
        self, settings: tuple[tuple[str, str], ...], admin_port: str, held: tuple[HeldSetting, ...] = ()
    ) -> SshdDesired:
        ports = [value for keyword, value in settings if keyword == "Port"]
        dropin, socket_text = render_dropin(settings), render_socket_dropin(ports)
        return SshdDesired(settings, self._normalise(settings), dropin, socket_text, admin_port, held)

    def _normalise(self, settings: tuple[tuple[str, str], ...]) -> Mapping[str, tuple[str, ...]]:
        """The values as `sshd -T` will print them (1m -> 60, prohibit-password -> without-password)."""
        if settings in self._normalised:
            return self._normalised[settings]
        argv = [SSHD, "-T", "-f", "/dev/null"]
        for keyword, value in settings:
            argv += ["-o", f"{keyword}={value}"]
        ensure_privsep_dir(self.root)
        result = run(argv, timeout=15)
        if not result.ok:
            raise ValidationError(f"sshd rejects the configured ssh settings: {result.error_text()}")
        printed = parse_effective(result.stdout)
        wanted = {k.lower() for k, _ in settings}
        normalised = {k: v for k, v in printed.items() if k in wanted or k in ACCESS_KEYWORDS}
        self._normalised[settings] = normalised
        return normalised

    # diff ---------------------------------------------------------------------------------------------

    def diff(self, observed: SshdObserved, desired: SshdDesired) -> Drift | None:
        items: list[DriftItem] = []
        dropin_path = self._dropin_system_path
        for keyword in dict.fromkeys(k for k, _ in desired.settings):
            key = keyword.lower()
            want = desired.effective.get(key, ())
            have = observed.effective.get(key, ())
            if {norm(v) for v in want} != {norm(v) for v in have}:
                # the exempt list follows logins and logouts: no one's change to revert, never flapping
                damped = keyword != PENALTY_EXEMPT
                items.append(DriftItem(key, "effective", " ".join(want), " ".join(have) or "(unset)", damped=damped))
        if observed.dropin_problem:
            items.append(DriftItem("agent drop-in", dropin_path, "a regular file", observed.dropin_problem))
        elif observed.dropin is None:
            items.append(DriftItem("agent drop-in", dropin_path, "present", "missing"))
        elif observed.dropin.decode("utf-8", "replace") != desired.dropin_text:
            # only the session-following exempt list differs (an admin logged in or out): not a tamper
            damped = without_exempt(observed.dropin.decode("utf-8", "replace")) != without_exempt(desired.dropin_text)
            items.append(DriftItem("agent drop-in", dropin_path, "the agent's content", "modified", damped=damped))
        if not include_present(self.root, observed.graph, self._dropin_system_path):
            items.append(DriftItem("include", MAIN_CONFIG, f"Include {DEFAULT_INCLUDE}", "missing"))
        if (
            observed.socket_activated
            and (observed.socket_dropin or b"").decode("utf-8", "replace") != desired.socket_text
        ):
            where = self.root.system_name(self.root.ssh_socket_dropin)
            state = "missing" if observed.socket_dropin is None else "modified"
            items.append(DriftItem("ssh.socket ListenStream", where, "the SSH port(s)", state))
        for directive in conflicts(observed.graph, desired, self._dropin_system_path):
            items.append(
                DriftItem(
                    directive.keyword,
                    directive.path,
                    wanted_text(desired, directive.keyword),
                    directive.value,
                    directive.line,
                )
            )
        if observed.running is False:
            items.append(DriftItem("sshd", "service", "running", "not running"))
        if not items:
            return None
        return Drift(self.name, tuple(items), effective_diff(observed, desired))

    # plan ---------------------------------------------------------------------------------------------

    def plan(self, observed: SshdObserved, desired: SshdDesired, drift: Drift) -> Changes:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        edits: dict[str, list[str]] = {}
        notes: list[str] = []
        for directive in conflicts(observed.graph, desired, self._dropin_system_path):
            lines = edits.setdefault(directive.path, lines_of(observed.graph, directive.path))
            original = lines[directive.line - 1]
            wanted = wanted_text(desired, directive.keyword)
            lines[directive.line - 1] = (
                f"# [{MARKER} {stamp}] neutralised, the agent keeps {wanted}: {original.strip()}" + line_end(original)
            )
            notes.append(f"comment out {directive.path}:{directive.line} ({original.strip()})")
        if not include_present(self.root, observed.graph, self._dropin_system_path):
            lines = edits.setdefault(MAIN_CONFIG, lines_of(observed.graph, MAIN_CONFIG))
            directives = (i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#"))
            at = next(directives, len(lines))
            end = next((line_end(line) for line in lines if line_end(line)), "\n")  # the file's own line ends
            if lines and not line_end(lines[-1]) and at == len(lines):
                lines[-1] += end
            lines[at:at] = [
                f"# [{MARKER} {stamp}] Include restored: the agent's settings live in sshd_config.d{end}",
                f"Include {DEFAULT_INCLUDE}{end}",
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
            after = "".join(lines)
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
        socket_text = (observed.socket_dropin or b"").decode("utf-8", "replace")
        reload = ReloadPlan()
        if observed.socket_activated and socket_text != desired.socket_text:
            where = self.root.system_name(self.root.ssh_socket_dropin)
            files.append(FileChange(self.root.ssh_socket_dropin, where, desired.socket_text.encode(), 0o644, "socket"))
            diffs.append(unified(socket_text, desired.socket_text, where))
            notes.append(f"write {where}, then systemctl daemon-reload and restart {SOCKET_UNIT}")
            reload = ReloadPlan(units=(SOCKET_UNIT,))
        if observed.running is False:
            notes.append("start ssh.service")
        return Changes(tuple(files), tuple(notes), "".join(diffs), reload=reload)

    # preconditions ------------------------------------------------------------------------------------

    def preconditions(self, observed: SshdObserved, desired: SshdDesired) -> Held | None:
        """Each setting that can take a way in away waits while it would (agent/controls/ssh/lockout.py)."""
        held, accepted, judged, self._passwords_held = judge(self.root, self.keylogins, observed, desired)
        if not held:
            return None
        # every other setting as desired, in its order (Port repeats while a move is open); a held one is left out,
        # or keeps the value that holds the way in (PasswordAuthentication yes)
        settings = tuple(
            (keyword, accepted[keyword.lower()] if keyword.lower() in judged else value)
            for keyword, value in desired.settings
            if keyword.lower() not in judged or keyword.lower() in accepted
        )
        return Held(tuple(held), self._desired_from(settings, desired.admin_port, desired.held))

    # validate / reload --------------------------------------------------------------------------------

    def validate(self, changes: Changes) -> SshdObserved:
        """sshd's own check of the written config. `sshd -T` is its extended test mode: every check of
        `sshd -t`, plus the effective config, which serves as the transaction's observe-again (the
        reload does not change what the files say) and saves a third sshd run per heal."""
        ensure_privsep_dir(self.root)
        result = run([SSHD, "-T", "-f", MAIN_CONFIG], timeout=15)
        if not result.ok:
            raise ValidationError(f"sshd test mode (sshd -T) rejects it: {result.error_text()}")
        dropin, problem = self._read_dropin()
        # running stays unknown here: the reload that follows starts sshd when it was down
        socket, socket_dropin = self._socket_state()
        effective = parse_effective(result.stdout)
        return SshdObserved(effective, read_graph(self.root), dropin, problem, None, socket, socket_dropin)

    def reload(self, changes: Changes) -> ReloadOutcome:
        # systemd owns the listening socket: a new ListenStream= needs a daemon-reload and a restart of the
        # socket (established sessions belong to sshd's processes and stay)
        socket = self.services.restart_units(changes.reload.units)
        if not socket.ok:
            return ReloadOutcome(False, socket.detail)
        outcome = self.services.reload(self._service())
        return ReloadOutcome(outcome.ok, "; ".join(filter(None, (outcome.detail, socket.detail))))

    def facts(self, observed: SshdObserved, desired: SshdDesired) -> dict[str, Any]:
        return describe(observed)

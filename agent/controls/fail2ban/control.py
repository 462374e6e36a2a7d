"""The fail2ban guard: the sshd jail enabled, on the SSH port(s), with the configured limits, running.

fail2ban reads jail.conf < jail.d/*.conf < jail.local < jail.d/*.local, each group in name order, a
later value winning. The agent owns jail.d/zz-vps-agent.local (read last but for names sorting
after it) and comments out a guarded key of the sshd jail in any .local that sorts after it. Truth
is `fail2ban-client -d`, the parsed configuration fail2ban itself would load, never one file's text.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence
from typing import Any

from agent import accounts
from agent.config import Config
from agent.controls.base import (
    Blocked,
    Changes,
    CommandChange,
    Control,
    Drift,
    DriftItem,
    FileChange,
    Invocation,
    Meta,
    ObserveError,
    ReloadOutcome,
    ReloadPlan,
    SshPorts,
    ValidationError,
    WatchSpec,
    unified,
)
from agent.controls.fail2ban.jail import (
    CLIENT,
    JAIL,
    JOURNALMATCH,
    PACKAGE,
    UNIT,
    Fail2banDesired,
    Fail2banObserved,
    JailFile,
    agrees,
    banaction_for,
    conflicts,
    effective_diff,
    jail_facts,
    neutralised,
    parse_actions,
    parse_banned_ips,
    parse_dump,
    parse_ignore_list,
    parse_status,
    render_jail,
    runtime_drift,
    seconds,
    session_text,
)
from agent.paths import AGENT_JAIL_NAME, SystemRoot
from agent.system import apt, dpkg, fs, netfilter
from agent.system.netfilter import Backend
from agent.system.run import run
from agent.system.services import ServiceManager

ACTIONS_WAIT = 15.0  # seconds: how long a reloaded jail may go without its ban action


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


class Fail2banControl(Control[Fail2banObserved, Fail2banDesired]):
    name = "fail2ban"

    def __init__(
        self,
        root: SystemRoot,
        services: ServiceManager | None = None,
        detect_backend: Callable[[], Backend] = netfilter.detect_backend,
        password_logins: Callable[[Config], bool | None] = lambda config: None,
    ) -> None:
        super().__init__(root)
        # whether sshd takes passwords (None: unknown): what the SSH guard holds it to, or the effective setting
        self._password_logins = password_logins
        self.services = services or ServiceManager(root)
        self._detect_backend = detect_backend
        self._backend: Backend | None = None

    def meta(self, config: Config) -> Meta:
        return Meta.of(config.fail2ban)

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

    def observe(self, desired: Fail2banDesired) -> Fail2banObserved:
        # the tool first, the files after it: a file saved while fail2ban reads is then in the files too, so the
        # plan neutralises whatever the tool saw (files listed first could miss what the tool then read)
        result = run([CLIENT, "-d"], timeout=30)
        agent_file, problem = self._read_agent_file()
        later = self._later_files()
        jail_conf = fs.read_regular(self.root.fail2ban_dir / "jail.conf")
        if result.returncode == 127:
            if not desired.install:
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

    def desired(self, config: Config, ssh: SshPorts) -> Fail2banDesired:
        f2b = config.fail2ban
        values = {
            "enabled": "true",
            "port": ",".join(str(p) for p in ssh.ports),
            "maxretry": str(f2b.maxretry),
            "findtime": seconds(f2b.findtime),
            "bantime": seconds(f2b.bantime),
            "ignoreip": " ".join(f2b.ignoreip),
            "banaction": banaction_for(self.backend),
        }
        if not self.root.auth_log.exists():
            values["backend"] = "systemd"  # Debian 12 logs to the journal only: no auth.log to read
            values["journalmatch"] = JOURNALMATCH
        if self._password_logins(config) is False:
            values["mode"] = "aggressive"  # with passwords on, the admin's own choice of mode stays
        return Fail2banDesired(values, render_jail(values), install=f2b.install and self.root.is_host)

    # diff ---------------------------------------------------------------------------------------------

    def diff(self, observed: Fail2banObserved, desired: Fail2banDesired) -> Drift | None:
        items: list[DriftItem] = []
        if not observed.installed:
            items.append(DriftItem("fail2ban", "package", "installed", "not installed"))
        have = observed.effective or {}
        for key, want in desired.effective.items():
            actual = have.get(key, "false" if key == "enabled" else "(unset)")
            if not agrees(key, actual, want):
                items.append(DriftItem(key, f"effective [{JAIL}]", want, actual))
        path = self._agent_system_path
        if observed.agent_file_problem:
            items.append(DriftItem("agent jail file", path, "a regular file", observed.agent_file_problem))
        elif observed.agent_file is None:
            items.append(DriftItem("agent jail file", path, "present", "missing"))
        elif observed.agent_file.decode("utf-8", "replace") != desired.text:
            items.append(DriftItem("agent jail file", path, "the agent's content", "modified"))
        for jail_file, found in conflicts(observed, desired):
            wanted = desired.effective[found.key]
            items.append(DriftItem(found.key, jail_file.system_path, wanted, found.value, found.line))
        if observed.running is False:
            items.append(DriftItem("fail2ban", "service", "active", "not active"))
        for _address, expected, actual in runtime_drift(observed, desired):
            items.append(
                DriftItem("ignoreip (live admin session)", f"running [{JAIL}]", expected, actual, damped=False)
            )
        if observed.jail_conf is not None and not self.root.fail2ban_jail_conf_orig.exists():
            # the guide's first step, taken as soon as there is a jail.conf (e.g. right after the install)
            orig = self.root.system_name(self.root.fail2ban_jail_conf_orig)
            items.append(DriftItem("jail.conf backup", orig, "kept", "not taken yet"))
        if not items:
            return None
        return Drift(self.name, tuple(items), effective_diff(observed, desired))

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
        edits, commented = neutralised(conflicts(observed, desired), desired.effective, stamp)
        notes += commented
        for jail_file, after in edits:
            real = self.root.path(jail_file.system_path)
            if real.is_symlink():
                raise fs.UnsafeFile(real, "is a symlink; the agent edits files in place and does not follow links")
            files.append(FileChange(real, jail_file.system_path, after.encode(), None, "neutralise"))
            diffs.append(unified(jail_file.text, after, jail_file.system_path))
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
        for address, expected, _ in runtime_drift(observed, desired):
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
        was = (observed.effective or {}).get("banaction", "")
        want = desired.effective.get("banaction", "")
        sessions = observed.admin_sessions or ()
        reload = ReloadPlan(
            # only the running jail's ignore list changed (fail2ban-client set ...): a reload would undo it
            needed=bool(files) or not observed.installed or observed.running is False,
            # fail2ban 1.1's reload (Debian 13) drops the old ban action and never adds the renamed one
            restart=f"the ban action changes: {was} -> {want}" if files and was and want and was != want else "",
            # the reload resets the running jail's ignore list to the files': the live admin sessions again
            again=tuple(
                Invocation((CLIENT, "set", JAIL, "addignoreip", address), timeout=15)
                for address in dict.fromkeys(session.address for session in sessions)
            ),
        )
        facts = (("admin_sessions_ignored", session_text(sessions)),) if sessions else ()
        return Changes(tuple(files), tuple(notes), "".join(diffs), tuple(commands), reload, facts)

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

    def reload(self, changes: Changes) -> ReloadOutcome:
        plan = changes.reload
        if not plan.needed:
            return ReloadOutcome(True, "the running sshd jail's ignore list updated; no reload needed")
        if not self.root.is_host:
            return ReloadOutcome(True, "a fake root: fail2ban is never started or reloaded")
        if not self.services.is_active(UNIT):
            started = self.services.enable_now(UNIT)
            facts = {"service": "active" if started.ok else "not active"}
            if started.ok and self.services.use_systemd:
                problem = wait_until_banning()
                if problem:
                    return ReloadOutcome(False, f"{started.detail}: {problem}", facts)
            return ReloadOutcome(started.ok, started.detail, facts)
        if plan.restart:
            # fail2ban 1.1's reload (Debian 13) drops the old ban action and never adds the renamed one:
            # `No actions for jail sshd`, nothing banned, until a restart. Bans outlive it (fail2ban's db).
            outcome = self._restart(plan.restart)
        else:
            result = run([CLIENT, "reload"], timeout=60)
            if not result.ok:
                return ReloadOutcome(False, f"fail2ban-client reload: {result.error_text()}")
            problem = wait_until_banning()
            outcome = ReloadOutcome(True, "fail2ban-client reload")
            if problem:  # whatever the cause, a restart is what gives the jail its action back
                outcome = self._restart(f"fail2ban-client reload: {problem}")
        if not outcome.ok:
            return outcome
        status = run([CLIENT, "status", JAIL], timeout=15)
        if not status.ok:
            return ReloadOutcome(False, f"the {JAIL} jail does not run after the reload: {status.error_text()}")
        outcome.facts = {"service": "active", "banned": parse_status(status.stdout)}
        for again in plan.again:
            run(list(again.argv), timeout=again.timeout)
        return outcome

    def _restart(self, why: str) -> ReloadOutcome:
        """Restart fail2ban, then wait for the jail's ban action."""
        restarted = self.services.restart(UNIT)
        detail = f"{restarted.detail} ({why})"
        problem = wait_until_banning() if restarted.ok else None
        if problem:
            detail = f"{detail}: {problem}"
        return ReloadOutcome(restarted.ok and problem is None, detail)

    def facts(self, observed: Fail2banObserved, desired: Fail2banDesired) -> dict[str, Any]:
        return jail_facts(observed)

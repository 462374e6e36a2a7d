"""Every absolute path the agent uses, derived from one SystemRoot so tests and sandboxes re-root it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

AGENT_DROPIN_NAME = "00-vps-agent.conf"
# jail.d/*.local files are read last (after jail.local), in name order: "zz-" sorts after the usual names
AGENT_JAIL_NAME = "zz-vps-agent.local"
# sysctl.d files apply in name order, later ones win: "60-" after the distribution's 10-/50- files
AGENT_SYSCTL_NAME = "60-vps-agent.conf"
# files directly in /etc that profile: strict edits: vps-agent.service cannot write /etc itself, so
# agent/system/outside.py writes them, outside the unit's sandbox (and only them)
LOGIN_DEFS = "/etc/login.defs"
ISSUE = "/etc/issue"
ISSUE_NET = "/etc/issue.net"
WRITTEN_OUTSIDE_SANDBOX = frozenset({LOGIN_DEFS, ISSUE, ISSUE_NET})


@dataclass(frozen=True)
class SystemRoot:
    """The root of the system the agent guards: "/" in production, a fake root in tests."""

    prefix: Path = Path("/")

    @classmethod
    def at(cls, prefix: str | os.PathLike[str]) -> SystemRoot:
        return cls(Path(os.path.abspath(prefix)))

    @property
    def is_host(self) -> bool:
        return self.prefix == Path("/")

    def path(self, absolute: str | os.PathLike[str]) -> Path:
        """Map an absolute path as the guarded system names it onto this root."""
        text = os.fspath(absolute)
        if not text.startswith("/"):
            raise ValueError(f"expected an absolute path, got {text!r}")
        return self.prefix / text.lstrip("/")

    def system_name(self, path: str | os.PathLike[str]) -> str:
        """The absolute path as the guarded system names it (inverse of path())."""
        rel = os.path.relpath(os.fspath(path), self.prefix)
        if rel == ".":
            return "/"
        if rel.startswith(".."):
            return os.fspath(path)
        return "/" + rel

    # agent's own files
    @property
    def config_file(self) -> Path:
        return self.path("/etc/vps-agent/config.yaml")

    @property
    def state_dir(self) -> Path:
        return self.path("/var/lib/vps-agent")

    @property
    def backups_dir(self) -> Path:
        return self.state_dir / "backups"

    @property
    def firewall_canonical(self) -> Path:
        """How iptables-save prints the agent's rules, learned after applying them (keyed by ruleset)."""
        return self.state_dir / "firewall-canonical.json"

    @property
    def updates_state(self) -> Path:
        """The upgrade scheduler's state: last run, next run, a run under way."""
        return self.state_dir / "updates.json"

    @property
    def key_logins_state(self) -> Path:
        """The sudo admins whose SSH key login was proven (what lets passwords go off)."""
        return self.state_dir / "key-logins.json"

    @property
    def port_move_state(self) -> Path:
        """A two-phase SSH port move in flight (or rolled back)."""
        return self.state_dir / "port-move.json"

    @property
    def run_dir(self) -> Path:
        return self.path("/run/vps-agent")

    # apt and dpkg
    @property
    def apt_etc(self) -> Path:
        return self.path("/etc/apt")

    @property
    def reboot_required(self) -> Path:
        """Debian's flag that a package needs a reboot; .pkgs beside it names the packages."""
        return self.path("/run/reboot-required")

    @property
    def socket(self) -> Path:
        return self.run_dir / "agent.sock"

    @property
    def log_dir(self) -> Path:
        return self.path("/var/log/vps-agent")

    # sshd
    @property
    def ssh_dir(self) -> Path:
        return self.path("/etc/ssh")

    @property
    def sshd_config(self) -> Path:
        return self.ssh_dir / "sshd_config"

    @property
    def sshd_config_d(self) -> Path:
        return self.ssh_dir / "sshd_config.d"

    @property
    def sshd_dropin(self) -> Path:
        return self.sshd_config_d / AGENT_DROPIN_NAME

    @property
    def ssh_socket_enabled_link(self) -> Path:
        """Present when ssh.socket (Ubuntu 22.10+'s socket-activated sshd) is enabled."""
        return self.path("/etc/systemd/system/sockets.target.wants/ssh.socket")

    @property
    def ssh_socket_dropin(self) -> Path:
        return self.path("/etc/systemd/system/ssh.socket.d") / AGENT_DROPIN_NAME

    @property
    def sshd_privsep_dir(self) -> Path:
        return self.path("/run/sshd")

    # fail2ban
    @property
    def fail2ban_dir(self) -> Path:
        return self.path("/etc/fail2ban")

    @property
    def fail2ban_jail_d(self) -> Path:
        return self.fail2ban_dir / "jail.d"

    @property
    def fail2ban_agent_jail(self) -> Path:
        return self.fail2ban_jail_d / AGENT_JAIL_NAME

    @property
    def fail2ban_jail_conf_orig(self) -> Path:
        """The one-time copy of jail.conf taken before the agent's first fail2ban change ever."""
        return self.backups_dir / "fail2ban" / "jail.conf.orig"

    @property
    def fail2ban_run_dir(self) -> Path:
        return self.path("/run/fail2ban")

    @property
    def logind_sessions(self) -> Path:
        """systemd-logind's file per login session (USER=, REMOTE_HOST=, SERVICE=, STATE=)."""
        return self.path("/run/systemd/sessions")

    @property
    def auth_log(self) -> Path:
        return self.path("/var/log/auth.log")

    # accounts
    @property
    def passwd(self) -> Path:
        return self.path("/etc/passwd")

    @property
    def shadow(self) -> Path:
        return self.path("/etc/shadow")

    @property
    def group(self) -> Path:
        return self.path("/etc/group")

    @property
    def sudoers(self) -> Path:
        return self.path("/etc/sudoers")

    @property
    def sudoers_d(self) -> Path:
        return self.path("/etc/sudoers.d")

    @property
    def login_defs(self) -> Path:
        """shadow's defaults for new accounts (UID_MIN, UID_MAX, GID_MIN, GID_MAX; strict: UMASK, rounds)."""
        return self.path(LOGIN_DEFS)

    @property
    def home_base(self) -> Path:
        """Where the agent creates the admin's home (useradd's default HOME)."""
        return self.path("/home")

    # when the system was installed (the accounts guard's "root password unchanged since install")
    @property
    def machine_id(self) -> Path:
        return self.path("/etc/machine-id")

    @property
    def installer_logs(self) -> Path:
        """debian-installer's record of the install; images and debootstrap have none."""
        return self.path("/var/log/installer")

    @property
    def systemd_run_dir(self) -> Path:
        """Exists only when systemd is the running init (sd_booted)."""
        return self.path("/run/systemd/system")

    # sysctl
    @property
    def proc_sys(self) -> Path:
        """The kernel's live tunables (no inotify events: the sysctl guard polls them)."""
        return self.path("/proc/sys")

    @property
    def sysctl_dirs(self) -> tuple[Path, ...]:
        """Where systemd-sysctl and `sysctl --system` read *.conf at boot; a name in an earlier directory
        masks the same name in a later one."""
        names = ("/etc/sysctl.d", "/run/sysctl.d", "/usr/local/lib/sysctl.d", "/usr/lib/sysctl.d", "/lib/sysctl.d")
        return tuple(self.path(name) for name in names)

    @property
    def sysctl_dropin(self) -> Path:
        return self.sysctl_dirs[0] / AGENT_SYSCTL_NAME

    @property
    def sysctl_conf(self) -> Path:
        """Read last by `sysctl --system`, and as /etc/sysctl.d/99-sysctl.conf (a link) by systemd-sysctl."""
        return self.path("/etc/sysctl.conf")

    @property
    def container_marker(self) -> Path:
        """systemd writes it, naming the container manager, when the system runs in a container."""
        return self.path("/run/systemd/container")

    @property
    def net_class(self) -> Path:
        """One entry per network interface (bridge/, uevent's DEVTYPE=wireguard)."""
        return self.path("/sys/class/net")

    @property
    def ipv4_route(self) -> Path:
        """The kernel's IPv4 routes (the main table: policy routing is not in it)."""
        return self.path("/proc/net/route")

    @property
    def ipv6_route(self) -> Path:
        """The kernel's IPv6 routes; an RA-learned default route carries RTF_ADDRCONF."""
        return self.path("/proc/net/ipv6_route")

    # the strict profile's host settings (agent/controls/strict.py): files the agent owns whole
    @property
    def coredump_dropin(self) -> Path:
        """systemd-coredump reads coredump.conf, then its .d drop-ins: Storage=none here wins."""
        return self.path("/etc/systemd/coredump.conf.d/vps-agent.conf")

    @property
    def core_limits(self) -> Path:
        """pam_limits reads limits.conf and then every limits.d/*.conf at each login."""
        return self.path("/etc/security/limits.d/vps-agent-core.conf")

    @property
    def modprobe_blacklist(self) -> Path:
        return self.path("/etc/modprobe.d/vps-agent-blacklist.conf")

    # ... and the files it edits in place (login_defs above too; agent/system/outside.py writes them)
    @property
    def issue(self) -> Path:
        """What getty shows before a console login."""
        return self.path(ISSUE)

    @property
    def issue_net(self) -> Path:
        """What sshd shows before an SSH login (Banner), under profile: strict."""
        return self.path(ISSUE_NET)

    @property
    def proc_modules(self) -> Path:
        """The modules loaded now (absent where the kernel has no module support, or /proc hides it)."""
        return self.path("/proc/modules")

    # Directories that tools resolve by absolute path (sshd's Include): in a fake root they are
    # bind-mounted over the real ones inside a private mount namespace (see system.namespace).
    @property
    def tool_visible_dirs(self) -> tuple[str, ...]:
        return ("/etc/ssh", "/etc/fail2ban")

"""The schema: frozen dataclasses, one per config section, with the defaults an empty file gets."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SshConfig:
    enabled: bool = True
    port: int = 22
    # a port change is two-phase: both ports open until a login on the new one (or `vps-agentctl
    # confirm`) proves it; without that proof in this long, everything returns to the old port
    confirm_timeout: float = 600.0
    permit_root_login: str = "no"
    password_authentication: bool = False
    # further sshd keywords in the user's order, values rendered as sshd expects them
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PortRule:
    port: int
    port_end: int | None = None
    # empty means from anywhere
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class FirewallConfig:
    enabled: bool = True
    mode: str = "enforce"
    allow_tcp: tuple[PortRule, ...] = ()
    allow_udp: tuple[PortRule, ...] = ()
    poll_interval: float = 1.0  # only where the backend sends no netlink events (iptables-legacy)


@dataclass(frozen=True)
class Fail2banConfig:
    enabled: bool = True
    install: bool = True
    maxretry: int = 5
    findtime: float = 600.0
    # -1 means a permanent ban, as in fail2ban itself
    bantime: float = 3600.0
    ignoreip: tuple[str, ...] = ("127.0.0.1/8", "::1")


@dataclass(frozen=True)
class UpdatesConfig:
    enabled: bool = True
    schedule: str = "daily 03:30"
    mode: str = "upgrade"
    randomized_delay: float = 1800.0
    lock_timeout: float = 600.0  # how long apt waits for another holder of the dpkg lock
    time_limit: float = 3600.0  # for a whole run: update, upgrade, reports
    reboot_window: str | None = None  # "HH:MM-HH:MM" local time: reboot there when one is required
    reboot_with_users: bool = False  # reboot even while someone is logged in


@dataclass(frozen=True)
class AccountsConfig:
    enabled: bool = True
    admin_user: str | None = None
    # create admin_user when it is missing (home, group sudo, admin_keys); never with a password
    create_admin: bool = False
    admin_keys: tuple[str, ...] = ()  # public key lines, "ssh-ed25519 AAAA... comment"


# The sysctl guard's safe set: every key harmless on a VPS (kernel.unprivileged_bpf_disabled=1 cannot be
# undone until the next boot, by the kernel's design). Forwarding, accept_ra and rp_filter are not in it.
SYSCTL_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("fs.protected_hardlinks", "1"),
    ("fs.protected_symlinks", "1"),
    ("fs.protected_fifos", "2"),
    ("fs.protected_regular", "2"),
    ("fs.suid_dumpable", "0"),
    ("kernel.kptr_restrict", "2"),
    ("kernel.dmesg_restrict", "1"),
    ("kernel.randomize_va_space", "2"),
    ("kernel.unprivileged_bpf_disabled", "1"),
    ("kernel.sysrq", "0"),
    ("net.core.bpf_jit_harden", "2"),
    ("dev.tty.ldisc_autoload", "0"),
    *(
        (f"net.{family}.conf.{scope}.{key}", "0")
        for key, families in (
            ("accept_redirects", ("ipv4", "ipv6")),
            ("secure_redirects", ("ipv4",)),
            ("send_redirects", ("ipv4",)),
            ("accept_source_route", ("ipv4", "ipv6")),
        )
        for family in families
        for scope in ("all", "default")
    ),
    ("net.ipv4.conf.all.log_martians", "1"),
    ("net.ipv4.conf.default.log_martians", "1"),
    ("net.ipv4.tcp_syncookies", "1"),
    ("net.ipv4.icmp_echo_ignore_broadcasts", "1"),
)


@dataclass(frozen=True)
class SysctlConfig:
    enabled: bool = True
    mode: str = "enforce"
    # /proc/sys sends no inotify events: the live values are read this often (and at every reconcile)
    poll_interval: float = 2.0
    # added to, or overriding, SYSCTL_DEFAULTS: (key, value as the kernel prints it), in the user's order
    set: tuple[tuple[str, str], ...] = ()
    unset: tuple[str, ...] = ()  # keys of SYSCTL_DEFAULTS the agent leaves alone

    def wanted(self) -> tuple[tuple[str, str], ...]:
        """The keys the guard keeps, before the conditions it detects on the host (forwarding, RA)."""
        values = {key: value for key, value in SYSCTL_DEFAULTS if key not in self.unset}
        values.update(self.set)
        return tuple(values.items())


@dataclass(frozen=True)
class EngineConfig:
    debounce: float = 0.015
    reconcile_interval: float = 300.0
    flap_max_heals: int = 5
    flap_window: float = 60.0
    flap_backoff: float = 300.0


SYSLOG_FACILITIES = {
    **{name: code for code, name in enumerate(("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news"))},
    **{"uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11},
    **{f"local{n}": 16 + n for n in range(8)},
}
DEFAULT_PROMETHEUS_TEXTFILE = "/var/lib/prometheus/node-exporter/vps_agent.prom"


@dataclass(frozen=True)
class SyslogConfig:
    """Remote syslog (RFC 5424): where to, and how much to hold while the collector is unreachable."""

    target: str  # as written: udp://host[:port] or tcp://host[:port]
    protocol: str  # "udp" or "tcp"
    host: str
    port: int
    tls: bool = False
    ca_file: str | None = None  # None: the system's CAs
    buffer: int = 1000
    facility: str = "daemon"


@dataclass(frozen=True)
class EventsConfig:
    file: str = "/var/log/vps-agent/events.jsonl"
    stdout: bool = True
    ring_size: int = 500
    # None: native journal fields when python3-systemd is there and stdout is the journal (under systemd)
    journald: bool | None = None
    syslog: SyslogConfig | None = None
    prometheus_textfile: str | None = DEFAULT_PROMETHEUS_TEXTFILE


@dataclass(frozen=True)
class BackupsConfig:
    # backup sets retained per control
    keep: int = 20


PROFILES = ("baseline", "strict")


@dataclass(frozen=True)
class Config:
    ssh: SshConfig = field(default_factory=SshConfig)
    firewall: FirewallConfig = field(default_factory=FirewallConfig)
    fail2ban: Fail2banConfig = field(default_factory=Fail2banConfig)
    updates: UpdatesConfig = field(default_factory=UpdatesConfig)
    accounts: AccountsConfig = field(default_factory=AccountsConfig)
    sysctl: SysctlConfig = field(default_factory=SysctlConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    backups: BackupsConfig = field(default_factory=BackupsConfig)
    # "baseline": the guide's hardening; "strict": more of sshd and the host on top (docs/strict-profile.md)
    profile: str = "baseline"
    source: str = "<defaults>"


def default_config() -> Config:
    return Config()

"""The one door to apt: non-interactive, the admin's conffiles kept, waiting for the dpkg lock, bounded.

Package installs (the fail2ban guard) and, later, the upgrade scheduler go through here. A dpkg left
half way (a crash, a power cut: files in /var/lib/dpkg/updates/ and nobody holding its lock) is finished
with `dpkg --configure -a` first, as apt itself asks for; another apt holding the lock is waited for,
never fought, and its work in progress is never taken for an interruption.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from agent.paths import SystemRoot
from agent.system import dpkg
from agent.system.run import Completed, run

ENV = {"DEBIAN_FRONTEND": "noninteractive", "APT_LISTCHANGES_FRONTEND": "none"}
LOCK_TIMEOUT = 120.0  # seconds apt waits for another holder of the dpkg lock (unattended-upgrades, an admin)
TOTAL_TIMEOUT = 600.0  # seconds for everything one call does, the lock wait included
_SETTING_UP = re.compile(r"^Setting up (\S+?)(?::\S+)? \(([^)]*)\)", re.MULTILINE)


@dataclass(frozen=True)
class Step:
    """One command of an apt operation, with the environment and the time it may take."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    timeout: float


@dataclass(frozen=True)
class AptResult:
    ok: bool
    installed: tuple[tuple[str, str], ...]  # (package, version) dpkg set up
    detail: str
    steps: tuple[Completed, ...] = ()


def outside_sandbox(step: Step) -> Step:
    """The step as a transient systemd service: vps-agent.service runs with ProtectSystem=strict and a
    narrow capability set, under which dpkg cannot write /usr or /var/lib/dpkg. systemd bounds it too."""
    argv = ["systemd-run", "--wait", "--pipe", "--quiet", "--collect", "--service-type=exec"]
    argv.append(f"--property=RuntimeMaxSec={int(step.timeout)}")
    argv += [f"--setenv={key}={value}" for key, value in step.env]
    return Step((*argv, "--", *step.argv), step.env, step.timeout + 5)


def install_steps(
    packages: Sequence[str],
    *,
    repair: bool,
    lock_timeout: float = LOCK_TIMEOUT,
    total_timeout: float = TOTAL_TIMEOUT,
    via_systemd: bool = False,
) -> tuple[Step, ...]:
    """The commands that install packages; `repair`: dpkg was interrupted, finish its work first;
    `via_systemd`: each as a transient service, outside the agent's own sandbox.

    The step timeouts add up to total_timeout; the install's leaves room for the lock wait."""
    if not packages:
        raise ValueError("install_steps: no packages")
    env = tuple(sorted(ENV.items()))
    lock = str(int(lock_timeout))
    options = (
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
        "-o",
        f"DPkg::Lock::Timeout={lock}",
    )
    steps = []
    budget = total_timeout
    if repair:
        share = total_timeout / 3
        steps.append(Step(("dpkg", "--force-confdef", "--force-confold", "--configure", "-a"), env, share))
        budget -= share
    install = ("apt-get", *options, "install", "-y", "--no-install-recommends", *packages)
    steps.append(Step(install, env, budget))
    return tuple(outside_sandbox(step) for step in steps) if via_systemd else tuple(steps)


UPGRADE_VERBS = {"upgrade": "upgrade", "security-only": "upgrade", "dist-upgrade": "dist-upgrade"}


def _options(lock_timeout: float, sources: SecuritySources | None) -> tuple[str, ...]:
    """What every apt-get run of the agent's gets: the admin's conffiles kept without a prompt (confdef:
    the package's default where the admin never changed the file; confold: the admin's version where
    they did), a bounded wait for the dpkg lock, and in security-only mode the filtered sources."""
    options = [
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
        "-o",
        f"DPkg::Lock::Timeout={int(lock_timeout)}",
    ]
    if sources is not None:
        options += ["-o", f"Dir::Etc::SourceList={sources.list}", "-o", f"Dir::Etc::SourceParts={sources.parts}"]
        # without this, an update that sees only the security suites deletes every other suite's lists
        options += ["-o", "APT::Get::List-Cleanup=false"]
    return tuple(options)


@dataclass(frozen=True)
class SecuritySources:
    """A sources.list holding only the security suites, and an empty parts directory beside it."""

    list: str  # system paths
    parts: str


def upgrade_steps(
    mode: str,
    *,
    repair: bool,
    lock_timeout: float,
    total_timeout: float,
    sources: SecuritySources | None = None,
    via_systemd: bool = False,
) -> tuple[Step, ...]:
    """`apt-get update`, then `apt-get upgrade` (or dist-upgrade); an interrupted dpkg finished first.
    Held packages stay as they are: apt-get never upgrades a package on hold unless told to."""
    if mode not in UPGRADE_VERBS:
        raise ValueError(f"upgrade mode {mode!r}")
    env = tuple(sorted(ENV.items()))
    options = _options(lock_timeout, sources)
    steps = []
    if repair:
        steps.append(Step(("dpkg", "--force-confdef", "--force-confold", "--configure", "-a"), env, total_timeout))
    steps.append(Step(("apt-get", "-q", *options, "update"), env, total_timeout))
    verb = UPGRADE_VERBS[mode]
    steps.append(Step(("apt-get", "-q", "-y", *options, verb), env, total_timeout))
    return tuple(outside_sandbox(step) for step in steps) if via_systemd else tuple(steps)


_ONE_LINE = re.compile(r"^\s*(deb|deb-src)\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)(.*)$")


def is_security_suite(suite: str) -> bool:
    """Debian's bookworm-security (and the older buster/updates), Ubuntu's jammy-security."""
    return suite.endswith("-security") or suite.endswith("/updates")


def security_lines(files: Sequence[tuple[str, str]]) -> list[str]:
    """The one-line entries of the security suites in (name, text) source files, one-line (.list) and
    deb822 (.sources) alike; deb822 stanzas become one-line entries with their options kept."""
    lines: list[str] = []
    for name, text in files:
        if name.endswith(".sources"):
            lines += _deb822_security(text)
            continue
        for line in text.splitlines():
            match = _ONE_LINE.match(line.split("#", 1)[0])
            if match and is_security_suite(match.group(4)):
                lines.append(line.split("#", 1)[0].strip())
    return lines


_DEB822_OPTIONS = {"signed-by": "signed-by", "trusted": "trusted", "architectures": "arch"}


def _deb822_security(text: str) -> list[str]:
    lines: list[str] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for raw in stanza.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1].isspace() and key:
                fields[key] += " " + raw.strip()
                continue
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        options = " ".join(
            f"{word}={fields[field].replace(' ', ',')}"
            for field, word in _DEB822_OPTIONS.items()
            if field in fields and not fields[field].startswith("-----BEGIN")
        )
        prefix = f"[{options}] " if options else ""
        for kind in fields.get("types", "").split():
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    if is_security_suite(suite):
                        lines.append(f"{kind} {prefix}{uri} {suite} {fields.get('components', '')}".strip())
    return lines


def via_systemd(root: SystemRoot) -> bool:
    """Whether systemd runs this host (then apt runs as a transient service of its own)."""
    return root.is_host and root.systemd_run_dir.is_dir()


def installed_by(output: str) -> tuple[tuple[str, str], ...]:
    """(package, version) of every "Setting up foo (1.0-1) ..." line dpkg printed."""
    return tuple((m.group(1), m.group(2)) for m in _SETTING_UP.finditer(output))


def install(
    root: SystemRoot,
    packages: Sequence[str],
    *,
    lock_timeout: float = LOCK_TIMEOUT,
    total_timeout: float = TOTAL_TIMEOUT,
) -> AptResult:
    """Install packages on the host; never in a fake root (there is no apt of its own to run)."""
    if not root.is_host:
        return AptResult(False, (), f"a fake root: {' '.join(packages)} is never installed there")
    deadline = time.monotonic() + total_timeout
    steps = install_steps(
        packages, repair=dpkg.needs_repair(root), lock_timeout=lock_timeout, total_timeout=total_timeout
    )
    done: list[Completed] = []
    installed: list[tuple[str, str]] = []
    for step in steps:
        left = min(step.timeout, deadline - time.monotonic())
        if left <= 0:
            return AptResult(False, tuple(installed), f"apt: out of time before {step.argv[0]}", tuple(done))
        result = run(step.argv, env=dict(step.env), timeout=left)
        done.append(result)
        installed.extend(installed_by(result.stdout))
        if not result.ok:
            return AptResult(False, tuple(installed), f"{' '.join(step.argv[:1])}: {result.error_text()}", tuple(done))
    names = ", ".join(f"{p} {v}" for p, v in installed) or "nothing new"
    return AptResult(True, tuple(installed), f"installed {names}", tuple(done))


def held_packages() -> list[str]:
    """What `apt-mark hold` holds (the upgrades leave those be)."""
    result = run(["apt-mark", "showhold"], timeout=30)
    return result.stdout.split() if result.ok else []


def run_step(step: Step, timeout: float) -> Completed:
    """One step of install_steps or upgrade_steps, with what is left of the run's time limit."""
    return run(step.argv, env=dict(step.env), timeout=min(step.timeout, timeout))

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

"""The sysctl guard in the real daemon on the kernel's real /proc/sys, as a container sees it: the daemon
runs in a network namespace of its own and a mount namespace where the fake root's /proc/sys is the
real one bound read-only, except net/ (rw, and per network namespace), as systemd-nspawn and the
sandbox VPS do. So it can change only its namespace's net.* keys; the host's values are compared
before and after. A `sysctl -w` (the real binary, inside the namespace) is healed within one poll."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import require_root_and_tools
from tests.fakeroot import container_proc_sys
from tests.integration.harness import Agent, StartAgent, wait_for

WATCHED = (
    "kernel.randomize_va_space",
    "kernel.kptr_restrict",
    "fs.suid_dumpable",
    "fs.protected_fifos",
    "net.ipv4.conf.all.accept_redirects",
    "net.ipv4.conf.all.send_redirects",
    "net.ipv4.conf.all.log_martians",
    "net.ipv6.conf.all.accept_redirects",
)
POLL = 2.0


@pytest.fixture(autouse=True)
def _needs_tools() -> None:
    require_root_and_tools("unshare", "nsenter", "sysctl", "mount")


def host_values() -> dict[str, str]:
    paths = {key: Path("/proc/sys", key.replace(".", "/")) for key in WATCHED}
    return {key: path.read_text().strip() for key, path in paths.items() if path.exists()}


def in_namespace(agent: Agent, *argv: str) -> str:
    done = subprocess.run(
        ["nsenter", f"--net=/proc/{agent.process.pid}/ns/net", *argv], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def start(fake_root: Path, start_agent: StartAgent) -> Agent:
    return start_agent(fake_root, wrap=container_proc_sys(fake_root))


def test_a_sysctl_w_in_the_namespace_is_healed_within_one_poll_and_the_host_is_untouched(
    fake_root: Path, start_agent: StartAgent
) -> None:
    before = host_values()
    agent = start(fake_root, start_agent)
    wait_for(lambda: agent.status()["sysctl"]["status"] in ("healed", "compliant"), what="the start-up heal")
    assert in_namespace(agent, "sysctl", "-n", "net.ipv4.conf.all.accept_redirects") == "0"
    assert in_namespace(agent, "sysctl", "-n", "net.ipv4.conf.all.log_martians") == "1"
    text = (fake_root / "etc/sysctl.d/60-vps-agent.conf").read_text()
    assert "net.ipv4.conf.all.accept_redirects = 0\n" in text and "kernel.randomize_va_space = 2\n" in text

    mark = agent.mark()
    in_namespace(agent, "sysctl", "-q", "-w", "net.ipv4.conf.all.accept_redirects=1")
    changed = time.monotonic()
    reverted = agent.wait_event("drift-reverted", mark, timeout=POLL + 5, control="sysctl")
    took = time.monotonic() - changed
    assert in_namespace(agent, "sysctl", "-n", "net.ipv4.conf.all.accept_redirects") == "0"
    assert reverted["file"]["path"] == "/proc/sys/net/ipv4/conf/all/accept_redirects"
    assert took < POLL + 1.0, f"healed after {took:.2f}s, the poll is {POLL}s"
    detected = agent.wait_event("drift-detected", mark, control="sysctl")
    assert "+net.ipv4.conf.all.accept_redirects = 0" in detected["diff"]

    # the read-only kernel tunables: reported as not settable here, and no heal is tried for them
    sysctl = agent.status()["sysctl"]
    assert sysctl["status"] in ("healed", "compliant"), sysctl
    assert sysctl["facts"]["not_settable_here"] > 0, sysctl
    failed = [
        e for e in agent.events() if e.get("control") == "sysctl" and e["event"]["action"] == "remediation-failed"
    ]
    assert failed == []
    assert agent.ctl("status").returncode == 0
    agent.stop()
    assert host_values() == before


def test_report_mode_reports_a_sysctl_w_and_leaves_it(fake_root: Path, start_agent: StartAgent) -> None:
    config = fake_root / "etc/vps-agent/config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("sysctl:\n  mode: report\n  poll_interval: 500ms\n")
    before = host_values()
    agent = start(fake_root, start_agent)
    wait_for(lambda: agent.status()["sysctl"]["status"] == "drifted", what="the fresh namespace's drift reported")
    assert in_namespace(agent, "sysctl", "-n", "net.ipv4.conf.all.accept_redirects") == "1"
    assert not (fake_root / "etc/sysctl.d/60-vps-agent.conf").exists()
    assert agent.ctl("status").returncode == 1
    agent.stop()
    assert host_values() == before

"""The fail2ban guard through the real daemon, with the real `fail2ban-client -d` and `-t`, against a fake
root whose /etc/fail2ban is Debian's own (copied from this machine). fail2ban is never started here."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.controls.fail2ban import parse_dump
from tests.conftest import require_root_and_tools
from tests.integration.harness import Agent, StartAgent, backup_set_of, wait_for

HEAL_TIMEOUT = 10.0
AGENT_FILE = "etc/fail2ban/jail.d/zz-vps-agent.local"


@pytest.fixture(autouse=True)
def _needs_fail2ban_client() -> None:
    require_root_and_tools("fail2ban-client", "unshare")


@pytest.fixture(autouse=True)
def _no_fail2ban_server_here() -> Iterator[None]:
    yield
    # in this machine's own namespaces: a sandbox VPS (another test run) has its own fail2ban
    here = ["pgrep", "--ns", str(os.getpid()), "--nslist", "pid,mnt", "-x", "fail2ban-server"]
    assert subprocess.run(here, capture_output=True).returncode == 1


def effective(root: Path) -> dict[str, str] | None:
    """The sshd jail as the real fail2ban-client parses the fake root's configuration."""
    result = subprocess.run(
        ["fail2ban-client", "-c", str(root / "etc/fail2ban"), "-d"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return parse_dump(result.stdout)


def _healed(agent: Agent, root: Path, drift: Callable[[], object]) -> dict[str, Any]:
    mark = agent.mark()
    drift()
    event = agent.wait_event("drift-reverted", mark, HEAL_TIMEOUT, control="fail2ban")
    jail = effective(root)
    assert jail is not None and jail["port"] == "2222" and jail["maxretry"] == "5", jail
    return event


def test_the_sshd_jail_is_guarded_on_the_ssh_port(fake_root: Path, start_agent: StartAgent) -> None:
    assert (fake_root / "etc/fail2ban/jail.conf").is_file(), "the fake root needs Debian's /etc/fail2ban"
    stock_jail_conf = (fake_root / "etc/fail2ban/jail.conf").read_bytes()
    assert effective(fake_root) is not None  # Debian enables sshd (defaults-debian.conf), on port "ssh"
    agent = start_agent(fake_root)

    status = agent.status()["fail2ban"]
    assert status["status"] in ("healed", "compliant"), status
    jail = effective(fake_root)
    assert jail is not None
    assert (jail["port"], jail["backend"], jail["maxretry"], jail["bantime"]) == ("2222", "systemd", "5", "3600")
    assert jail["banaction"] in ("iptables-multiport", "nftables-multiport")
    assert status["facts"]["port"] == "2222" and status["facts"]["jail"] == "sshd"
    orig = fake_root / "var/lib/vps-agent/backups/fail2ban/jail.conf.orig"
    assert orig.read_bytes() == stock_jail_conf

    # the agent's file deleted, then edited
    agent_file = fake_root / AGENT_FILE
    _healed(agent, fake_root, agent_file.unlink)
    assert agent_file.is_file()
    text = agent_file.read_text()
    _healed(agent, fake_root, lambda: agent_file.write_text(text.replace("maxretry = 5", "maxretry = 50")))
    assert agent_file.read_text() == text

    # a later .local changes the port and raises maxretry: those lines are commented out, after a backup
    other = fake_root / "etc/fail2ban/jail.d/zzz-other.local"
    event = _healed(agent, fake_root, lambda: other.write_text("[sshd]\nport = 99\nmaxretry = 10\nfindtime = 10m\n"))
    lines = other.read_text().splitlines()
    assert lines[0] == "[sshd]" and lines[3] == "findtime = 10m"
    assert lines[1].startswith("# [vps-agent ") and lines[1].endswith("the agent keeps port = 2222: port = 99")
    assert "the agent keeps maxretry = 5: maxretry = 10" in lines[2]
    backup = backup_set_of(fake_root, str(event["transaction"]["id"]), "fail2ban")
    assert (backup / "files" / AGENT_FILE.replace("zz-vps-agent", "zzz-other")).read_text().startswith("[sshd]\nport")
    assert orig.read_bytes() == stock_jail_conf  # copied once, never again


def test_jail_local_cannot_disable_the_jail(fake_root: Path, start_agent: StartAgent) -> None:
    agent = start_agent(fake_root)
    jail_local = fake_root / "etc/fail2ban/jail.local"
    jail_local.write_text("[sshd]\nenabled = false\nport = 22\n")
    outcome = agent.ctl("converge", "fail2ban")
    assert outcome.returncode == 0, outcome.stdout + outcome.stderr
    jail = effective(fake_root)
    assert jail is not None and jail["port"] == "2222"  # jail.d/*.local is read after jail.local
    assert jail_local.read_text() == "[sshd]\nenabled = false\nport = 22\n"  # nothing to neutralise there
    wait_for(lambda: agent.status()["fail2ban"]["status"] in ("healed", "compliant"), what="fail2ban compliant")

"""A safe first install, on fake roots: the postinst writes the config only when there is none (firewall in
report mode), purge removes it; `check` and the daemon without a config file run on the defaults and say
so; the firewall in report mode names a listener enforcing would cut, and `vps-agentctl enforce` refuses
to cut it, then enforces with only the mode's value edited once the port is listed. The daemon and the
listener share a private network namespace: this machine's firewall is never touched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_config
from tests.conftest import require_root_and_tools
from tests.fakeroot import CONFIG, make_root
from tests.integration.harness import Agent, StartAgent, listening_in_netns_of, wait_for

REPO = Path(__file__).resolve().parents[2]
POSTINST = REPO / "packaging/debian/vps-agent.postinst"
POSTRM = REPO / "packaging/debian/vps-agent.postrm"
WEB_PORT = 8080


def maintainer_script(script: Path, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The script as dpkg runs it for `dpkg --root`: DPKG_ROOT names the root (#DEBHELPER# is a comment here)."""
    return subprocess.run(
        ["sh", str(script), *args], env={**os.environ, "DPKG_ROOT": str(root)}, capture_output=True, text=True
    )


@pytest.fixture
def package_root(tmp_path: Path) -> Path:
    """What the unpacked package leaves before its postinst runs: the example, no config."""
    root = tmp_path / "root"
    (root / "usr/share/vps-agent").mkdir(parents=True)
    shutil.copyfile(REPO / "config.example.yaml", root / "usr/share/vps-agent/config.example.yaml")
    return root


def test_a_first_install_writes_the_example_with_the_firewall_reporting(package_root: Path) -> None:
    done = maintainer_script(POSTINST, package_root, "configure", "")
    assert done.returncode == 0, done.stderr
    config = package_root / "etc/vps-agent/config.yaml"
    assert oct(config.stat().st_mode & 0o777) == "0o644"
    loaded = load_config(config)
    assert loaded.firewall.mode == "report"
    assert (loaded.ssh.enabled, loaded.fail2ban.enabled, loaded.sysctl.mode, loaded.updates.enabled) == (
        True,
        True,
        "enforce",
        True,
    )
    example = (REPO / "config.example.yaml").read_text().splitlines()
    written = config.read_text().splitlines()
    changed = [(a, b) for a, b in zip(example, written, strict=True) if a != b]
    assert changed == [("  mode: enforce", "  mode: report  # written so by the first install: see above")]
    assert "sudo vps-agentctl enforce" in config.read_text()  # the comment above says why and how to enforce


def test_a_config_placed_before_the_install_is_kept_byte_for_byte(package_root: Path) -> None:
    config = package_root / "etc/vps-agent/config.yaml"
    config.parent.mkdir(parents=True)
    mine = b"# mine\nfirewall: {allow_tcp: [80, 443]}\n"
    config.write_bytes(mine)
    os.chmod(config, 0o600)
    for args in (("configure", ""), ("configure", "0.1.0"), ("configure", "0.2.0")):
        assert maintainer_script(POSTINST, package_root, *args).returncode == 0
        assert config.read_bytes() == mine and oct(config.stat().st_mode & 0o777) == "0o600"


def test_an_upgrade_never_writes_a_config_the_admin_removed(package_root: Path) -> None:
    assert maintainer_script(POSTINST, package_root, "configure", "0.1.0").returncode == 0
    assert not (package_root / "etc/vps-agent/config.yaml").exists()


def test_purge_removes_the_config_and_remove_keeps_it(package_root: Path) -> None:
    assert maintainer_script(POSTINST, package_root, "configure", "").returncode == 0
    config = package_root / "etc/vps-agent/config.yaml"
    assert maintainer_script(POSTRM, package_root, "remove").returncode == 0
    assert config.is_file()
    assert maintainer_script(POSTRM, package_root, "purge").returncode == 0
    assert not config.exists() and not config.parent.exists()


def test_check_without_a_config_file_uses_the_defaults_and_says_so(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    (root / "etc/vps-agent/config.yaml").unlink()
    probe = Agent.__new__(Agent)
    probe.root = root
    check = probe.ctl("check", "--json", "ssh")
    assert check.stderr == f"no {root}/etc/vps-agent/config.yaml: checking against the defaults\n"
    assert json.loads(check.stdout)["controls"][0]["control"] == "ssh"  # the JSON stays clean


def test_the_daemon_without_a_config_file_runs_on_the_defaults_and_says_so(
    tmp_path: Path, start_agent: StartAgent
) -> None:
    root = make_root(tmp_path / "root")
    (root / "etc/vps-agent/config.yaml").unlink()
    agent = start_agent(root)
    missing = f"no {root}/etc/vps-agent/config.yaml: running on the defaults"
    event = agent.wait_event("config-missing", control=None)
    assert event["log"]["level"] == "warning" and event["message"].startswith(missing)
    status = json.loads(agent.ctl("status", "--json").stdout)
    assert status["config"] == {"path": f"{root}/etc/vps-agent/config.yaml", "error": None, "missing": missing}
    assert missing in agent.ctl("status").stdout


# --- report mode and `vps-agentctl enforce`, in the daemon's network namespace ----------------------------


def ctl_in_netns(agent: Agent, *args: str) -> subprocess.CompletedProcess[str]:
    """vps-agentctl in the daemon's network namespace (enforce reads the listeners there)."""
    argv = ["nsenter", "-t", str(agent.process.pid), "-n", sys.executable, "-m", "agent.cli", "--root", str(agent.root)]
    return subprocess.run([*argv, *args], cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.fixture
def web_server() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


def test_report_mode_names_the_listener_and_enforce_keeps_it_unless_listed(
    tmp_path: Path, start_agent: StartAgent, web_server: list[subprocess.Popen[bytes]]
) -> None:
    require_root_and_tools("iptables", "nsenter", "unshare")
    admins = CONFIG + "firewall:\n  # my comment, kept\n  mode: report   # for now\n"
    root = make_root(tmp_path / "root", config=admins)
    config = root / "etc/vps-agent/config.yaml"
    agent = start_agent(root, netns=True)
    argv = ["nsenter", "-t", str(agent.process.pid), "-n", sys.executable, "-m", "http.server", str(WEB_PORT)]
    web_server.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_for(lambda: WEB_PORT in listening_in_netns_of(agent.process.pid), 10, "the web server to listen")
    agent.ctl("converge", "firewall")  # (else within 10 s: the firewall polls in report mode)
    firewall = agent.status()["firewall"]
    note = f"report mode, would cut {WEB_PORT}/tcp (python3); sudo vps-agentctl enforce"
    assert firewall["why"] == note, firewall
    cut = {"port": WEB_PORT, "proto": "tcp", "process": "python3", "user": "root"}
    assert [{k: v for k, v in c.items() if k != "unit"} for c in firewall["facts"]["would_cut"]] == [cut]
    assert note in agent.ctl("status").stdout.splitlines()[0]  # the verdict line names it too
    assert note in ctl_in_netns(agent, "check", "firewall").stdout

    refused = ctl_in_netns(agent, "enforce")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"would cut off {WEB_PORT}/tcp (python3); nothing changed" in refused.stderr
    assert config.read_text() == admins

    listed = admins + f"  allow_tcp: [{WEB_PORT}]\n"
    config.write_text(listed)
    enforced = ctl_in_netns(agent, "enforce")
    assert enforced.returncode == 0, enforced.stdout + enforced.stderr
    assert config.read_text() == listed.replace("mode: report   # for now", "mode: enforce   # for now")
    wait_for(lambda: agent.status()["firewall"]["facts"].get("mode") == "enforce", 10, "the firewall to enforce")
    assert "would_cut" not in agent.status()["firewall"]["facts"]

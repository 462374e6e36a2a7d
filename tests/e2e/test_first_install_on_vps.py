"""A safe first install on a booted Debian VPS: with no config before `apt install`, the firewall guard
starts in report mode and a web server already listening on 80 keeps answering, named in `status` as what
enforcing would cut; `vps-agentctl enforce` refuses to cut it, and with 80 in firewall.allow_tcp enforces
with 80 still open. A config placed before the install is used byte for byte (no conffile, dpkg asks
nothing), and the upgrade from 0.1.0, which shipped it as a conffile, keeps the admin's edited file as it is."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root_and_tools
from tests.debs import built_deb, released_deb
from tests.e2e.sandbox import Sandbox
from tests.e2e.test_agent_on_vps import (
    FIREWALL_CHAIN,
    TOOLS,
    agent_active,
    agent_vps,
    client_connects,
    firewall_in_place,
    firewall_status,
    status_text,
    wait_for,
)

CONFIG = "/etc/vps-agent/config.yaml"
WEB = "e2e-web"  # python3 -m http.server 80 as a transient unit, as a web server already on the VPS
OTHER = "e2e-other"  # one more listener, on 8081, never listed


def serve(vps: Sandbox, unit: str, port: int) -> None:
    vps.exec(["systemd-run", f"--unit={unit}", "python3", "-m", "http.server", str(port), "--bind", "0.0.0.0"])
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2).close()"
    wait_for(f"{unit} on {port}", lambda: vps.exec(["python3", "-c", probe], check=False).returncode == 0)


def input_policy(vps: Sandbox) -> str:
    rules = vps.exec(["iptables", "-S", "INPUT"]).stdout.splitlines()
    return next(r.split()[2] for r in rules if r.startswith("-P INPUT "))


def config_text(vps: Sandbox) -> str:
    return vps.exec(["cat", CONFIG]).stdout


def conffiles(vps: Sandbox) -> str:
    return vps.exec(["dpkg-query", "-W", "-f=${Conffiles}\n", "vps-agent"]).stdout


def firewall_mode(vps: Sandbox) -> str | None:
    """The firewall guard's mode as the daemon reports it; None while it does not answer (restarting)."""
    status = vps.exec(["vps-agentctl", "status", "--json"], check=False)
    if not status.stdout.strip():
        return None
    firewall = next(c for c in json.loads(status.stdout)["controls"] if c["control"] == "firewall")
    mode: str | None = firewall["facts"].get("mode")
    return mode


def would_cut(vps: Sandbox) -> list[dict[str, object]]:
    facts = firewall_status(vps)["facts"]
    assert isinstance(facts, dict)
    cuts: list[dict[str, object]] = facts.get("would_cut", [])
    return cuts


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory, release: str) -> Iterator[Sandbox]:
    """The .deb installed with no config before it (the first install writes its own), the web server up."""
    with agent_vps(tmp_path_factory, "first-install", release=release, config=None) as vps:
        serve(vps, WEB, 80)
        yield vps


def test_the_first_install_writes_the_example_with_the_firewall_reporting(fresh: Sandbox) -> None:
    text = config_text(fresh)
    example = (Path(__file__).resolve().parents[2] / "config.example.yaml").read_text()
    assert text == example.replace(
        "\n  mode: enforce\n  # Inbound TCP",
        "\n  mode: report  # written so by the first install: see above\n  # Inbound TCP",
    )
    assert CONFIG not in conffiles(fresh)  # the admin's file, not dpkg's
    assert "sudo vps-agentctl enforce" in text


def test_the_web_server_still_answers_and_status_names_it(fresh: Sandbox) -> None:
    wait_for(
        "status to name 80/tcp", lambda: any(c["port"] == 80 for c in would_cut(fresh)), 30, lambda: status_text(fresh)
    )
    [cut] = [c for c in would_cut(fresh) if c["port"] == 80]
    # the daemon may not read a full-capability root process's fds (no CAP_SYS_PTRACE): its unit names it
    assert cut["proto"] == "tcp" and (cut["process"] == "python3" or cut["unit"] == f"{WEB}.service"), cut
    named = f"80/tcp ({cut['process'] or cut['unit']})"
    assert client_connects(fresh, 80)
    assert input_policy(fresh) != "DROP"
    status = fresh.exec(["vps-agentctl", "status"], check=False)
    verdict = status.stdout.splitlines()[0]
    assert f"firewall: report mode, would cut {named}" in verdict and "sudo vps-agentctl enforce" in verdict, (
        status.stdout
    )
    assert any(line.startswith("firewall") and "would cut" in line for line in status.stdout.splitlines())
    check = fresh.exec(["vps-agentctl", "check", "firewall"], check=False)
    # (check runs as root with every capability: it reads the process's fds and names python3 itself)
    assert "would cut 80/tcp (python3)" in check.stdout, check.stdout + check.stderr
    # the other guards enforce from the start: SSH is hardened, fail2ban guards it
    controls = {
        c["control"]: c
        for c in json.loads(fresh.exec(["vps-agentctl", "status", "--json"], check=False).stdout)["controls"]
    }
    assert controls["ssh"]["status"] in ("compliant", "healed", "pending"), controls["ssh"]
    assert fresh.ssh("id -un").stdout.strip() == "admin"


def test_enforce_refuses_while_it_would_cut_80_and_changes_nothing(fresh: Sandbox) -> None:
    before = config_text(fresh)
    refused = fresh.exec(["vps-agentctl", "enforce"], check=False)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "would cut off 80/tcp" in refused.stderr and "nothing changed" in refused.stderr
    assert config_text(fresh) == before
    assert input_policy(fresh) != "DROP" and client_connects(fresh, 80)


def test_with_80_listed_enforce_enforces_and_80_still_answers(fresh: Sandbox) -> None:
    fresh.exec(["sed", "-i", "s/^  allow_tcp: \\[\\]$/  allow_tcp: [80]/", CONFIG])
    listed = config_text(fresh)
    assert "  allow_tcp: [80]\n" in listed
    enforced = fresh.exec(["vps-agentctl", "enforce"], check=False)
    assert enforced.returncode == 0, enforced.stdout + enforced.stderr
    # only the value changed: the comments and every other key are as they were
    assert config_text(fresh) == listed.replace("\n  mode: report  # written", "\n  mode: enforce  # written")
    wait_for("the firewall enforcing", lambda: firewall_in_place(fresh), 30, lambda: status_text(fresh))
    facts = firewall_status(fresh)["facts"]
    assert isinstance(facts, dict) and facts["mode"] == "enforce" and "would_cut" not in facts
    assert "--dport 80 -j ACCEPT" in fresh.exec(["iptables", "-S", FIREWALL_CHAIN]).stdout
    assert client_connects(fresh, 80)
    assert fresh.ssh("id -un").stdout.strip() == "admin"
    serve(fresh, OTHER, 8081)
    assert not client_connects(fresh, 8081)  # enforcing for real: what is not listed is dropped


def test_a_config_placed_before_the_install_is_used_byte_for_byte(
    tmp_path_factory: pytest.TempPathFactory, release: str
) -> None:
    mine = tmp_path_factory.mktemp(f"placed-{release}") / "config.yaml"
    text = "# placed with install -D before apt install\nfirewall:\n  mode: enforce   # I know\n  allow_tcp: [8081]\n"
    mine.write_text(text)
    with agent_vps(tmp_path_factory, "placed", release=release, config=mine) as vps:
        assert config_text(vps) == text
        assert vps.exec(["stat", "-c", "%a %U", CONFIG]).stdout.strip() == "644 root"
        assert CONFIG not in conffiles(vps)
        wait_for("the firewall as the placed config says", lambda: firewall_in_place(vps), 30, lambda: status_text(vps))
        assert "--dport 8081 -j ACCEPT" in vps.exec(["iptables", "-S", FIREWALL_CHAIN]).stdout


def test_the_upgrade_from_0_1_0_keeps_the_admins_edited_conffile_and_its_mode(
    tmp_path_factory: pytest.TempPathFactory, release: str
) -> None:
    require_root_and_tools(*TOOLS)
    previous, current = released_deb("0.1.0"), built_deb()
    with Sandbox(tmp_path_factory.mktemp(f"from-0.1.0-{release}") / "root", release) as vps:
        vps.create(debs=[previous])
        vps.boot()
        wait_for("0.1.0 running", lambda: agent_active(vps), 60)
        assert CONFIG in conffiles(vps)  # 0.1.0 shipped it as a conffile
        vps.exec(["sed", "-i", "s/^  mode: enforce$/  mode: report  # edited by the admin/", CONFIG])
        vps.exec(["sh", "-c", f"printf '# and a line of my own\\n' >> {CONFIG}"])
        edited = config_text(vps)
        assert "mode: report  # edited by the admin" in edited
        vps.exec(["systemctl", "reload", "vps-agent"])

        (vps.root / "root" / current.name).write_bytes(current.read_bytes())
        # stdin is /dev/null: a conffile question from dpkg would fail the upgrade instead of waiting
        upgrade = vps.exec(["apt-get", "install", "-y", f"/root/{current.name}"], check=False, timeout=300)
        assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
        assert "0.2.0" in vps.exec(["vps-agentctl", "--version"]).stdout
        assert config_text(vps) == edited  # not a byte changed, nothing moved to .dpkg-bak
        assert vps.exec(["sh", "-c", "ls /etc/vps-agent"]).stdout.split() == ["config.yaml"]
        wait_for("the upgraded agent", lambda: agent_active(vps), 30)
        wait_for("the admin's mode kept", lambda: firewall_mode(vps) == "report", 30, lambda: status_text(vps))

        purge = vps.exec(["apt-get", "purge", "-y", "vps-agent"], check=False, timeout=300)
        assert purge.returncode == 0, purge.stdout + purge.stderr
        assert vps.exec(["test", "-e", "/etc/vps-agent"], check=False).returncode != 0

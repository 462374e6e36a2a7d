"""The accounts guard of the installed .deb on a booted Debian 12 VPS: the admin the config names is
created with its key and logs in over a real ssh; root without a password and a second uid-0 account
are reported by `vps-agentctl status`, and left as they are."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.sandbox import Sandbox
from tests.e2e.test_agent_on_vps import agent_vps, events, prove_key_login, status_code, wait_for

CONFIG = """# the admin's config: the accounts guard creates deploy, with the client's key
accounts:
  admin_user: deploy
  create_admin: true
  admin_keys:
    - "{key}"
"""


def accounts_status(vps: Sandbox) -> dict[str, Any]:
    controls = json.loads(vps.exec(["vps-agentctl", "status", "--json"], check=False).stdout)["controls"]
    found: dict[str, Any] = next(c for c in controls if c["control"] == "accounts")
    return found


def accounts_events(vps: Sandbox, action: str) -> list[dict[str, Any]]:
    return [e for e in events(vps) if e.get("control") == "accounts" and e["event"]["action"] == action]


@pytest.fixture(scope="module")
def vps(tmp_path_factory: pytest.TempPathFactory, release: str) -> Iterator[Sandbox]:
    """A VPS of its own (its own network namespaces): fresh Debian 12, the .deb, then the accounts config."""
    with agent_vps(tmp_path_factory, "vps-accounts", release=release) as sandbox:
        key = (sandbox.client_dir / "id_ed25519.pub").read_text().strip()
        sandbox.exec(["sh", "-c", "cat > /etc/vps-agent/config.yaml"], input=CONFIG.format(key=key))
        sandbox.exec(["systemctl", "reload", "vps-agent"])
        prove_key_login(sandbox)
        yield sandbox


def test_the_admin_from_the_config_is_created_and_logs_in_with_its_key(vps: Sandbox) -> None:
    wait_for(
        "the agent to create deploy",
        lambda: (
            accounts_status(vps)["status"] in ("healed", "compliant") and bool(accounts_events(vps, "drift-reverted"))
        ),
    )
    who = vps.ssh("id -un; id -Gn", user="deploy").stdout.split("\n")
    assert who[0] == "deploy" and "sudo" in who[1].split(), who
    # the agent never sets a password: sudo has none to ask for until the admin sets one
    sudo = vps.ssh("sudo -n true", user="deploy", check=False)
    assert sudo.returncode != 0 and "password" in sudo.stderr, sudo.stderr
    modes = vps.exec(["stat", "-c", "%a %U %G", "/home/deploy/.ssh", "/home/deploy/.ssh/authorized_keys"]).stdout
    assert modes.split("\n")[:2] == ["700 deploy deploy", "600 deploy deploy"], modes
    shadow = vps.exec(["getent", "shadow", "deploy"]).stdout.split(":")
    assert shadow[1].startswith(("!", "*")), shadow  # locked: no password from anywhere
    passwd = vps.exec(["getent", "passwd", "deploy"]).stdout.strip().split(":")
    assert passwd[5:] == ["/home/deploy", "/bin/bash"], passwd
    accounts = accounts_status(vps)
    assert accounts["facts"]["admin_user"] == "deploy has a key but no usable password for sudo and no NOPASSWD rule"
    assert status_code(vps) == 0  # that is a warning, not drift
    # the SSH guard still finds its way in (the sandbox's admin) and the admin still gets in
    assert vps.ssh("id -un").stdout.strip() == "admin"


def test_root_without_a_password_and_a_second_uid0_account_are_reported_and_left_alone(vps: Sandbox) -> None:
    vps.exec(["passwd", "-d", "root"])
    vps.exec(["useradd", "-o", "-u", "0", "toor"])

    def reported() -> bool:
        drift = accounts_status(vps)["drift"]
        return any("root password is empty" in d for d in drift) and any("uid-0 account toor" in d for d in drift)

    wait_for("status to report both", reported, 20)
    accounts = accounts_status(vps)
    assert accounts["status"] == "drifted" and accounts["facts"]["uid0"] == "root,toor", accounts
    assert accounts["facts"]["root_password"] == "empty"
    assert status_code(vps) == 1
    table = vps.exec(["vps-agentctl", "status"], check=False).stdout
    assert "accounts  drifted" in table and "passwd -l root" in table and "vipw" in table, table
    findings = [f for e in accounts_events(vps, "drift-detected") for f in e.get("findings", [])]
    assert any("root password is empty" in f for f in findings) and any("toor" in f for f in findings), findings
    # reported, never "fixed": root still has no password, toor is still there
    assert vps.exec(["getent", "shadow", "root"]).stdout.split(":")[1] == ""
    assert vps.exec(["getent", "passwd", "toor"]).stdout.startswith("toor:x:0:")

    # the admin cleans up by hand; the guard sees it and the host is compliant again
    vps.exec(["passwd", "-l", "root"])
    vps.exec(["sed", "-i", "/^toor:/d", "/etc/passwd", "/etc/shadow", "/etc/group", "/etc/gshadow"])
    wait_for("the findings to clear", lambda: accounts_status(vps)["status"] == "compliant" and status_code(vps) == 0)
    # and the collectors are told, so the alert drift-detected raised can be resolved
    cleared = accounts_events(vps, "findings-cleared")
    assert cleared and any("toor" in item for item in cleared[-1]["cleared"]), cleared
    assert cleared[-1]["event"]["outcome"] == "success"

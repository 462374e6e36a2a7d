"""A root-only VPS, booted (no sudo user; root logs in with a key, as some providers hand it over): the
SSH guard is blocked (exit 2), says how to make an admin, and root's key still gets in."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.sandbox import Sandbox
from tests.e2e.test_agent_on_vps import agent_vps, sshd_effective, wait_for


@pytest.fixture(scope="module")
def vps(tmp_path_factory: pytest.TempPathFactory, release: str) -> Iterator[Sandbox]:
    with agent_vps(tmp_path_factory, "vps-root-only", admin="none", release=release) as sandbox:
        yield sandbox


def test_the_guard_is_blocked_names_the_admin_to_create_and_root_still_gets_in(vps: Sandbox) -> None:
    def ssh_row() -> dict[str, Any]:
        status = json.loads(vps.exec(["vps-agentctl", "status", "--json"], check=False).stdout)
        found: dict[str, Any] = next(c for c in status["controls"] if c["control"] == "ssh")
        return found

    wait_for("the SSH guard's first converge", lambda: ssh_row()["status"] not in ("starting",), 30)
    status = vps.exec(["vps-agentctl", "status"], check=False)
    assert status.returncode == 2, status.stdout
    row = ssh_row()
    assert row["status"] == "blocked"
    held = {h["setting"]: h for h in row["held"]}
    assert set(held) == {"PermitRootLogin no", "PasswordAuthentication no"}
    assert "no non-root account with sudo rights" in held["PermitRootLogin no"]["reason"]
    assert "adduser" in held["PermitRootLogin no"]["unblock"]
    assert sshd_effective(vps)["permitrootlogin"] != ["no"]
    assert vps.ssh("id -un", user="root").stdout.strip() == "root"

"""Scheduled apt upgrades on a booted Debian 12 VPS with the .deb installed: real apt, real dpkg, a
local repository of dummy packages (v1, then v2, then v3) served as a `file:` source."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import aptrepo
from tests.aptrepo import Dummy
from tests.conftest import require_root_and_tools
from tests.debs import BUILD_TOOLS
from tests.e2e.sandbox import Sandbox
from tests.e2e.test_agent_on_vps import agent_vps, events, prove_key_login, wait_for

TOOLS = ("debootstrap", "unshare", "nsenter", "ip", "ssh", "dpkg-deb", "dpkg-scanpackages", *BUILD_TOOLS)
REPO = "/srv/vps-agent-test-repo"
CONFIG = """# the admin's config for these tests
updates:
  schedule: daily 03:30
  randomized_delay: 0
  lock_timeout: 30s
"""
ADMIN_CONF = "setting = the admin's own\n"


def dummies(version: str) -> list[Dummy]:
    reboot = 'touch /run/reboot-required\necho "$DPKG_MAINTSCRIPT_PACKAGE" >> /run/reboot-required.pkgs'
    return [
        Dummy(
            "vps-dummy", version, (("/usr/share/vps-dummy/version", version),), (), reboot if version != "1.0" else None
        ),
        Dummy("vps-held", version, (("/usr/share/vps-held/version", version),)),
        Dummy("vps-conf", version, (("/etc/vps-conf.conf", f"setting = v{version}\n"),), ("/etc/vps-conf.conf",)),
    ]


def versions(vps: Sandbox) -> dict[str, str]:
    out = vps.exec(["dpkg-query", "-W", "-f", "${Package} ${Version}\n", "vps-dummy", "vps-held", "vps-conf"]).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def publish(vps: Sandbox, version: str) -> None:
    aptrepo.publish(vps.root / REPO.lstrip("/"), dummies(version))


def since(vps: Sandbox, mark: int, action: str) -> list[dict[str, Any]]:
    return [e for e in events(vps)[mark:] if e["event"]["action"] == action]


def configure(vps: Sandbox, text: str) -> None:
    vps.exec(["sh", "-c", "cat > /etc/vps-agent/config.yaml"], input=text)
    vps.exec(["systemctl", "reload", "vps-agent"])


def upgrade_now(vps: Sandbox, timeout: float = 300) -> tuple[int, str]:
    done = vps.exec(["vps-agentctl", "upgrade", "--now"], check=False, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


def hold_dpkg_lock(vps: Sandbox, seconds: int) -> None:
    """Another package manager holds dpkg's frontend lock for a while (a transient unit in the VPS)."""
    code = (
        "import fcntl, time; f = open('/var/lib/dpkg/lock-frontend', 'w'); "
        f"fcntl.lockf(f, fcntl.LOCK_EX); time.sleep({seconds})"
    )
    vps.exec(["systemd-run", "--unit=test-lock-holder", "--collect", "/usr/bin/python3", "-c", code])
    wait_for("the lock to be taken", lambda: vps.exec(["/usr/bin/python3", "-c", LOCK_TAKEN]).stdout.strip() == "1", 10)


# prints 1 while someone holds a write lock on dpkg's frontend lock (F_WRLCK), 2 when it is free
LOCK_TAKEN = (
    "import fcntl, os, struct; fd = os.open('/var/lib/dpkg/lock-frontend', os.O_RDONLY); "
    "q = struct.pack('hhqqi4x', fcntl.F_WRLCK, 0, 0, 0, 0); "
    "print(struct.unpack('hhqqi4x', fcntl.fcntl(fd, fcntl.F_GETLK, q))[0])"
)


@pytest.fixture(scope="module")
def vps(tmp_path_factory: pytest.TempPathFactory, release: str) -> Iterator[Sandbox]:
    require_root_and_tools(*TOOLS)
    with agent_vps(tmp_path_factory, "vps-upgrades", release=release) as sandbox:
        configure(sandbox, CONFIG)
        prove_key_login(sandbox)
        # only the local repository: the VPS has no route to a mirror
        shutil.move(sandbox.root / "etc/apt/sources.list", sandbox.root / "etc/apt/sources.list.orig")
        (sandbox.root / "etc/apt/sources.list.d/test.list").write_text(aptrepo.SOURCE_LINE.format(path=REPO))
        publish(sandbox, "1.0")
        sandbox.exec(["apt-get", "update", "-q"], timeout=120)
        sandbox.exec(["apt-get", "install", "-y", "-q", "vps-dummy", "vps-held", "vps-conf"], timeout=300)
        sandbox.exec(["apt-mark", "hold", "vps-held"])
        sandbox.exec(["sh", "-c", "cat > /etc/vps-conf.conf"], input=ADMIN_CONF)
        yield sandbox


def test_upgrade_now_upgrades_keeps_holds_and_the_admins_conffile_and_reports(vps: Sandbox) -> None:
    assert versions(vps) == {"vps-dummy": "1.0", "vps-held": "1.0", "vps-conf": "1.0"}
    publish(vps, "2.0")
    mark = len(events(vps))
    code, output = upgrade_now(vps)
    assert code == 0, output
    assert "vps-dummy 1.0 -> 2.0" in output and "vps-conf 1.0 -> 2.0" in output, output
    assert versions(vps) == {"vps-dummy": "2.0", "vps-held": "1.0", "vps-conf": "2.0"}
    # the admin's conffile stays, without a prompt; the package's version lands beside it
    assert vps.exec(["cat", "/etc/vps-conf.conf"]).stdout == ADMIN_CONF
    assert vps.exec(["cat", "/etc/vps-conf.conf.dpkg-dist"]).stdout == "setting = v2.0\n"

    [started] = since(vps, mark, "upgrade-started")
    assert started["held"] == ["vps-held"] and started["trigger"] == "vps-agentctl upgrade --now"
    [finished] = since(vps, mark, "upgrade-finished")
    assert finished["event"]["outcome"] == "success", finished
    assert {"vps-dummy 1.0 -> 2.0", "vps-conf 1.0 -> 2.0"} <= set(finished["packages"])
    assert not any(str(p).startswith("vps-held") for p in finished["packages"])
    assert finished["reboot_required"] is True and float(finished["duration_s"]) > 0
    assert since(vps, mark, "reboot-required")[0]["packages"] == ["vps-dummy"]

    status = vps.exec(["vps-agentctl", "status"], check=False)
    assert status.returncode == 0, status.stdout  # the guards stayed compliant through the upgrade
    assert "last run" in status.stdout and "success, 2 package(s) changed" in status.stdout, status.stdout
    assert "REBOOT REQUIRED by vps-dummy" in status.stdout and "next run" in status.stdout, status.stdout
    updates = json.loads(vps.exec(["vps-agentctl", "status", "--json"]).stdout)["updates"]
    assert updates["last_outcome"] == "success" and updates["next_run"] > time.time()


def test_a_held_dpkg_lock_is_waited_for_then_the_run_proceeds(vps: Sandbox) -> None:
    publish(vps, "3.0")
    hold_dpkg_lock(vps, 6)
    started = time.monotonic()
    code, output = upgrade_now(vps)
    took = time.monotonic() - started
    assert code == 0, output
    assert versions(vps)["vps-dummy"] == "3.0"
    assert took >= 4, f"the run did not wait for the lock ({took:.1f}s)"


def test_a_lock_held_past_lock_timeout_fails_the_run_clearly(vps: Sandbox) -> None:
    configure(vps, CONFIG.replace("lock_timeout: 30s", "lock_timeout: 2s"))
    publish(vps, "4.0")
    hold_dpkg_lock(vps, 120)
    mark = len(events(vps))
    try:
        code, output = upgrade_now(vps)
    finally:
        vps.exec(["systemctl", "stop", "test-lock-holder"], check=False)
        configure(vps, CONFIG)
    assert code == 2, output
    assert "the dpkg lock stayed taken for over 2s" in output, output
    assert versions(vps)["vps-dummy"] == "3.0"
    [finished] = since(vps, mark, "upgrade-finished")
    assert finished["event"]["outcome"] == "failure"
    assert "dpkg lock" in str(finished["message"])


def test_a_run_missed_while_the_agent_was_down_runs_after_start_up(vps: Sandbox) -> None:
    vps.exec(["systemctl", "stop", "vps-agent"])
    state_file = vps.root / "var/lib/vps-agent/updates.json"
    state = json.loads(state_file.read_text())
    assert state["schedule"] == "daily 03:30"
    state["next_run"] = time.time() - 3600  # the 03:30 run came and went while the agent was off
    state_file.write_text(json.dumps(state))
    mark = len(events(vps))
    vps.exec(["systemctl", "start", "vps-agent"])
    wait_for("the catch-up run to finish", lambda: bool(since(vps, mark, "upgrade-finished")), 120)
    [started] = since(vps, mark, "upgrade-started")
    assert started["trigger"] == "catch-up"
    assert versions(vps)["vps-dummy"] == "4.0"  # published by the previous test, upgraded now
    state = json.loads(state_file.read_text())
    assert state["next_run"] > time.time() and state["last_outcome"] == "success"


def test_packages_are_never_left_half_configured(vps: Sandbox) -> None:
    audit = vps.exec(["dpkg", "--audit"], check=False)
    assert audit.returncode == 0 and audit.stdout.strip() == "", audit.stdout
    assert not list(Path(vps.root / "var/lib/dpkg/updates").iterdir())

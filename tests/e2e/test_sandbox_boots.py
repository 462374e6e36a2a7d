"""The e2e test bed itself: a real Debian 12 boots with systemd as PID 1, its sshd lets the admin in
over a real network from the client namespace, a power cycle boots it again, and poweroff leaves
nothing behind on the host."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root_and_tools
from tests.e2e.sandbox import Sandbox

TOOLS = ("debootstrap", "unshare", "nsenter", "ip", "ssh", "ssh-keygen")


@pytest.fixture
def vps(tmp_path: Path, release: str) -> Iterator[Sandbox]:
    require_root_and_tools(*TOOLS)
    with Sandbox(tmp_path / "root", release) as sandbox:
        yield sandbox
    sandbox.destroy()  # a root is ~300 MB; pytest keeps the last three runs' tmp dirs


def host_network() -> str:
    """The host's interfaces and addresses: booting a sandbox must not change them."""
    return subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout


def leftovers(vps: Sandbox) -> list[str]:
    """Anything of the sandbox still on the host: processes in its root, mounts, namespaces, cgroups."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "root") == str(vps.root):
                found.append(f"process {proc.name}")
        except OSError:
            pass  # gone meanwhile, or a zombie
    mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True).stdout
    found += [f"mount {m}" for m in mounts.splitlines() if m.startswith(str(vps.root))]
    # this sandbox's own names (the script derives them from the root's path): other sandboxes, of
    # another test session on the same machine, are not this one's leftovers
    sandbox_id = hashlib.sha256(str(vps.root).encode()).hexdigest()[:8]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    mine = (f"vps-{sandbox_id}", f"vpsclient-{sandbox_id}")
    found += [f"netns {n}" for n in netns.splitlines() if n.split()[0] in mine]
    for base in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        found += [f"cgroup {c}" for c in base.glob(f"vps-sandbox-{sandbox_id}")]
    return found


def system_state(vps: Sandbox) -> str:
    state = vps.exec(["systemctl", "is-system-running"], check=False).stdout.strip()
    if state == "degraded":
        failed = vps.exec(["systemctl", "--failed", "--no-legend", "--plain"], check=False).stdout
        print(f"degraded, failed units:\n{failed}")
    return state


def test_a_fresh_vps_boots_and_its_admin_gets_in_over_ssh_with_key_and_password(vps: Sandbox) -> None:
    require_root_and_tools(*TOOLS)
    network_before = host_network()
    vps.create()
    vps.boot()

    assert system_state(vps) in ("running", "degraded")
    assert vps.exec(["systemctl", "is-active", "ssh.service"]).stdout.strip() == "active"
    assert vps.exec(["hostname"]).stdout.strip() == "vps"
    assert vps.exec(["sh", "-c", "exit 7"], check=False).returncode == 7  # exit codes pass through
    assert host_network() == network_before  # every address and interface is inside the namespaces

    # a real ssh over the veth, the host key checked against the pinned one, the admin's own key
    assert vps.ssh("id -un").stdout.strip() == "admin"
    client_ip = vps.ssh("echo $SSH_CONNECTION").stdout.split()[0]
    assert client_ip == "10.213.0.2"
    # the password works too, for ssh and for sudo: the admin can become root, as a real one can
    assert vps.ssh_with_password("id -un").stdout.strip() == "admin"
    root = vps.ssh("sudo -S -p '' id -un", input=vps.password + "\n")
    assert root.stdout.strip() == "root"

    vps.poweroff()
    assert not vps.is_booted()
    assert leftovers(vps) == []


def test_a_power_cycle_boots_the_same_vps_again(vps: Sandbox) -> None:
    require_root_and_tools(*TOOLS)
    vps.create()
    vps.boot()
    first_boot = vps.exec(["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip()
    vps.exec(["sh", "-c", "echo kept > /var/lib/power-cycle-marker"])

    vps.power_cycle()

    assert system_state(vps) in ("running", "degraded")
    assert vps.exec(["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip() != first_boot
    assert vps.exec(["cat", "/var/lib/power-cycle-marker"]).stdout.strip() == "kept"
    boots = vps.exec(["journalctl", "--list-boots"]).stdout.splitlines()[1:]  # systemd 252: no --no-legend
    assert len(boots) == 2, boots
    assert vps.ssh("id -un").stdout.strip() == "admin"
    vps.poweroff()
    assert leftovers(vps) == []

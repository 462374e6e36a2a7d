"""What sshd listens on, read the way the installed unit must: without CAP_SYS_PTRACE, against a real
sshd (non-dumpable, so its /proc/PID/fd is closed to such a reader) in a private network namespace.
Then the firewall and the port move on top of it, through the real daemon in sshd's namespace."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_root_and_tools
from tests.fakeroot import CONFIG, make_root, write
from tests.integration.harness import (
    NO_PTRACE,
    REPO,
    Agent,
    in_netns_of,
    listening_in_netns_of,
    sshd_in_namespaces,
    wait_for,
)

UNIT = REPO / "systemd/vps-agent.service"
CAP_SYS_PTRACE = 19
CHAIN = "vps-agent-input"

# run inside sshd's mount and network namespaces: /etc/ssh is the fake root's there, as for the daemon
READ = """
import json, sys
sys.path.insert(0, sys.argv[2])
from agent.paths import SystemRoot
from agent.controls.ssh.ports import SSHD_EXECUTABLES, SshdPorts
from agent.system import netfilter
listening = netfilter.tcp_listening("sshd", SSHD_EXECUTABLES)
caps = next(l for l in open("/proc/self/status") if l.startswith("CapEff:")).split()[1]
print(json.dumps({
    "cap_eff": int(caps, 16),
    "attributed": sorted(listening.ports),
    "hidden": listening.hidden,
    "sshd_ports": sorted(SshdPorts(SystemRoot.at(sys.argv[1]))()),
    "sock_diag": sorted(netfilter.tcp_listeners().items()),
    "proc_net_tcp": sorted(netfilter._proc_net_listeners().items()),
}))
"""


@pytest.fixture(autouse=True)
def _needs_tools() -> None:
    require_root_and_tools("setpriv", "ss", "ip", "iptables")


def unit_bounding_set() -> list[str]:
    """setpriv's --bounding-set argument for exactly the capabilities vps-agent.service keeps."""
    [line] = re.findall(r"^CapabilityBoundingSet=(.*)$", UNIT.read_text(), re.M)
    return ["--bounding-set", "-all," + ",".join("+" + cap.lower().removeprefix("cap_") for cap in line.split())]


def read_in(sshd: subprocess.Popen[bytes], root: Path, caps: list[str]) -> dict[str, Any]:
    argv = ["nsenter", "-t", str(sshd.pid), "-m", "-n", "--", *caps, sys.executable, "-c", READ, str(root), str(REPO)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def on_port(root: Path, port: int) -> Path:
    write(root / "etc/ssh/sshd_config.d/50-test.conf", f"Port {port}\n")
    return root


def test_with_the_units_capabilities_sshds_port_is_still_found(fake_root: Path) -> None:
    with sshd_in_namespaces(on_port(fake_root, 2345)) as sshd:
        wait_for(lambda: listening_in_netns_of(sshd.pid) == {2345}, what="sshd on 2345")
        unit = read_in(sshd, fake_root, ["setpriv", *unit_bounding_set(), "--inh-caps", "-all", "--"])
        full = read_in(sshd, fake_root, [])
    assert not unit["cap_eff"] & (1 << CAP_SYS_PTRACE) and full["cap_eff"] & (1 << CAP_SYS_PTRACE)
    # what listening_tcp_ports("sshd") answered before: nothing, sshd's fds being closed to this reader
    assert unit["attributed"] == [] and unit["hidden"], unit
    # now: sshd -T's ports that root listens on here
    assert unit["sshd_ports"] == [2345], unit
    # with CAP_SYS_PTRACE (the tests, root in a shell) sshd's own sockets answer, as before
    assert full["attributed"] == [2345] and not full["hidden"] and full["sshd_ports"] == [2345], full
    # sock_diag and the kernel's text tables agree (inode -> [port, uid])
    assert unit["sock_diag"] == unit["proc_net_tcp"] and len(unit["sock_diag"]) == 2, unit  # 0.0.0.0 and ::


def test_a_configured_port_nobody_listens_on_is_not_sshds(fake_root: Path) -> None:
    with sshd_in_namespaces(on_port(fake_root, 2345)) as sshd:
        wait_for(lambda: listening_in_netns_of(sshd.pid) == {2345}, what="sshd on 2345")
        # the files now say 2346 too, sshd was not reloaded: it does not listen there
        write(fake_root / "etc/ssh/sshd_config.d/50-test.conf", "Port 2345\nPort 2346\n")
        seen = read_in(sshd, fake_root, list(NO_PTRACE))
    assert seen["hidden"] and seen["sshd_ports"] == [2345], seen


# The daemon's parent, without CAP_SYS_PTRACE like it: such a daemon cannot read PID 1's network
# namespace, and proves that a fake root is not in the host's through an ancestor it may read
# (agent/system/netfilter.py: in_host_network_namespace); a parent with every capability is closed to it.
PARENT = (
    "import signal, subprocess, sys; child = subprocess.Popen(sys.argv[1:]); "
    "signal.signal(signal.SIGTERM, lambda *_: child.terminate()); sys.exit(child.wait())"
)


@contextmanager
def agent_in_netns_of(sshd: subprocess.Popen[bytes], root: Path, *, ptrace: bool = False) -> Iterator[Agent]:
    """The real daemon in sshd's network namespace, ready; without CAP_SYS_PTRACE, as the unit runs it.
    /proc/PID/ns/net is closed without CAP_SYS_PTRACE too: nsenter gets a bind mount of it instead."""
    netns = root.parent / f"netns-{sshd.pid}"
    netns.touch()
    subprocess.run(["mount", "--bind", f"/proc/{sshd.pid}/ns/net", str(netns)], check=True)
    try:
        enter = ["nsenter", f"--net={netns}", "--"]
        agent = Agent(root, wrap=enter if ptrace else [*NO_PTRACE, sys.executable, "-c", PARENT, *enter])
        try:
            agent.wait_ready()
            yield agent
        finally:
            code = agent.stop()
        assert code == 0, agent.output()
    finally:
        subprocess.run(["umount", str(netns)], check=True)


def accepted(pid: int) -> set[int]:
    rules = in_netns_of(pid, "iptables", "-S").stdout.splitlines()
    return {int(m.group(1)) for r in rules if (m := re.match(rf"-A {CHAIN} -p tcp -m tcp --dport (\d+) -j ACCEPT$", r))}


def test_with_the_ssh_guard_off_the_firewall_keeps_sshds_port_open(tmp_path: Path) -> None:
    """Before, the firewall (ssh_ports = the SSH guard's port + what sshd listens on) accepted no SSH at
    all here: a lockout on every install that guards the firewall but not sshd."""
    root = make_root(tmp_path / "root", config="ssh:\n  enabled: false\n")
    with sshd_in_namespaces(root) as sshd:
        wait_for(lambda: listening_in_netns_of(sshd.pid) == {22}, what="sshd on 22")
        with agent_in_netns_of(sshd, root) as agent:
            wait_for(lambda: accepted(sshd.pid) == {22}, what="the firewall accepting 22")
            assert agent.status()["firewall"]["facts"]["ssh_ports_accepted"] == "22"


ON_22 = CONFIG.replace("port: 2222", "port: 22")  # where the stock sshd_config has sshd already


@pytest.mark.parametrize("caps", ["without CAP_SYS_PTRACE", "with CAP_SYS_PTRACE"])
def test_a_confirmed_port_move_closes_the_old_port_in_the_firewall(tmp_path: Path, caps: str) -> None:
    root = make_root(tmp_path / "root", config=ON_22)
    with sshd_in_namespaces(root) as sshd, agent_in_netns_of(sshd, root, ptrace=caps.startswith("with ")) as agent:
        wait_for(lambda: accepted(sshd.pid) == {22}, what="the firewall on 22")
        mark = agent.mark()
        write(root / "etc/vps-agent/config.yaml", CONFIG)  # ssh.port 2222
        assert agent.ctl("reload").returncode == 0
        agent.wait_event("port-move-started", mark)
        wait_for(lambda: listening_in_netns_of(sshd.pid) == {22, 2222}, what="sshd on both ports")
        wait_for(lambda: accepted(sshd.pid) == {22, 2222}, what="the firewall on both ports")
        confirm = agent.ctl("confirm")
        assert confirm.returncode == 0, confirm.stdout + confirm.stderr
        agent.wait_event("port-move-confirmed", mark)
        # confirm answers once sshd has let go of 22 and the firewall was asked: no timer to wait for
        assert listening_in_netns_of(sshd.pid) == {2222}
        wait_for(lambda: accepted(sshd.pid) == {2222}, 1.0, "the firewall closing 22")


def test_a_rolled_back_port_move_closes_the_new_port_in_the_firewall(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root", config=ON_22)
    with sshd_in_namespaces(root) as sshd, agent_in_netns_of(sshd, root) as agent:
        wait_for(lambda: accepted(sshd.pid) == {22}, what="the firewall on 22")
        mark = agent.mark()
        write(root / "etc/vps-agent/config.yaml", CONFIG.replace("port: 2222", "port: 2222\n  confirm_timeout: 10s"))
        assert agent.ctl("reload").returncode == 0
        agent.wait_event("port-move-started", mark)
        wait_for(lambda: accepted(sshd.pid) == {22, 2222}, what="the firewall on both ports")
        agent.wait_event("port-move-rolled-back", mark, timeout=20)
        wait_for(lambda: listening_in_netns_of(sshd.pid) == {22}, what="sshd back on 22 only")
        wait_for(lambda: accepted(sshd.pid) == {22}, 1.0, "the firewall closing 2222")

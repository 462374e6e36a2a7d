"""What enforcing the firewall would cut off (controls/firewall/exposure.py): in report mode `status` and
`check` name each listener the enforced ruleset would drop, and `vps-agentctl enforce` refuses to cut one
without --yes."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import Config, FirewallConfig, PortRule, SshConfig
from agent.controls.firewall import FirewallControl
from agent.controls.firewall.exposure import WouldCut, report_note, would_cut
from agent.engine import transaction as tx
from agent.events import Events, EventSinks
from agent.paths import SystemRoot
from agent.system import backups, fs, netfilter
from agent.system.netfilter import OpenSocket
from tests.guards import SSH_ON_22_FOR_2222
from tests.unit.conftest import DeclaredCommands
from tests.unit.test_firewall_control import SAVED_EMPTY, _declare_nft

NAMES = {1: {"nginx"}, 2: {"nginx"}, 3: {"python3"}, 6: {"named"}, 7: {"sshd"}}


def names(inodes: set[int]) -> dict[int, set[str]]:
    return {inode: NAMES[inode] for inode in inodes if inode in NAMES}


def sock(proto: str, address: str, port: int, inode: int, uid: int = 0) -> OpenSocket:
    return OpenSocket(proto, address, port, uid, inode)


def cut(firewall: FirewallConfig, *sockets: OpenSocket, ssh: tuple[int, ...] = (22,)) -> list[str]:
    return [c.describe() for c in would_cut(firewall, ssh, sockets, names)]


def test_a_web_server_not_in_allow_tcp_would_be_cut_once_per_port() -> None:
    sockets = (sock("tcp", "0.0.0.0", 80, 1), sock("tcp", "::", 80, 2), sock("tcp", "0.0.0.0", 443, 1))
    assert cut(FirewallConfig(), *sockets) == ["80/tcp (nginx)", "443/tcp (nginx)"]


def test_loopback_listeners_are_never_cut() -> None:
    sockets = (sock("tcp", "127.0.0.1", 5432, 3), sock("tcp", "::1", 6379, 3), sock("udp", "127.0.0.53", 53, 6))
    assert cut(FirewallConfig(), *sockets, sock("tcp", "::ffff:127.0.0.1", 8080, 3)) == []


def test_allowed_ports_ranges_and_source_limited_rules_are_not_cut() -> None:
    firewall = FirewallConfig(allow_tcp=(PortRule(80), PortRule(8000, 8100), PortRule(5432, None, ("10.0.0.0/8",))))
    sockets = (sock("tcp", "0.0.0.0", 80, 1), sock("tcp", "0.0.0.0", 8080, 3), sock("tcp", "10.0.0.5", 5432, 3))
    assert cut(firewall, *sockets, sock("tcp", "0.0.0.0", 9000, 3)) == ["9000/tcp (python3)"]


def test_the_ssh_ports_stay_open_for_tcp_only() -> None:
    sockets = (sock("tcp", "0.0.0.0", 2222, 7), sock("udp", "0.0.0.0", 2222, 6))
    assert cut(FirewallConfig(), *sockets, ssh=(22, 2222)) == ["2222/udp (named)"]


def test_udp_is_cut_unless_in_allow_udp() -> None:
    dns = sock("udp", "0.0.0.0", 53, 6)
    assert cut(FirewallConfig(), dns) == ["53/udp (named)"]
    assert cut(FirewallConfig(allow_udp=(PortRule(53),)), dns) == []


def test_a_process_the_agent_may_not_read_is_named_by_its_user() -> None:
    assert cut(FirewallConfig(), sock("tcp", "0.0.0.0", 8081, 99, uid=0)) == ["8081/tcp (user root)"]
    [unknown] = would_cut(FirewallConfig(), (22,), (sock("tcp", "::", 8081, 99, uid=4242),), names)
    assert unknown.as_fact() == {"port": 8081, "proto": "tcp", "process": None, "unit": None, "user": "4242"}


def test_a_process_the_agent_may_not_read_is_named_by_its_sockets_systemd_unit(tmp_path: Path) -> None:
    # the daemon has no CAP_SYS_PTRACE: root's nginx, holding more capabilities, hides its fds from it too
    base = tmp_path / "cgroup"
    (base / "system.slice/nginx.service").mkdir(parents=True)
    (base / "cgroup.controllers").write_text("cpu memory pids\n")
    nginx = (base / "system.slice/nginx.service").stat().st_ino
    root = base.stat().st_ino
    assert netfilter.cgroup_paths({nginx, root, 0}, base) == {nginx: "system.slice/nginx.service"}
    sockets = (OpenSocket("tcp", "0.0.0.0", 80, 0, 98, nginx), OpenSocket("tcp", "::", 80, 0, 99, nginx))
    found = would_cut(FirewallConfig(), (22,), sockets, names, lambda ids: netfilter.cgroup_paths(ids, base))
    assert [c.describe() for c in found] == ["80/tcp (nginx.service)"]
    assert netfilter.cgroup_paths({nginx}, tmp_path) == {}  # no cgroup v2 there: nothing is guessed


def test_the_report_note_names_the_cuts_and_the_command() -> None:
    cuts = (WouldCut(80, "tcp", "nginx", "root"), WouldCut(53, "udp", None, "bind"))
    assert report_note(cuts) == "report mode, would cut 80/tcp (nginx), 53/udp (user bind); sudo vps-agentctl enforce"
    assert report_note(()) == "report mode, would cut nothing; sudo vps-agentctl enforce"


def test_open_sockets_reads_listening_tcp_and_unconnected_udp_with_their_addresses() -> None:
    # sock_diag in this process's network namespace: whatever listens here, each with a parseable address
    for found in netfilter.open_sockets():
        assert found.proto in ("tcp", "udp") and 0 < found.port < 65536
        assert isinstance(found.loopback, bool)


def test_the_proc_net_fallback_reads_addresses_as_the_kernel_writes_them() -> None:
    assert netfilter._proc_address("0100007F") == "127.0.0.1"  # little-endian words
    assert netfilter._proc_address("00000000000000000000000001000000") == "::1"


def _report_control(tmp_path: Path, seen: list[tuple[FirewallConfig, tuple[int, ...]]]) -> FirewallControl:
    def fake(firewall: FirewallConfig, ssh: tuple[int, ...]) -> tuple[WouldCut, ...]:
        seen.append((firewall, ssh))
        return (WouldCut(80, "tcp", "nginx", "root"),)

    return FirewallControl(SystemRoot.at(tmp_path), lambda: False, would_cut=fake)


@pytest.mark.parametrize("mode", ["report", "enforce"])
def test_status_facts_carry_would_cut_in_report_mode_only(
    mode: str, tmp_path: Path, commands: DeclaredCommands
) -> None:
    _declare_nft(commands, {"ipv4": SAVED_EMPTY, "ipv6": SAVED_EMPTY})
    seen: list[tuple[FirewallConfig, tuple[int, ...]]] = []
    control = _report_control(tmp_path, seen)
    config = Config(ssh=SshConfig(port=2222), firewall=FirewallConfig(mode=mode, allow_tcp=(PortRule(443),)))
    events = Events(EventSinks(None, to_stdout=False, ring_size=10))
    ctx = tx.TransactionContext(events, backups.BackupStore(tmp_path / "backups", 5), fs.EchoFilter())
    outcome = tx.converge(control, config, ctx, ssh=SSH_ON_22_FOR_2222, reason="check", heal=False)
    if mode == "enforce":
        assert "would_cut" not in outcome.facts and seen == [] and control.report_note(outcome.facts) == ""
        return
    assert outcome.facts["would_cut"] == [
        {"port": 80, "proto": "tcp", "process": "nginx", "unit": None, "user": "root"}
    ]
    assert seen == [(config.firewall, (22, 2222))]  # the config's allow rules, and every SSH port
    assert control.report_note(outcome.facts) == "report mode, would cut 80/tcp (nginx); sudo vps-agentctl enforce"

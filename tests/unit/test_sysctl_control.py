"""The sysctl guard on a fake root: a fake /proc/sys (one file per key, as the kernel shows them), its
sysctl.d files, /sys/class/net and /proc/net routes; converged through the real transaction."""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.config import SYSCTL_DEFAULTS, Config, parse_config
from agent.controls.base import FINDING, FIX, WARNING
from agent.controls.sysctl import SysctlControl, SysctlDesired, SysctlObserved
from agent.engine import transaction as tx
from agent.engine.runner import FLAPPING, ControlRunner
from agent.events import Events, EventSinks
from agent.paths import SystemRoot
from agent.system import backups, fs
from agent.system import sysctl as door
from tests.guards import NO_SSH, no_ssh_ports

# what a stock Debian 12 kernel shows for the keys the agent keeps
STOCK = {
    "fs.protected_fifos": "1",
    "fs.protected_regular": "2",
    "fs.suid_dumpable": "0",
    "kernel.kptr_restrict": "0",
    "kernel.dmesg_restrict": "1",
    "kernel.unprivileged_bpf_disabled": "2",
    "kernel.sysrq": "438",
    "net.core.bpf_jit_harden": "0",
    "dev.tty.ldisc_autoload": "1",
    "net.ipv4.conf.all.accept_redirects": "1",
    "net.ipv4.conf.default.accept_redirects": "1",
    "net.ipv6.conf.all.accept_redirects": "1",
    "net.ipv4.conf.all.log_martians": "0",
    "net.ipv4.ip_forward": "0",
    "net.ipv6.conf.all.accept_ra": "1",
    "net.ipv4.conf.all.rp_filter": "0",
}
DROPIN = "etc/sysctl.d/60-vps-agent.conf"
RA_ROUTE = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00450003     eth0\n"  # noqa: E501
STATIC_ROUTE = RA_ROUTE.replace("00450003", "00000003")


def make_proc_sys(root: Path, values: dict[str, str] | None = None) -> None:
    for key, value in {**dict(SYSCTL_DEFAULTS), **STOCK, **(values or {})}.items():
        path = root / "proc/sys" / key.replace(".", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")


def live(root: Path, key: str) -> str:
    return (root / "proc/sys" / key.replace(".", "/")).read_text().strip()


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "root"
        (self.root / "etc/sysctl.d").mkdir(parents=True)
        make_proc_sys(self.root)
        self.events = Events(EventSinks(None, to_stdout=False, ring_size=200))
        self.ctx = tx.TransactionContext(self.events, backups.BackupStore(tmp_path / "backups", 5), fs.EchoFilter())
        self.control = SysctlControl(SystemRoot.at(self.root))

    def converge(self, config: Config | None = None, heal: bool = True) -> tx.Outcome:
        return tx.converge(self.control, config or Config(), self.ctx, ssh=NO_SSH, reason="test", heal=heal)

    def actions(self) -> list[str]:
        return [e["event"]["action"] for e in self.events.sinks.recent(200)]


@pytest.fixture
def host(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_a_fresh_host_gets_the_file_and_every_live_value(host: Harness) -> None:
    outcome = host.converge()
    assert outcome.status == tx.HEALED, outcome.detail
    text = (host.root / DROPIN).read_text()
    for key, value in SYSCTL_DEFAULTS:
        assert f"\n{key} = {value}\n" in text
        assert live(host.root, key) == value, key
    assert "set kernel.kptr_restrict = 2 (was 0)" in outcome.changes.notes  # type: ignore[union-attr]
    assert host.converge().status == tx.COMPLIANT
    assert host.converge().facts == {"keys": len(SYSCTL_DEFAULTS), "live_as_kept": len(SYSCTL_DEFAULTS)}


def test_a_runtime_sysctl_w_is_healed_and_reported_like_any_drift(host: Harness) -> None:
    host.converge()
    file_before = (host.root / DROPIN).read_bytes()
    (host.root / "proc/sys/net/ipv4/conf/all/accept_redirects").write_text("1\n")  # what `sysctl -w` does
    outcome = host.converge()
    assert outcome.status == tx.HEALED
    assert live(host.root, "net.ipv4.conf.all.accept_redirects") == "0"
    assert (host.root / DROPIN).read_bytes() == file_before
    detected = [e for e in host.events.sinks.recent(200) if e["event"]["action"] == "drift-detected"][-1]
    assert detected["file"]["path"] == "/proc/sys/net/ipv4/conf/all/accept_redirects"
    assert "-net.ipv4.conf.all.accept_redirects = 1\n+net.ipv4.conf.all.accept_redirects = 0\n" in detected["diff"]
    assert host.actions()[-2:] == ["drift-detected", "drift-reverted"]


def test_report_mode_and_check_change_nothing(host: Harness) -> None:
    outcome = host.converge(heal=False)
    assert outcome.status == tx.DRIFTED
    assert not (host.root / DROPIN).exists() and live(host.root, "kernel.sysrq") == "438"
    assert not SysctlControl(SystemRoot.at(host.root)).meta(parse_config("sysctl:\n  mode: report\n")).remediates


def test_a_later_file_overriding_a_key_is_neutralised_and_its_other_lines_stay_byte_identical(host: Harness) -> None:
    admin = host.root / "etc/sysctl.d/99-admin.conf"
    original = b"# my tuning\r\nvm.swappiness = 10\r\nkernel.sysrq=1\r\n; old\r\nnet.ipv4.tcp_syncookies = 1\r\n"
    admin.write_bytes(original)
    earlier = host.root / "etc/sysctl.d/10-early.conf"
    earlier.write_bytes(b"kernel.sysrq = 1\n")  # sorts before the agent's: the agent's file wins at boot
    outcome = host.converge()
    assert outcome.status == tx.HEALED, outcome.detail
    after = admin.read_bytes().split(b"\r\n")
    before = original.split(b"\r\n")
    assert after[2].startswith(b"# [vps-agent ") and after[2].endswith(
        b"the agent keeps kernel.sysrq = 0: kernel.sysrq=1"
    )
    assert after[:2] + after[3:] == before[:2] + before[3:]
    assert earlier.read_bytes() == b"kernel.sysrq = 1\n"
    assert "comment out /etc/sysctl.d/99-admin.conf:3 (kernel.sysrq = 1)" in outcome.changes.notes  # type: ignore[union-attr]
    assert host.converge().status == tx.COMPLIANT
    saved = list((host.ctx.backups.directory / "sysctl").rglob("99-admin.conf"))
    assert saved and saved[0].read_bytes() == original


# Debian 12's procps ships this, sorting after the agent's file: fs.protected_fifos = 1 would win at boot
PROTECT_LINKS = (
    b"###################################################################\n# Protected links\n#\n"
    b"# Protects against creating or following links under certain conditions\n"
    b"# Debian kernels have both set to 1 (restricted) \n"
    b"# See https://www.kernel.org/doc/Documentation/sysctl/fs.txt\n"
    b"fs.protected_fifos = 1\nfs.protected_hardlinks = 1\nfs.protected_regular = 2\nfs.protected_symlinks = 1\n"
)


def test_a_vendor_file_is_masked_by_a_same_named_copy_in_etc(host: Harness) -> None:
    vendor = host.root / "usr/lib/sysctl.d/99-protect-links.conf"
    vendor.parent.mkdir(parents=True)
    vendor.write_bytes(PROTECT_LINKS)
    outcome = host.converge()
    assert outcome.status == tx.HEALED
    notes = outcome.changes.notes  # type: ignore[union-attr]
    assert "mask /usr/lib/sysctl.d/99-protect-links.conf with /etc/sysctl.d/99-protect-links.conf" in notes
    mask = (host.root / "etc/sysctl.d/99-protect-links.conf").read_bytes().split(b"\n")
    assert mask[0].startswith(b"# [vps-agent ") and b"masks /usr/lib/sysctl.d/99-protect-links.conf" in mask[0]
    assert mask[7].startswith(b"# [vps-agent ")
    assert mask[7].endswith(b"keeps fs.protected_fifos = 2: fs.protected_fifos = 1")
    assert mask[1:7] + mask[8:] == PROTECT_LINKS.split(b"\n")[:6] + PROTECT_LINKS.split(b"\n")[7:]
    assert vendor.read_bytes() == PROTECT_LINKS  # the package's file is never edited
    assert host.converge().status == tx.COMPLIANT


def test_an_override_in_sysctl_conf_is_a_finding_the_agent_does_not_edit(host: Harness) -> None:
    conf = host.root / "etc/sysctl.conf"
    conf.write_text("kernel.sysrq = 1\n")
    (host.root / "etc/sysctl.d/99-sysctl.conf").symlink_to("../sysctl.conf")
    outcome = host.converge()
    assert outcome.remaining is not None
    [finding] = [i for i in outcome.remaining.items if i.kind == FINDING]
    assert (finding.where, finding.line, finding.what) == ("/etc/sysctl.conf", 1, "kernel.sysrq")
    assert conf.read_text() == "kernel.sysrq = 1\n"
    assert host.converge().status == tx.DRIFTED
    assert live(host.root, "kernel.sysrq") == "0"  # the live value is kept all the same


def test_forwarding_is_left_alone_while_a_bridge_forwards(host: Harness) -> None:
    config = parse_config("sysctl:\n  set:\n    net.ipv4.ip_forward: 0\n")
    make_proc_sys(host.root, {"net.ipv4.ip_forward": "1"})
    (host.root / "sys/class/net/docker0/bridge").mkdir(parents=True)
    (host.root / "sys/class/net/eth0").mkdir(parents=True)
    outcome = host.converge(config)
    assert outcome.status == tx.HEALED
    assert live(host.root, "net.ipv4.ip_forward") == "1"
    assert "net.ipv4.ip_forward" not in (host.root / DROPIN).read_text()
    assert outcome.remaining is not None
    [left] = [i for i in outcome.remaining.items if i.what == "net.ipv4.ip_forward"]
    assert left.kind == WARNING and "docker0 (bridge)" in left.advice
    assert host.converge(config).facts["left_alone"] == "net.ipv4.ip_forward"
    # no forwarding user: the admin's setting applies
    (host.root / "sys/class/net/docker0/bridge").rmdir()
    (host.root / "sys/class/net/docker0").rmdir()
    assert host.converge(config).status == tx.HEALED
    assert live(host.root, "net.ipv4.ip_forward") == "0"


def test_a_wireguard_interface_counts_as_forwarding(host: Harness) -> None:
    config = parse_config("sysctl:\n  set:\n    net.ipv4.ip_forward: 0\n")
    make_proc_sys(host.root, {"net.ipv4.ip_forward": "1"})
    (host.root / "sys/class/net/vpn").mkdir(parents=True)
    (host.root / "sys/class/net/vpn/uevent").write_text("DEVTYPE=wireguard\nINTERFACE=vpn\nIFINDEX=4\n")
    host.converge(config)
    assert live(host.root, "net.ipv4.ip_forward") == "1"


def test_accept_ra_is_never_touched_while_the_ipv6_default_route_came_from_an_ra(host: Harness) -> None:
    config = parse_config("sysctl:\n  set:\n    net.ipv6.conf.all.accept_ra: 0\n")
    (host.root / "proc/net").mkdir(parents=True)
    (host.root / "proc/net/ipv6_route").write_text(RA_ROUTE)
    outcome = host.converge(config)
    assert live(host.root, "net.ipv6.conf.all.accept_ra") == "1"
    assert outcome.remaining is not None
    assert any("router advertisement" in i.advice for i in outcome.remaining.items)
    (host.root / "proc/net/ipv6_route").write_text(STATIC_ROUTE)
    host.converge(config)
    assert live(host.root, "net.ipv6.conf.all.accept_ra") == "0"


def test_a_strict_rp_filter_is_kept_loose_with_several_default_routes(host: Harness) -> None:
    config = parse_config("sysctl:\n  set:\n    net.ipv4.conf.all.rp_filter: 1\n")
    (host.root / "proc/net").mkdir(parents=True)
    header = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    row = "{}\t00000000\t0100000A\t0003\t0\t0\t{}\t00000000\t0\t0\t0\n"
    (host.root / "proc/net/route").write_text(header + row.format("eth0", 100))
    host.converge(config)
    assert live(host.root, "net.ipv4.conf.all.rp_filter") == "1"
    (host.root / "proc/net/route").write_text(header + row.format("eth0", 100) + row.format("eth1", 200))
    outcome = host.converge(config)
    assert live(host.root, "net.ipv4.conf.all.rp_filter") == "2"
    assert outcome.remaining is not None and any("loose" in i.advice for i in outcome.remaining.items)


def test_a_read_only_key_is_a_warning_and_the_rest_is_kept(host: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    real_read = door.read

    def read(
        root: SystemRoot, key: str, init: list[tuple[str, frozenset[str]]] | None = None, expected: str | None = None
    ) -> door.Live:
        found = real_read(root, key, init, expected)
        return door.Live(found.value, False, door.READ_ONLY) if key.startswith("kernel.") else found

    monkeypatch.setattr(door, "read", read)
    outcome = host.converge()
    assert outcome.status == tx.HEALED
    assert live(host.root, "kernel.sysrq") == "438" and live(host.root, "fs.suid_dumpable") == "0"
    assert "kernel.sysrq = 0" in (host.root / DROPIN).read_text()  # still set at boot, on a host that can
    assert outcome.remaining is not None
    sysrq = next(i for i in outcome.remaining.items if i.what == "kernel.sysrq")
    assert sysrq.kind == WARNING and "read-only here" in sysrq.advice
    assert host.converge().status == tx.COMPLIANT
    assert host.converge().facts["not_settable_here"] == 5


def test_a_key_read_only_for_init_is_not_written_even_where_this_process_could(
    host: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a container's init has /proc/sys read-only but net/; a service's own mount namespace may not keep that
    # (systemd's ProtectSystem=strict leaves /proc writable), so PID 1's view decides
    proc_sys = host.root / "proc/sys"
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:21 / / rw,relatime - ext4 /dev/vda rw\n"
        f"150 22 0:41 /sys {proc_sys} ro,nosuid,nodev,noexec,relatime - proc proc rw\n"
        f"151 150 0:41 /sys/net {proc_sys}/net rw,nosuid,nodev,noexec,relatime - proc proc rw\n"
    )
    monkeypatch.setattr(door, "INIT_MOUNTINFO", str(mountinfo))
    outcome = host.converge()
    assert outcome.status == tx.HEALED
    assert live(host.root, "kernel.sysrq") == "438" and live(host.root, "fs.protected_fifos") == "1"
    assert live(host.root, "net.ipv4.conf.all.accept_redirects") == "0"
    assert outcome.remaining is not None
    sysrq = next(i for i in outcome.remaining.items if i.what == "kernel.sysrq")
    assert sysrq.kind == WARNING and "read-only for this system's init" in sysrq.advice
    # without PID 1's mounts, systemd's container marker leaves only net.* writable
    monkeypatch.setattr(door, "INIT_MOUNTINFO", str(tmp_path / "unreadable"))
    (host.root / "proc/sys/fs/suid_dumpable").write_text("2\n")
    (host.root / "run/systemd").mkdir(parents=True)
    (host.root / "run/systemd/container").write_text("lxc\n")
    host.converge()
    assert live(host.root, "fs.suid_dumpable") == "2"


def test_a_key_this_kernel_lacks_is_a_warning_and_stays_out_of_the_file(host: Harness) -> None:
    (host.root / "proc/sys/net/core/bpf_jit_harden").unlink()
    outcome = host.converge()
    assert outcome.status == tx.HEALED
    assert "bpf_jit_harden" not in (host.root / DROPIN).read_text()
    assert outcome.remaining is not None
    missing = next(i for i in outcome.remaining.items if i.what == "net.core.bpf_jit_harden")
    assert missing.kind == WARNING and "missing" in missing.advice
    assert host.converge().status == tx.COMPLIANT


def test_a_value_the_kernel_refuses_is_reported_once_and_not_retried(
    host: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = door.write

    def write(root: SystemRoot, key: str, value: str) -> None:
        if key == "kernel.kptr_restrict":
            raise OSError(errno.EPERM, "Operation not permitted")
        real_write(root, key, value)

    monkeypatch.setattr(door, "write", write)
    outcome = host.converge()
    assert outcome.status == tx.HEALED
    assert outcome.remaining is not None
    refused = next(i for i in outcome.remaining.items if i.what == "kernel.kptr_restrict")
    assert refused.kind == WARNING and "CAP_SYS_ADMIN" in refused.advice
    for _ in range(3):
        assert host.converge().status == tx.COMPLIANT
    assert host.actions().count("remediation-failed") == 0
    assert host.actions().count("drift-reverted") == 1


def test_the_agents_file_is_restored_after_an_edit(host: Harness) -> None:
    host.converge()
    wanted = (host.root / DROPIN).read_bytes()
    (host.root / DROPIN).write_text("kernel.sysrq = 1\n")
    outcome = host.converge()
    assert outcome.status == tx.HEALED
    assert [i.kind for i in outcome.drift.items] == [FIX]  # type: ignore[union-attr]
    assert (host.root / DROPIN).read_bytes() == wanted


def test_unset_and_disabled(host: Harness) -> None:
    config = parse_config("sysctl:\n  unset: [kernel.sysrq]\n")
    host.converge(config)
    assert live(host.root, "kernel.sysrq") == "438" and "kernel.sysrq" not in (host.root / DROPIN).read_text()
    assert not host.control.meta(parse_config("sysctl:\n  enabled: false\n")).enabled
    assert host.control.poll_interval(Config()) == 2.0


@contextlib.contextmanager
def started(host: Harness, config: Config) -> Iterator[ControlRunner]:
    """The guard's runner, its start-up heal done; stopped afterwards."""
    runner = ControlRunner(host.control, lambda: config, host.ctx, no_ssh_ports)
    runner.start()
    try:
        runner.trigger("start-up")
        assert wait_until(lambda: runner.state.heals == 1)
        yield runner
    finally:
        runner.stop()


def test_a_runtime_change_is_found_by_the_poll_alone_and_a_fight_is_damped(tmp_path: Path) -> None:
    host = Harness(tmp_path)
    config = parse_config(
        "sysctl: {poll_interval: 100ms}\n"
        "engine: {debounce: 10ms, flap_max_heals: 3, flap_window: 1m, flap_backoff: 5m, reconcile_interval: 1h}\n"
    )
    with started(host, config) as runner:
        sysrq = host.root / "proc/sys/kernel/sysrq"
        for n in range(3):  # nothing triggers the runner: /proc/sys sends no events, the poll finds each
            sysrq.write_text(f"{n + 1}\n")
            assert wait_until(lambda n=n: runner.state.heals == n + 2), runner.state.why
            assert live(host.root, "kernel.sysrq") == "0"
        assert runner.state.status == FLAPPING  # four heals in the window, three allowed: backing off
        assert host.actions().count("flapping") == 1


def test_the_same_tamper_again_right_after_a_heal_is_healed_again(tmp_path: Path) -> None:
    """`sysctl -w kernel.sysrq=1` in a loop: the poll's last look (taken before the heal) saw 1, and sees 1
    again; that is the attacker's value back, not "nothing changed" (the bench found every heal after the
    first missed until the periodic reconcile)."""
    host = Harness(tmp_path)
    config = parse_config("sysctl: {poll_interval: 100ms}\nengine: {debounce: 10ms, reconcile_interval: 1h}\n")
    with started(host, config) as runner:
        sysrq = host.root / "proc/sys/kernel/sysrq"
        for n in range(3):
            sysrq.write_text("1\n")  # the same value each time, at once after the heal
            assert wait_until(lambda n=n: runner.state.heals == n + 2, 2.0), (n, runner.state.why)
            assert live(host.root, "kernel.sysrq") == "0"


def test_a_poll_that_finds_every_value_as_it_was_runs_no_converge(tmp_path: Path) -> None:
    # the 2 s poll reads the kept keys' values; only a change (or the periodic reconcile) costs a converge
    host = Harness(tmp_path)
    config = parse_config("sysctl: {poll_interval: 100ms}\nengine: {debounce: 10ms, reconcile_interval: 1h}\n")
    looks: list[float] = []
    observe = host.control.observe

    def counted(desired: SysctlDesired) -> SysctlObserved:
        looks.append(time.monotonic())
        return observe(desired)

    host.control.observe = counted  # type: ignore[method-assign]
    with started(host, config) as runner:
        time.sleep(1.0)  # 10 polls
        # the start-up heal (observe, and again after the writes), then one converge for the values it wrote
        assert len(looks) <= 4, len(looks)
        (host.root / "proc/sys/kernel/sysrq").write_text("1\n")
        assert wait_until(lambda: runner.state.heals == 2), runner.state.why
        assert live(host.root, "kernel.sysrq") == "0"


def wait_until(predicate: Callable[..., object], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False

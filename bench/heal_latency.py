"""SSH: tamper with sshd's configuration -> the effective configuration (`sshd -T`) right again.

Four realistic tampers, interleaved, each `runs` times: a `sed -i`-style rename-over of sshd_config
adding `PermitRootLogin yes`; an in-place append of `Port 22`; a planted `sshd_config.d/00-evil.conf`
(sorts before the agent's drop-in, so it wins) with `PasswordAuthentication yes`; the agent's own
drop-in deleted. Each heal is checked afterwards with the real `sshd -T` in the daemon's mount namespace.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from common import (
    MIB,
    NO_FLAP,
    SSHD,
    Daemon,
    DriftKind,
    Section,
    Target,
    bench_config,
    heal_report,
    measure_heals,
    memory,
    mib,
    running_daemon,
    timed,
)

TARGET_P99_MS = 60.0
TARGET_RSS_MIB = 30.0
EXPECTED = {"port": ["2222"], "permitrootlogin": ["no"], "passwordauthentication": ["no"]}


def _main(daemon: Daemon) -> Path:
    return daemon.root / "etc/ssh/sshd_config"


def _evil(daemon: Daemon) -> Path:
    return daemon.root / "etc/ssh/sshd_config.d/00-evil.conf"


def sed_i_permitrootlogin(daemon: Daemon) -> float:
    """What `sed -i '1i PermitRootLogin yes'` does: a sedXXXXXX temp file beside it, renamed over it. Line 1
    is above Debian's `Include sshd_config.d/*.conf`, so it really wins (sshd keeps the first value)."""
    main = _main(daemon)
    data = main.read_bytes()
    temp = main.parent / f"sed{secrets.token_hex(3)}"
    t0 = time.time()
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, b"PermitRootLogin yes\n" + data)
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)
    os.rename(temp, main)
    return t0


def append_port_22(daemon: Daemon) -> float:
    """`echo 'Port 22' >> sshd_config`: same inode; Port adds up, so sshd would listen on 22 too."""
    t0 = time.time()
    fd = os.open(_main(daemon), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        os.write(fd, b"Port 22\n")
    finally:
        os.close(fd)
    return t0


def plant_dropin(daemon: Daemon) -> float:
    t0 = time.time()
    fd = os.open(_evil(daemon), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, b"PasswordAuthentication yes\n")
    finally:
        os.close(fd)
    return t0


def delete_agent_dropin(daemon: Daemon) -> float:
    t0 = time.time()
    os.unlink(daemon.root / "etc/ssh/sshd_config.d/00-vps-agent.conf")
    return t0


def verify(daemon: Daemon) -> str:
    """The real `sshd -T` in the daemon's mount namespace (where the fake root's /etc/ssh is /etc/ssh)."""
    result = daemon.in_mountns(SSHD, "-T", "-f", "/etc/ssh/sshd_config")
    if result.returncode != 0:
        return f"sshd -T exited {result.returncode}: {result.stderr.strip()}"
    values: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(" ")
        values.setdefault(key, []).append(value)
    got = {k: sorted(values.get(k, [])) for k in EXPECTED}
    return "" if got == EXPECTED else f"effective {got}"


def _remove_evil(daemon: Daemon) -> None:
    _evil(daemon).unlink(missing_ok=True)  # the next plant is a new file again


KINDS = (
    DriftKind("sshd_config edit (sed -i: PermitRootLogin yes on line 1)", "rename-over", sed_i_permitrootlogin, verify),
    DriftKind("sshd_config edit (>>: Port 22)", "in-place append", append_port_22, verify),
    DriftKind("planted drop-in 00-evil.conf", "new file", plant_dropin, verify, _remove_evil),
    DriftKind("agent drop-in deleted", "unlink", delete_agent_dropin, verify),
)


def run(runs: int) -> Section:
    section = Section("SSH: sshd_config edit / planted drop-in -> healed")
    sshd_ms = sorted(timed([SSHD, "-T", "-f", "/dev/null"]).wall_ms for _ in range(20))[10]
    with running_daemon(bench_config(**NO_FLAP)) as daemon:
        heals = measure_heals(daemon, "ssh", KINDS, runs)
        mem = memory(daemon.pid)
    section.add(
        "Method: the real daemon against a fake root (Debian 12's stock sshd_config, a sudo admin with a key;"
        " the config asks for Port 2222, PermitRootLogin no, PasswordAuthentication no; shipped engine defaults,"
        " debounce 15 ms, but `flap_max_heals: 100000`, since this heals on purpose several times a second)."
        f" {runs} tampers of each kind below, interleaved, 100 ms apart. t0 = `time.time()` just before the"
        " first changing system call; **healed = the `drift-reverted` event's `@timestamp`**, which the agent"
        " emits only after sshd's own `sshd -T` printed the right effective configuration. Every heal is then"
        " checked, outside the timing, with the real `sshd -T` in the daemon's mount namespace (nsenter).",
        "",
        "Tampers: a `sed -i`-style rename-over of sshd_config with `PermitRootLogin yes` on line 1 (above the"
        " Include, so it wins); `>>` of `Port 22`"
        " (same inode); a new `sshd_config.d/00-evil.conf` with `PasswordAuthentication yes` (sorts before the"
        " agent's `00-vps-agent.conf`, so it wins; removed after its heal); the agent's drop-in deleted.",
        "",
    )
    heal_report(section, heals, "sshd drift heal", TARGET_P99_MS)
    section.targets.append(
        Target(
            f"RSS < {TARGET_RSS_MIB:.0f} MiB after {len(heals)} heals ({2 * len(heals)} events; the ring keeps 500)",
            f"{mib(mem.get('rss'))} (PSS {mib(mem.get('pss'))})",
            mem.get("rss", 0) < TARGET_RSS_MIB * MIB,
        )
    )
    section.add(
        f"For scale: one `sshd -T -f /dev/null` takes {sshd_ms:.1f} ms here (median of 20); a heal runs it twice"
        " (observe, then the test of the result, which is also the observe-again). Daemon memory after the run:"
        f" RSS {mib(mem.get('rss'))}, PSS {mib(mem.get('pss'))}, high-water {mib(mem.get('hwm'))}."
        " In a fake root no sshd runs, so the reload step (on a host `systemctl reload ssh`) is not in these numbers.",
    )
    return section

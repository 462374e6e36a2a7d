"""sysctl: `sysctl -w net.ipv4.conf.all.accept_redirects=1` -> the kept value live again.

The daemon runs as in a container (tests/fakeroot.py container_proc_sys): its fake root's /proc/sys is the
kernel's real one, read-only but for net/, which belongs to the daemon's own network namespace; so the
tamper (the real `sysctl -w`, run there through nsenter) and the heal change that namespace's keys only.
/proc/sys sends no inotify events: the heal waits for the next poll (sysctl.poll_interval, 2 s shipped), so
the latency is the poll's phase plus the converge, and a uniform spread up to the interval is the expectation.
"""

from __future__ import annotations

import random
import time

from common import NO_FLAP, Daemon, DriftKind, Section, bench_config, heal_report, measure_heals, running_daemon

from tests.fakeroot import container_proc_sys

POLL_S = 2.0
TARGET_P99_MS = POLL_S * 1000 + 100.0  # one poll, plus the converge
KEY = "net.ipv4.conf.all.accept_redirects"


def tamper(daemon: Daemon) -> float:
    # a random phase against the poll, so the spread is the poll's and not this loop's rhythm
    time.sleep(random.uniform(0, POLL_S))
    t0 = time.time()
    result = daemon.in_netns("sysctl", "-q", "-w", f"{KEY}=1")
    if result.returncode != 0:
        raise RuntimeError(f"sysctl -w: {result.stderr.strip()}")
    return t0


def verify(daemon: Daemon) -> str:
    value = daemon.in_netns("sysctl", "-n", KEY).stdout.strip()
    return "" if value == "0" else f"sysctl -n {KEY}: {value}"


KIND = DriftKind(f"sysctl -w {KEY}=1", "", tamper, verify)


def run(runs: int) -> Section:
    section = Section("sysctl: `sysctl -w` of a kept key -> healed")
    with running_daemon(bench_config(**NO_FLAP), wrap=container_proc_sys) as daemon:
        heals = measure_heals(daemon, "sysctl", [KIND], runs, timeout=POLL_S + 5)
    section.add(
        f"Method: the real daemon on a fake root whose /proc/sys is the kernel's, as a container has it"
        f" (read-only but for net/, the daemon's own network namespace). {runs} times, at a random phase"
        f" against the poll: `sysctl -w {KEY}=1` in the daemon's namespace (nsenter; t0 before it is spawned)."
        f" /proc/sys has no change events: the guard reads its keys every {POLL_S:g} s (sysctl.poll_interval),"
        " so the latency is up to one interval plus the converge. Healed = the `drift-reverted` event, emitted"
        f" after the agent read the key back; every heal is checked afterwards with `sysctl -n {KEY}`.",
        "",
    )
    heal_report(section, heals, "sysctl drift heal", TARGET_P99_MS)
    return section

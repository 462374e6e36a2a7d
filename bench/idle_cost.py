"""Idle cost: what the daemon costs while nothing changes, over a window (5 minutes in the full run).

The daemon runs as under systemd: NOTIFY_SOCKET points at a socket this benchmark reads, and
WATCHDOG_USEC is the unit's WatchdogSec=30, so the watchdog pings happen as in production. Memory
from /proc/PID/smaps_rollup (Rss, Pss); CPU from /proc/PID/stat (the daemon, and the children it
reaped: sshd -T, iptables-save, fail2ban-client ...); wake-ups = voluntary + involuntary context
switches of every thread (/proc/PID/task/*/status), sampled every second from outside (reading
/proc does not wake the daemon). Thread names and where each one waits come from `py-spy dump`,
taken before the window (py-spy stops the process for a moment, so never during it).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from common import (
    MIB,
    NO_FLAP,
    Section,
    Target,
    bench_config,
    context_switches,
    cpu_seconds,
    fmt,
    memory,
    running_daemon,
    timed,
)

TARGET_RSS_MIB = 30.0
TARGET_CPU_PERCENT = 0.1
RECONCILE_S = 300.0  # engine.reconcile_interval, the shipped default
TARGET_MIN_PERIOD_S = 1.0  # no periodic wake-up more often than once a second
WATCHDOG_USEC = 30_000_000  # systemd/vps-agent.service: WatchdogSec=30


def host_fail2ban_poll() -> float | None:
    """How often the fail2ban guard polls on a real host (a fake root never polls): the agent's own answer."""
    from agent.config import Config
    from agent.controls.fail2ban import Fail2banControl
    from agent.paths import SystemRoot

    return Fail2banControl(SystemRoot.at("/")).poll_interval(Config())


def thread_names(pid: int) -> dict[int, str]:
    """os thread id -> 'name (where it waits)', from py-spy; empty when py-spy is not installed."""
    if shutil.which("py-spy") is None:
        return {}
    result = subprocess.run(["py-spy", "dump", "--json", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
    names: dict[int, str] = {}
    try:
        threads = json.loads(result.stdout)
    except json.JSONDecodeError:
        return {}
    for thread in threads:
        frames = thread.get("frames") or []
        where = next(
            (
                f"{f['name']} {Path(f['filename']).name}:{f['line']}"
                for f in frames
                if "threading.py" not in f["filename"]
            ),
            "",
        )
        names[int(thread["os_thread_id"])] = f"{thread.get('thread_name') or '?'} ({where})"
    return names


def run(window: float) -> Section:
    section = Section(f"Idle cost over {window / 60:g} minutes")
    with tempfile.TemporaryDirectory(prefix="vps-agent-notify-") as tmp:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(f"{tmp}/notify.sock")
        notify.settimeout(0.5)
        messages: list[bytes] = []
        done = threading.Event()

        def drain() -> None:
            # read it as systemd does: a unix datagram socket queues only net.unix.max_dgram_qlen (10)
            # messages, after which the daemon's sd_notify would block
            while not done.is_set():
                try:
                    messages.append(notify.recv(4096))
                except TimeoutError:
                    continue

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        env = {"NOTIFY_SOCKET": f"{tmp}/notify.sock", "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        with running_daemon(bench_config(**NO_FLAP), env=env) as daemon:
            pid = daemon.pid
            time.sleep(3)
            names = thread_names(pid)
            time.sleep(2)
            daemon.events.read()
            first = context_switches(pid)
            samples = [first]
            cpu0, own0 = cpu_seconds(pid), cpu_seconds(pid, children=False)
            mem_samples = [memory(pid)]
            started = time.monotonic()
            while time.monotonic() - started < window:
                time.sleep(1.0)
                samples.append(context_switches(pid))
                if len(samples) % 10 == 0:
                    mem_samples.append(memory(pid))
            elapsed = time.monotonic() - started
            cpu_all, cpu_own = cpu_seconds(pid) - cpu0, cpu_seconds(pid, children=False) - own0
            mem_samples.append(memory(pid))
            events = daemon.events.read()
            # what one periodic fail2ban poll costs (a host only: the fake root has no poll), measured as
            # the CPU of the fail2ban-client runs of one converge, which is what the poll does
            f2b_cpu = []
            for _ in range(5):
                before = cpu_seconds(pid)
                daemon.ctl("converge", "fail2ban")
                f2b_cpu.append(cpu_seconds(pid) - before)
        done.set()
        reader.join()
        notify.close()
        pings = sum(m.count(b"WATCHDOG=1") for m in messages)
    status_cpu = [timed(["fail2ban-client", "status", "sshd"]).cpu_s for _ in range(3)]
    poll = host_fail2ban_poll()

    # wake-ups per thread: total, and how many one-second samples saw any
    last = samples[-1]
    rows = []
    for tid in sorted(last):
        total = last[tid] - first.get(tid, last[tid])
        seconds_with = sum(1 for a, b in zip(samples, samples[1:], strict=False) if b.get(tid, 0) - a.get(tid, 0) > 0)
        rows.append((tid, total, seconds_with))
    total_wakeups = sum(r[1] for r in rows)
    busiest = max((r[1] for r in rows), default=0)
    rss = [m["rss"] for m in mem_samples]
    pss = [m["pss"] for m in mem_samples]
    cpu_percent = cpu_all / elapsed * 100
    own_percent = cpu_own / elapsed * 100
    f2b_ms = sorted(f2b_cpu)[2] * 1000
    status_ms = sorted(status_cpu)[1] * 1000
    # on a host every fail2ban converge (poll or reconcile) also asks `fail2ban-client status sshd`
    per_reconcile = status_ms / 1000 / RECONCILE_S * 100
    per_poll = (f2b_ms + status_ms) / 1000 / poll * 100 if poll else 0.0
    host_percent = cpu_percent + per_reconcile + per_poll
    section.add(
        f"Method: the daemon started against a fake root as in the heal benchmarks, with `NOTIFY_SOCKET` and"
        f" `WATCHDOG_USEC={WATCHDOG_USEC}` (the unit's WatchdogSec=30: a WATCHDOG=1 ping every 15 s, as in"
        f" production; {pings} pings arrived). After the start-up reconcile and 5 s of quiet, nothing is"
        f" touched for {elapsed:.0f} s. CPU = utime+stime from /proc/PID/stat, with and without the children"
        " the daemon reaped (cutime+cstime: the tools a reconcile runs); memory = Rss and Pss from"
        " /proc/PID/smaps_rollup every 10 s; wake-ups = the sum over all threads of voluntary and involuntary"
        " context switches (/proc/PID/task/*/status), read every second. The window contains the periodic"
        f" reconcile (`engine.reconcile_interval` 5m after the start-up one) when it is 5 minutes long. Events"
        f" during the window: {len(events)}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| RSS (min / max / end) | {min(rss) / MIB:.1f} / {max(rss) / MIB:.1f} / {rss[-1] / MIB:.1f} MiB |",
        f"| PSS (min / max / end) | {min(pss) / MIB:.1f} / {max(pss) / MIB:.1f} / {pss[-1] / MIB:.1f} MiB |",
        f"| CPU, the daemon itself | {cpu_own:.3f} s = {own_percent:.3f}% of one core |",
        f"| CPU, with the tools it ran | {cpu_all:.3f} s = {cpu_percent:.3f}% of one core |",
        f"| wake-ups, all threads | {total_wakeups} = {total_wakeups / elapsed:.3f} per second |",
        "",
        "Wake-ups by thread (threads not listed never woke):",
        "",
        "| thread (name, where it waits) | wake-ups | seconds with a wake-up | mean period |",
        "|---|---|---|---|",
    )
    for tid, total, seconds_with in rows:
        if total:
            period = f"{elapsed / seconds_with:.0f} s" if seconds_with else "-"
            section.add(f"| {names.get(tid, f'tid {tid}')} | {total} | {seconds_with} | {period} |")
    quiet = sum(1 for _, total, _ in rows if not total)
    poll_text = (
        f"the fail2ban guard also polls every {poll:.0f} s (a fake root never polls): one poll is a converge of"
        f" the fail2ban control, whose tools cost {f2b_ms:.0f} ms of CPU here (median of 5 `vps-agentctl converge"
        f" fail2ban`) plus `fail2ban-client status sshd`: {per_poll:.2f}% of a core"
        if poll
        else "the fail2ban guard does not poll (the agent code says so: `poll_interval` is None on a host)"
    )
    section.add(
        "",
        f"{quiet} of {len(rows)} threads did not wake at all (the watchdog observers' and the control workers'"
        " waits have no timeout but the reconcile interval).",
        "",
        f"**On a real host** {poll_text}; and every fail2ban converge, the 5-minute reconcile included, also runs"
        f" `fail2ban-client status sshd` while fail2ban runs (~{status_ms:.0f} ms of CPU, Python's start-up,"
        f" measured without a server; {per_reconcile:.3f}% of a core at one per reconcile) and `systemctl"
        f" is-active fail2ban` (not measured: no systemd here; a few ms). Estimate: **{host_percent:.2f}% of a"
        " core in all**.",
    )
    period_ok = busiest / elapsed <= 1.0 / TARGET_MIN_PERIOD_S
    section.targets += [
        Target(
            f"idle RSS < {TARGET_RSS_MIB:.0f} MiB",
            f"max {max(rss) / MIB:.1f} MiB (PSS {max(pss) / MIB:.1f})",
            max(rss) / MIB < TARGET_RSS_MIB,
        ),
        Target(
            f"idle CPU < {TARGET_CPU_PERCENT}% of a core (fake root)",
            f"{fmt(cpu_percent, 3)}% (daemon alone {fmt(own_percent, 3)}%)",
            cpu_percent < TARGET_CPU_PERCENT,
        ),
        Target(
            f"idle CPU < {TARGET_CPU_PERCENT}% of a core (real host estimate)",
            f"{host_percent:.2f}% (estimate: measured idle + the host-only fail2ban work)",
            host_percent < TARGET_CPU_PERCENT,
        ),
        Target(
            "no periodic wake-up more often than once a second",
            f"{total_wakeups / elapsed:.3f} wake-ups/s in all; busiest thread {busiest / elapsed:.3f}/s",
            period_ok,
        ),
    ]
    return section

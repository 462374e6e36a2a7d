"""Tamper storms: 1000 sshd_config edits in 10 s, and `iptables -F` at 100 per second for 10 s.

Shipped engine defaults (debounce 15 ms, flap damping after more than 5 heals a minute): the agent must
not fight a storm edit by edit (bounded CPU and memory), must say it is flapping, and the machine must
be compliant again within 1 s after the last tamper. Compliance after the storm is polled with the real
tools (`sshd -T`, `iptables -S`) in the daemon's namespaces, independently of the agent's events.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common import (
    MIB,
    PYTHON,
    Daemon,
    Section,
    Target,
    action_of,
    bench_config,
    cpu_seconds,
    memory,
    parse_timestamp,
    running_daemon,
)
from firewall_heal import verify_iptables
from heal_latency import verify as verify_sshd

TARGET_COMPLIANT_S = 1.0
WAIT_AFTER_S = 10.0  # how long to look for compliance after the storm before calling it missed

# a helper run inside the daemon's network namespace: `iptables -F` on a fixed schedule; prints the
# wall clock time of the end of the last flush
FLUSHER = """
import subprocess, sys, time
count, rate = int(sys.argv[1]), float(sys.argv[2])
start = time.monotonic()
for i in range(count):
    delay = start + i / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    subprocess.run(["iptables", "-F"], check=True)
print(time.time())
"""


@dataclass
class StormResult:
    name: str
    tampers: int
    seconds: float
    cpu_percent: float = 0.0
    rss_before: int = 0
    rss_max: int = 0
    rss_after: int = 0
    heals_during: int = 0
    actions: dict[str, int] = field(default_factory=dict)
    flapping_said: str = ""
    compliant_after_ms: float | None = None  # last tamper -> the real tool says right
    reverted_after_ms: float | None = None  # last tamper -> a drift-reverted event


def _sampler(daemon: Daemon, result: StormResult) -> Callable[[], None]:
    def sample() -> None:
        result.rss_max = max(result.rss_max, memory(daemon.pid)["rss"])

    return sample


def _storm(
    daemon: Daemon,
    name: str,
    control: str,
    drive: Callable[[Callable[[], None]], tuple[int, float, float]],
    verify: Callable[[Daemon], str],
) -> StormResult:
    """drive(sample) runs the storm, calling sample() now and then; returns (tampers, t_first, t_last)."""
    before = memory(daemon.pid)
    result = StormResult(name, 0, 0.0, rss_before=before["rss"], rss_max=before["rss"])
    cpu0 = cpu_seconds(daemon.pid)
    started = time.monotonic()
    result.tampers, t_first, t_last = drive(_sampler(daemon, result))
    storm_cpu = cpu_seconds(daemon.pid) - cpu0
    result.seconds = time.monotonic() - started
    result.cpu_percent = storm_cpu / result.seconds * 100
    # compliance, by the real tool, polled back to back from the last tamper on
    deadline = time.monotonic() + WAIT_AFTER_S
    while time.monotonic() < deadline:
        if not verify(daemon):
            result.compliant_after_ms = (time.time() - t_last) * 1000  # the end of the poll: conservative
            break
    time.sleep(0.5)
    result.rss_after = memory(daemon.pid)["rss"]
    for event in daemon.events.read():
        action = action_of(event)
        if event.get("control") != control:
            continue
        result.actions[action] = result.actions.get(action, 0) + 1
        at = parse_timestamp(event["@timestamp"])
        if action == "drift-reverted" and t_first <= at <= t_last:
            result.heals_during += 1
        if action == "drift-reverted" and at > t_last and result.reverted_after_ms is None:
            result.reverted_after_ms = (at - t_last) * 1000
        if action == "flapping" and not result.flapping_said:
            result.flapping_said = str(event.get("message", ""))
    return result


def sshd_storm(edits: int, seconds: float) -> StormResult:
    with running_daemon(bench_config()) as daemon:
        main = daemon.root / "etc/ssh/sshd_config"
        base = main.read_bytes().rstrip(b"\n") + b"\n"
        lines = (b"PermitRootLogin yes\n", b"Port 22\n", b"PasswordAuthentication yes\n")

        def drive(sample: Callable[[], None]) -> tuple[int, float, float]:
            start, t_first, t_last = time.monotonic(), time.time(), 0.0
            for i in range(edits):
                delay = start + i * seconds / edits - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                temp = main.parent / f"sed{secrets.token_hex(3)}"  # as `sed -i` does: a temp file renamed over
                temp.write_bytes(lines[i % len(lines)] + base)  # line 1: above the Include, so it wins
                os.rename(temp, main)
                t_last = time.time()
                if i % 50 == 0:
                    sample()
            return edits, t_first, t_last

        return _storm(daemon, f"{edits} sshd_config edits in {seconds:g} s (sed -i style)", "ssh", drive, verify_sshd)


def iptables_storm(flushes: int, rate: float) -> StormResult:
    with running_daemon(bench_config()) as daemon:

        def drive(sample: Callable[[], None]) -> tuple[int, float, float]:
            t_first = time.time()
            argv = ["nsenter", "-t", str(daemon.pid), "-n", PYTHON, "-c", FLUSHER, str(flushes), str(rate)]
            flusher = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
            while flusher.poll() is None:
                sample()
                time.sleep(0.5)
            out = flusher.communicate()[0]
            if flusher.returncode != 0:
                raise RuntimeError(f"the flusher failed ({flusher.returncode})")
            return flushes, t_first, float(out.strip())

        return _storm(
            daemon, f"`iptables -F` at {rate:g}/s for {flushes / rate:g} s", "firewall", drive, verify_iptables
        )


def run(quick: bool) -> Section:
    section = Section("Tamper storms")
    seconds = 2.0 if quick else 10.0
    results = [sshd_storm(int(100 * seconds), seconds), iptables_storm(int(100 * seconds), 100.0)]
    section.add(
        "Method: a fresh daemon per storm with the **shipped engine defaults** (debounce 15 ms; more than 5 "
        "heals within 1 minute = flapping, back-off 5 minutes). sshd: `sed -i`-style rename-overs of "
        "sshd_config, each putting one of `PermitRootLogin yes` / `Port 22` / `PasswordAuthentication yes` on "
        "line 1 of the hardened file (above the Include, so it wins), on a fixed schedule. Firewall: a helper "
        "in the daemon's network namespace runs `iptables -F` on a fixed schedule. CPU = the daemon's "
        "utime+stime plus its reaped children's, over the storm; RSS sampled during it. After the last tamper "
        "the effective state is polled back to back with the real tool (`sshd -T` in the daemon's mount "
        "namespace, ~10 ms a poll; `iptables -S` in its network namespace); compliant after = the end of the "
        f"first poll that is right, minus the last tamper's time (at most {WAIT_AFTER_S:g} s looked).",
        "",
        "| storm | tampers | CPU (% of a core) | RSS before / max / after | heals during | events | flap damping said |"
        " compliant after the last tamper | drift-reverted after it |",
        "|---|---|---|---|---|---|---|---|---|",
    )
    for r in results:
        events = ", ".join(f"{a} {n}" for a, n in sorted(r.actions.items()))
        compliant = "**not within 10 s**" if r.compliant_after_ms is None else f"{r.compliant_after_ms:.0f} ms"
        reverted = "-" if r.reverted_after_ms is None else f"{r.reverted_after_ms:.0f} ms"
        section.add(
            f"| {r.name} | {r.tampers} in {r.seconds:.1f} s | {r.cpu_percent:.0f}% |"
            f" {r.rss_before / MIB:.1f} / {r.rss_max / MIB:.1f} / {r.rss_after / MIB:.1f} MiB | {r.heals_during} |"
            f" {events} | {r.flapping_said or '**nothing**'} | {compliant} | {reverted} |"
        )
        section.targets.append(
            Target(
                f"storm: {r.name}: flapping said, compliant within {TARGET_COMPLIANT_S:g} s after",
                f"flapping {'yes' if r.flapping_said else 'NO'}; compliant after "
                + ("not within 10 s" if r.compliant_after_ms is None else f"{r.compliant_after_ms:.0f} ms")
                + f"; CPU {r.cpu_percent:.0f}%, RSS max {r.rss_max / MIB:.1f} MiB",
                bool(r.flapping_said)
                and r.compliant_after_ms is not None
                and r.compliant_after_ms < TARGET_COMPLIANT_S * 1000,
            )
        )
    return section

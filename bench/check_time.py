"""`vps-agentctl check`: wall time of one whole check of every control, as an admin runs it.

check works without the daemon and changes nothing: it starts Python, reads the config, and observes
and diffs every control with the real tools (sshd -T, iptables-save, fail2ban-client -d). It runs in
the network namespace of a daemon that keeps the baseline there, so the firewall is compliant too.
"""

from __future__ import annotations

import json

from common import NO_FLAP, PYTHON, REPO, Section, Stats, Target, bench_config, fmt, running_daemon, timed

TARGET_MS = 300.0


def run(runs: int) -> Section:
    section = Section("`vps-agentctl check`: wall time across all controls")
    walls: list[float] = []
    peaks: list[int] = []
    per_control: dict[str, list[float]] = {}
    codes: set[int] = set()
    with running_daemon(bench_config(**NO_FLAP)) as daemon:
        argv = ["nsenter", "-t", str(daemon.pid), "-n", PYTHON, "-m", "agent.cli", "--root", str(daemon.root)]
        timed([*argv, "check"], cwd=REPO)  # warm the page cache once, as any second run on a host is
        for _ in range(runs):
            ran = timed([*argv, "check", "--json"], cwd=REPO)
            result = ran.result
            walls.append(ran.wall_ms)
            peaks.append(ran.peak_rss)
            codes.add(result.returncode)
            for row in json.loads(result.stdout)["controls"]:
                per_control.setdefault(row["control"], []).append(float(row["duration_ms"]))
    s = Stats.of(walls)
    assert s is not None
    section.add(
        f"Method: `vps-agentctl --root DIR check --json` run {runs} times (after one warm-up run) in the network"
        " namespace of a daemon that keeps the baseline there (`nsenter -n`), against the same kind of fake root"
        " as above. Wall time = spawn to exit of the nsenter process (so Python's start-up, the imports, the"
        " config, entering the fake root's mount namespace and every control's observe and diff are all in it);"
        " peak memory = wait4's ru_maxrss.",
        "",
        f"Exit codes seen: {sorted(codes)} (0 = compliant).",
        "",
        "| measure (ms) | n | p50 | p95 | max |",
        "|---|---|---|---|---|",
        f"| **check wall time** | {s.n} | {fmt(s.p50)} | {fmt(s.p95)} | {fmt(s.max)} |",
    )
    for control, values in per_control.items():
        c = Stats.of(values)
        if c is not None:
            section.add(
                f"| {control}: its observe + diff (duration_ms) | {c.n} | {fmt(c.p50)} | {fmt(c.p95)} | {fmt(c.max)} |"
            )
    section.add("", f"Peak RSS of one check: {max(peaks) / 2**20:.1f} MiB.")
    section.targets.append(
        Target(
            f"`check` wall time < {TARGET_MS:.0f} ms (p95)",
            f"p50 {s.p50:.0f} / p95 {s.p95:.0f} ms",
            s.p95 < TARGET_MS and codes == {0},
        )
    )
    return section

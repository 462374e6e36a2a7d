#!/usr/bin/python3
"""`make soak`: the real daemon for an hour under random tampers of every kind; RSS, fds, threads, heals.

    sudo /usr/bin/python3 bench/soak.py [--minutes 60] [--seed N] [--results bench/RESULTS.md]

One daemon (`bench/common.py`'s: `vps-agent run --root DIR` in `unshare --net`, a fake root from
tests/fakeroot.py) for the whole run. A seeded random generator (the seed is printed, and `--seed` repeats
a run's sequence) picks, one at a time, a tamper of any kind and a pause of 0.5-8 s after its heal: sshd
(`sed -i` rename-over of sshd_config, `>>` of `Port 22`, a planted first-sorting drop-in, the agent's
drop-in deleted), the firewall (`iptables -F`, `nft flush ruleset`, inside the daemon's namespace),
fail2ban (a later `jail.d/*.local` by rename; an in-place edit of `jail.local`, which is no drift and
must be left alone) and the accounts guard
(the admin's `authorized_keys` made group-writable, then put back). A thread samples the daemon's RSS
(smaps_rollup), open fds and threads every 10 s. The report is the "Soak" section of --results
(replaced if there, else appended): RSS slope per hour by least squares, fds/threads at start and end,
heal latency p50/p99, and missed heals (not healed within 5 s; must be 0).
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import secrets
import shlex
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fail2ban_heal  # noqa: E402
import firewall_heal  # noqa: E402
import heal_latency  # noqa: E402
from common import (  # noqa: E402
    FAILURE_ACTIONS,
    MIB,
    NO_FLAP,
    REPO,
    Daemon,
    DriftKind,
    Heal,
    Section,
    action_of,
    bench_config,
    cpu_seconds,
    fmt,
    git_state,
    load_average,
    memory,
    percentile,
    running_daemon,
    wait_for_heal,
)

UNTOUCHED_S = 1.0  # how long a harmless edit is watched for a transaction that should not come
HEAL_TIMEOUT_S = 5.0  # a tamper not healed (or, for accounts, reported) within this is a missed heal
SAMPLE_EVERY_S = 10.0
PAUSE_S = (0.5, 8.0)
JAIL_LOCAL = "etc/fail2ban/jail.local"
AUTHORIZED_KEYS = "home/admin/.ssh/authorized_keys"
ADMIN_JAIL_LOCAL = "# the admin's own jail.local\n[DEFAULT]\nbantime = 1h\n\n[sshd]\nfindtime = 20m\n"


# --- the tampers the other benchmarks lack ------------------------------------------------------------------


def edit_jail_local(daemon: Daemon) -> float:
    """An admin's in-place rewrite of jail.local (same inode: truncate and write), even `enabled = false`
    under [sshd]: jail.local is read before jail.d/*.local, so the agent's zz-vps-agent.local still wins
    and this is no drift. The agent must leave the file alone (a soak of its restraint, not of a heal)."""
    t0 = time.time()
    with (daemon.root / JAIL_LOCAL).open("w") as handle:
        handle.write(ADMIN_JAIL_LOCAL + f"maxretry = {secrets.randbelow(9) + 2}\nenabled = false\n")
    return t0


def wait_untouched(daemon: Daemon, kind: SoakKind, t0: float) -> Heal:
    """No transaction of the control acts on it within UNTOUCHED_S, and the file is as the admin wrote it."""
    heal = Heal(kind.drift.name, t0)
    written = (daemon.root / JAIL_LOCAL).read_bytes()
    deadline = time.monotonic() + UNTOUCHED_S
    acted: list[str] = []
    while time.monotonic() < deadline:
        acted += [
            action_of(e)
            for e in daemon.events.read()
            if e.get("control") == kind.control
            and action_of(e) in ("drift-detected", "drift-reverted", *FAILURE_ACTIONS)
        ]
        time.sleep(0.01)
    heal.outcome = "healed" if not acted else f"acted on: {', '.join(acted)}"
    heal.verified = (daemon.root / JAIL_LOCAL).read_bytes() == written and not kind.drift.verify(daemon)
    return heal


def nft_flush_ruleset(daemon: Daemon) -> float:
    """`nft flush ruleset` under the iptables-nft backend: every table goes, the agent's with them."""
    t0 = time.time()
    result = daemon.in_netns("nft", "flush", "ruleset")
    if result.returncode != 0:
        raise RuntimeError(f"nft flush ruleset: {result.stderr.strip()}")
    return t0


def loosen_authorized_keys(daemon: Daemon) -> float:
    t0 = time.time()
    os.chmod(daemon.root / AUTHORIZED_KEYS, 0o664)
    return t0


def restore_authorized_keys(daemon: Daemon) -> None:
    os.chmod(daemon.root / AUTHORIZED_KEYS, 0o600)


@dataclass(frozen=True)
class SoakKind:
    control: str
    drift: DriftKind
    # heal: drift-reverted; report: the accounts guard's finding in status (it never changes anything);
    # untouched: a harmless edit the agent must leave alone
    expect: str = "heal"

    @property
    def reported(self) -> bool:
        return self.expect == "report"


KINDS: tuple[SoakKind, ...] = (
    *(SoakKind("ssh", kind) for kind in heal_latency.KINDS),
    SoakKind("firewall", firewall_heal.IPTABLES_F),
    SoakKind("firewall", DriftKind("nft flush ruleset", "", nft_flush_ruleset, firewall_heal.verify_iptables)),
    SoakKind("fail2ban", fail2ban_heal.KIND),
    SoakKind(
        "fail2ban",
        DriftKind(
            "jail.local rewritten in place (no drift: jail.d/*.local wins)", "", edit_jail_local, fail2ban_heal.verify
        ),
        "untouched",
    ),
    SoakKind("accounts", DriftKind("authorized_keys chmod 664", "", loosen_authorized_keys, lambda d: ""), "report"),
)


def _accounts_reports(daemon: Daemon, present: bool) -> bool:
    drift = " ".join(daemon.status()["accounts"].get("drift") or [])
    return ("authorized_keys" in drift) == present


def wait_for_report(daemon: Daemon, kind: SoakKind, t0: float) -> Heal:
    """The accounts guard's finding in `vps-agentctl status` (exact; its events are folded while an item
    flaps, by design), then the tamper undone and the finding gone again."""
    heal = Heal(kind.drift.name, t0)
    deadline = time.monotonic() + HEAL_TIMEOUT_S
    while True:
        if _accounts_reports(daemon, True):
            heal.outcome, heal.latency_ms, heal.verified = "healed", (time.time() - t0) * 1000, True
            break
        if time.monotonic() > deadline:
            heal.verify_detail = f"status: {daemon.status()['accounts']}"
            break
        time.sleep(0.01)
    restore_authorized_keys(daemon)
    deadline = time.monotonic() + HEAL_TIMEOUT_S
    while not _accounts_reports(daemon, False):
        if time.monotonic() > deadline:
            heal.verified, heal.verify_detail = False, "the finding stayed after authorized_keys was 0600 again"
            break
        time.sleep(0.05)
    daemon.events.read()  # its drift-detected / findings-cleared: not heals
    return heal


# --- sampling and arithmetic ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the soak started
    rss: int
    fds: int
    threads: int


def sample(pid: int, at: float) -> Sample:
    threads = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("Threads:")
    )
    return Sample(at, memory(pid)["rss"], len(os.listdir(f"/proc/{pid}/fd")), threads)


def slope_per_hour(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (x in seconds), per hour."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx * 3600


class Sampler(threading.Thread):
    def __init__(self, pid: int, started: float) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.pid, self.started = pid, started
        self.samples: list[Sample] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.samples.append(sample(self.pid, time.monotonic() - self.started))
            except OSError:
                return  # the daemon is gone: the main loop says so
            if self.stopping.wait(SAMPLE_EVERY_S):
                return


# --- the run ---------------------------------------------------------------------------------------------------


@dataclass
class Soak:
    seed: int
    minutes: float
    heals: list[Heal]
    kinds: list[SoakKind]
    samples: list[Sample]
    wall_s: float
    cpu_s: float


def soak(minutes: float, seed: int, log: Callable[[str], None]) -> Soak:
    rng = random.Random(seed)
    heals: list[Heal] = []
    kinds: list[SoakKind] = []
    with running_daemon(bench_config(**NO_FLAP)) as daemon:
        (daemon.root / JAIL_LOCAL).write_text(ADMIN_JAIL_LOCAL)
        daemon.check_alive()
        started = time.monotonic()
        cpu0 = cpu_seconds(daemon.pid)
        sampler = Sampler(daemon.pid, started)
        sampler.start()
        end = started + minutes * 60
        next_report = started + 300
        try:
            while time.monotonic() < end:
                kind = rng.choice(KINDS)
                pause = rng.uniform(*PAUSE_S)
                t0 = kind.drift.tamper(daemon)
                if kind.expect == "report":
                    heal = wait_for_report(daemon, kind, t0)
                elif kind.expect == "untouched":
                    heal = wait_untouched(daemon, kind, t0)
                else:
                    heal = wait_for_heal(daemon, kind.control, kind.drift.name, t0, HEAL_TIMEOUT_S)
                    if heal.outcome == "healed":
                        problem = kind.drift.verify(daemon)
                        heal.verified, heal.verify_detail = not problem, problem
                    kind.drift.tidy(daemon)
                heals.append(heal)
                kinds.append(kind)
                if missed(heal):
                    log(f"  !! missed: {kind.drift.name}: {heal.outcome} {heal.latency_ms} {heal.verify_detail}")
                if time.monotonic() >= next_report:
                    last = sampler.samples[-1] if sampler.samples else None
                    log(
                        f"  {(time.monotonic() - started) / 60:.0f} min: {len(heals)} tampers,"
                        f" {sum(missed(h) for h in heals)} missed"
                        + (f", RSS {last.rss / MIB:.1f} MiB, fds {last.fds}, threads {last.threads}" if last else "")
                    )
                    next_report += 300
                time.sleep(pause)
                heals[-1].others += [str(e.get("event", {}).get("action")) for e in daemon.events.read()]
        finally:
            sampler.stopping.set()
            sampler.join()
        daemon.check_alive()
        sampler.samples.append(sample(daemon.pid, time.monotonic() - started))
        wall = time.monotonic() - started
        cpu = cpu_seconds(daemon.pid) - cpu0
    return Soak(seed, minutes, heals, kinds, sampler.samples, wall, cpu)


def missed(heal: Heal) -> bool:
    if heal.latency_ms is None and heal.outcome == "healed":  # an untouched edit: no latency to have
        return heal.verified is False
    late = heal.latency_ms is None or heal.latency_ms > HEAL_TIMEOUT_S * 1000
    return heal.outcome != "healed" or late or heal.verified is False


# --- the report ------------------------------------------------------------------------------------------------


def report(result: Soak, command: str, date: str, load: str) -> Section:
    section = Section("Soak")
    samples = result.samples
    first, last = samples[0], samples[-1]
    rss = [(s.at, s.rss / MIB) for s in samples]
    half = [(at, v) for at, v in rss if at >= result.wall_s / 2]
    latencies = [
        h.latency_ms
        for h, k in zip(result.heals, result.kinds, strict=True)
        if k.expect != "untouched" and h.outcome == "healed" and h.latency_ms is not None
    ]
    n_missed = sum(missed(h) for h in result.heals)
    section.add(
        f"- Date: {date}; agent code {git_state()}; command (as root): `{command}`",
        f"- Duration {result.wall_s / 60:.1f} min ({result.minutes:g} asked); seed {result.seed}"
        " (`--seed` repeats the sequence); load average at start and end: " + load,
        "",
        "Method: one real daemon (`vps-agent run --root DIR` in `unshare --net`, a fake root from"
        " tests/fakeroot.py, the config of the heal benchmarks: Port 2222, PermitRootLogin no, PasswordAuthentication"
        " no, shipped engine defaults but `flap_max_heals: 100000`, since it heals on purpose for an hour) for the"
        " whole run. A seeded generator picks one tamper at a time from the kinds below, waits for its heal, then"
        f" pauses {PAUSE_S[0]:g}-{PAUSE_S[1]:g} s (uniform). Healed = the control's `drift-reverted` event for the"
        " transaction that saw the tamper (emitted after the real tool re-read the effective state), then checked"
        " again with the real tool (`sshd -T`, `iptables -S`, `fail2ban-client -d`) outside the timing; for the"
        " accounts guard, which reports and never changes, healed = the finding shown by `vps-agentctl status`"
        " (polled, ~0.1 s a poll), after which the mode is put back and the finding must go; for the in-place"
        " rewrite of jail.local (even `[sshd] enabled = false`: jail.local is read before the agent's"
        " `jail.d/zz-vps-agent.local`, so it is no drift) healed = no fail2ban transaction acts within"
        f" {UNTOUCHED_S:g} s and the file stays byte for byte as written (no latency: it counts in missed only)."
        " Missed = not healed"
        f" within {HEAL_TIMEOUT_S:g} s, a failure event, or a real-tool check that disagrees. Every"
        f" {SAMPLE_EVERY_S:g} s a thread reads the daemon's RSS (smaps_rollup), open fds (/proc/PID/fd) and threads"
        " (/proc/PID/status); the RSS slope is the least-squares fit of those samples. Run under `nice -n 10` on a"
        " shared 2-core machine, so latencies include others' load.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| tampers | {len(result.heals)} |",
        f"| **missed heals** (not healed within {HEAL_TIMEOUT_S:g} s) | **{n_missed}** |",
        f"| heal latency p50 / p99 / max (all kinds) | {fmt(percentile(latencies, 50) if latencies else None)} /"
        f" {fmt(percentile(latencies, 99) if latencies else None)} / {fmt(max(latencies) if latencies else None)} ms |",
        f"| RSS start / end / max | {first.rss / MIB:.1f} / {last.rss / MIB:.1f} /"
        f" {max(s.rss for s in samples) / MIB:.1f} MiB |",
        f"| **RSS slope** (least squares, {len(samples)} samples) | **{slope_per_hour(rss):+.2f} MiB/h**"
        f" (second half only: {slope_per_hour(half):+.2f} MiB/h) |",
        f"| open fds start / end / max | {first.fds} / {last.fds} / {max(s.fds for s in samples)} |",
        f"| threads start / end / max | {first.threads} / {last.threads} / {max(s.threads for s in samples)} |",
        f"| daemon CPU (with reaped children) | {result.cpu_s:.0f} s"
        f" ({result.cpu_s / result.wall_s * 100:.1f}% of a core) |",
        "",
        "| tamper | control | n | p50 ms | p99 ms | max ms | missed |",
        "|---|---|---|---|---|---|---|",
    )
    for kind in KINDS:
        mine = [h for h, k in zip(result.heals, result.kinds, strict=True) if k is kind]
        values = [h.latency_ms for h in mine if h.outcome == "healed" and h.latency_ms is not None]
        cells = [fmt(percentile(values, p)) if values else "-" for p in (50, 99)]
        control = kind.control if kind.expect == "heal" else f"{kind.control} ({kind.expect})"
        section.add(
            f"| {kind.drift.name} | {control} | {len(mine)} |"
            f" {cells[0]} | {cells[1]} | {fmt(max(values) if values else None)} | {sum(missed(h) for h in mine)} |"
        )
    section.add("")
    if n_missed:
        section.failed = True
    return section


def write_section(path: Path, section: Section) -> None:
    """Replace the file's "## Soak" section (up to the next "## " heading), or append it."""
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line == f"## {section.title}"), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section.markdown() if text else section.markdown()
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "\n".join([*lines[:start], *section.markdown().splitlines(), "", *lines[end:]]).rstrip("\n") + "\n"
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES") or 60))
    parser.add_argument("--seed", type=int, default=None, help="repeat a run's sequence (default: a random seed)")
    parser.add_argument("--results", metavar="FILE", help="write the Soak section here (default: stdout)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: needs root (a fake root in private mount and network namespaces)", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"soak: {args.minutes:g} min, seed {seed} (repeat with --seed {seed})", flush=True)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd -T insists on its privilege-separation directory
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_start = load_average()
    result = soak(args.minutes, seed, lambda line: print(line, flush=True))
    command = shlex.join([sys.executable, *sys.argv])
    section = report(result, command, date, f"{load_start}; {load_average()}")
    if args.results:
        write_section(Path(args.results), section)
        print(f"soak: wrote the Soak section of {args.results}")
    print(section.markdown())
    return 1 if section.failed else 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())

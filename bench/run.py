#!/usr/bin/python3
"""`make bench`: every benchmark of issue 9 in one run; writes bench/RESULTS.md.

    sudo /usr/bin/python3 bench/run.py [--quick] [--only ssh,firewall,...] [--results FILE]

Parts: ssh, firewall, fail2ban (drift -> healed latency), idle (5 minutes of nothing), check
(`vps-agentctl check` wall time), storm (tamper storms), compare (cf-agent -K and puppet apply).
The full run takes about 11-12 minutes; --quick (or BENCH_QUICK=1) is a smoke run of about 3.
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import check_time  # noqa: E402
import compare  # noqa: E402
import fail2ban_heal  # noqa: E402
import firewall_heal  # noqa: E402
import heal_latency  # noqa: E402
import idle_cost  # noqa: E402
import storm  # noqa: E402
import sysctl_heal  # noqa: E402
from common import REPO, BenchError, Section, git_state, load_average, machine, targets_table  # noqa: E402

FIXES = Path(__file__).with_name("FIXES.md")


def parts(quick: bool) -> dict[str, Callable[[], Section]]:
    runs = 20 if quick else 200
    return {
        "ssh": lambda: heal_latency.run(runs),
        "firewall": lambda: firewall_heal.run(runs),
        "fail2ban": lambda: fail2ban_heal.run(runs),
        "sysctl": lambda: sysctl_heal.run(runs),
        "check": lambda: check_time.run(5 if quick else 30),
        "storm": lambda: storm.run(quick),
        "compare": lambda: compare.run(3 if quick else 10),
        "idle": lambda: idle_cost.run(30.0 if quick else 300.0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1")
    parser.add_argument("--only", metavar="PARTS", help="comma-separated parts (default: all)")
    parser.add_argument("--results", metavar="FILE", help="write the Markdown report here (default: stdout)")
    parser.add_argument(
        "--note", action="append", default=[], metavar="TEXT", help="a line of context for the report (repeatable)"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (fake roots in private mount and network namespaces)", file=sys.stderr)
        return 2
    missing = [t for t in ("unshare", "nsenter", "sshd", "iptables", "nft", "fail2ban-client") if not shutil.which(t)]
    if missing:
        print(f"bench: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    available = parts(args.quick)
    chosen = args.only.split(",") if args.only else list(available)
    unknown = [p for p in chosen if p not in available]
    if unknown:
        parser.error(f"unknown parts {unknown}; parts: {', '.join(available)}")
    # byte-compiled, as dh-python does when the .deb is installed (the environment may forbid writing .pyc)
    compileall.compile_dir(REPO / "agent", quiet=1)
    compileall.compile_dir(REPO / "tests", quiet=1)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd -T insists on its privilege-separation directory
    started = time.monotonic()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_start = load_average()
    sections: list[Section] = []
    for name in chosen:
        print(f"== {name} (load {load_average()})", flush=True)
        part_started = time.monotonic()
        try:
            section = available[name]()
        except (BenchError, RuntimeError, subprocess.SubprocessError, OSError) as exc:
            section = Section(f"{name}: FAILED", [f"The benchmark failed: `{exc}`"], failed=True)
        section.add(f"_({name}: {time.monotonic() - part_started:.0f} s, load average after {load_average()})_")
        sections.append(section)
        print(section.markdown(), flush=True)
    wall = time.monotonic() - started
    command = shlex.join([sys.executable, *sys.argv])
    out = [
        "# vps-agent benchmarks: results",
        "",
        "Written by `make bench` (`bench/run.py`; method in `bench/README.md` and in each section);"
        " re-run it rather than editing this file.",
        "",
        f"- Date: {date}; agent code {git_state()}",
        f"- Command (as root, from the repository root): `{command}`"
        + (" (**quick smoke run**)" if args.quick else ""),
        f"- Wall time of the whole run: {wall / 60:.1f} min",
        f"- Load average (1/5/15 min) at start: {load_start}; at end: {load_average()}",
        *(f"- Note: {note}" for note in args.note),
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in machine().items()),
        "",
        "## Targets",
        "",
        *targets_table(sections),
        "",
    ]
    for section in sections:
        out.append(section.markdown())
    if FIXES.exists():
        out.append(FIXES.read_text())
    text = "\n".join(out)
    if args.results:
        Path(args.results).write_text(text)
        print(f"wrote {args.results} ({wall / 60:.1f} min)")
    else:
        print(text)
    return 1 if any(s.failed for s in sections) else 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())

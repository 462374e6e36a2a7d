"""What every benchmark shares: percentiles, the daemon under test, its events, the machine, the report.

Every benchmark drives the real daemon (`python3 -m agent.daemon run --root DIR` inside `unshare --net`)
against a fake root built by tests.fakeroot, and hands back a Section for bench/RESULTS.md.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

try:
    import psutil
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("bench: psutil is missing; run it with Debian's /usr/bin/python3 (apt install python3-psutil)")

from tests.fakeroot import make_root  # noqa: E402

PYTHON = "/usr/bin/python3"  # Debian's interpreter with the python3-* packages the .deb runs with
SSHD = "/usr/sbin/sshd"
MIB = 1024 * 1024
FAILURE_ACTIONS = {"remediation-failed", "remediation-blocked", "observe-failed"}


def bench_config(**engine: str) -> str:
    """The fake root's config: the shipped defaults but for `engine` (e.g. flap_max_heals, see each bench)."""
    lines = [
        "# written by bench/",
        "ssh:",
        "  port: 2222",
        '  permit_root_login: "no"',
        "  password_authentication: false",
        "engine:",
        "  reconcile_interval: 5m",
    ]
    lines += [f"  {key}: {value}" for key, value in engine.items()]
    return "\n".join(lines) + "\n"


# The heal benchmarks heal several times a second on purpose; at the shipped flap_max_heals (5 within 1m)
# the agent would rightly call the control flapping and back off, and they would measure the back-off.
NO_FLAP = {"flap_max_heals": "100000"}


# --- statistics ----------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest rank: the smallest value with at least p% of the samples at or below it."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Stats:
    n: int
    min: float
    p50: float
    p95: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats | None:
        if not values:
            return None
        return cls(
            len(values),
            min(values),
            percentile(values, 50),
            percentile(values, 95),
            percentile(values, 99),
            max(values),
            sum(values) / len(values),
        )


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f} MiB"


STATS_HEADER = "| measure | n | min | p50 | p95 | p99 | max | mean |\n|---|---|---|---|---|---|---|---|"


def stats_row(label: str, values: Sequence[float]) -> str:
    s = Stats.of(values)
    if s is None:
        return f"| {label} | 0 | - | - | - | - | - | - |"
    cells = " | ".join(fmt(v) for v in (s.min, s.p50, s.p95, s.p99, s.max, s.mean))
    return f"| {label} | {s.n} | {cells} |"


# --- the report --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    what: str  # e.g. "sshd drift heal p99 < 60 ms"
    measured: str
    met: bool | None  # None: measured, no pass/fail (e.g. a comparison)


@dataclass
class Section:
    title: str
    lines: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    failed: bool = False  # something went wrong beyond a missed target (a tamper never healed, a crash)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def markdown(self) -> str:
        return "\n".join([f"## {self.title}", "", *self.lines, ""])


def targets_table(sections: Sequence[Section]) -> list[str]:
    rows = ["| target | measured | met |", "|---|---|---|"]
    for section in sections:
        for t in section.targets:
            verdict = "-" if t.met is None else ("yes" if t.met else "**NO**")
            rows.append(f"| {t.what} | {t.measured} | {verdict} |")
    return rows


# --- the machine ---------------------------------------------------------------------------------------------


def command_output(argv: list[str], timeout: float = 10) -> str:
    """The first line a command prints (stdout, else stderr), or why it could not run."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"({exc})"
    text = (result.stdout + result.stderr).strip()
    return text.splitlines()[0] if text else ""


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> dict[str, str]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = next(
        (
            f"{int(line.split()[1]) // 1024} MiB"
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        ),
        "?",
    )
    versions = command_output(
        [
            PYTHON,
            "-c",
            "import importlib.metadata as m;"
            "print(', '.join(f'{p} {m.version(p)}' for p in ('structlog','watchdog','psutil','PyYAML')))",
        ]
    )
    virt = command_output(["systemd-detect-virt"]) if shutil.which("systemd-detect-virt") else "?"

    def package(name: str) -> str:
        return command_output(["dpkg-query", "-W", "-f", "${Version}", name]) or "not installed"

    return {
        "cpu": f"{model}, {os.cpu_count()} CPUs",
        "memory": memory,
        "kernel": f"{platform.system()} {platform.release()}",
        "virtualisation (systemd-detect-virt)": virt or "none",
        "python": f"{PYTHON} ({command_output([PYTHON, '-V'])}); {versions}",
        "sshd": f"{command_output([SSHD, '-V'])} (openssh-server {package('openssh-server')})",
        "firewall tools": f"iptables {package('iptables')}, nftables {package('nftables')}",
        "fail2ban": package("fail2ban"),
        "cfengine3 / puppet-agent": f"{package('cfengine3')} / {package('puppet-agent')}",
    }


def git_state() -> str:
    head = command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    porcelain = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "agent"], capture_output=True, text=True
    ).stdout
    dirty = [line[3:] for line in porcelain.splitlines() if line.strip()]
    if not dirty:
        return f"`{head}` (agent/ clean)"
    return f"`{head}` plus uncommitted changes in " + ", ".join(f"`{d}`" for d in dirty)


# --- the daemon's events --------------------------------------------------------------------------------------


def parse_timestamp(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def action_of(event: dict[str, Any]) -> str:
    return str(event.get("event", {}).get("action", "?"))


def txid_of(event: dict[str, Any]) -> str | None:
    return event.get("transaction", {}).get("id")


class EventTail:
    """The whole JSON lines appended to the events file since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._partial = b""
        self.count = 0

    def read(self) -> list[dict[str, Any]]:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return []
        chunks = []
        while chunk := os.read(self._fd, 1 << 16):
            chunks.append(chunk)
        if not chunks:
            return []
        *lines, self._partial = (self._partial + b"".join(chunks)).split(b"\n")
        events = [json.loads(line) for line in lines if line.strip()]
        self.count += len(events)
        return events

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --- the daemon under test -----------------------------------------------------------------------------------


class BenchError(Exception):
    pass


def unit_environment() -> dict[str, str]:
    """The `Environment=` systemd/vps-agent.service gives the daemon (glibc's malloc settings), so the
    daemon measured here allocates as the installed one does."""
    env: dict[str, str] = {}
    for line in (REPO / "systemd/vps-agent.service").read_text().splitlines():
        if line.startswith("Environment="):
            for assignment in shlex.split(line.removeprefix("Environment=")):
                key, _, value = assignment.partition("=")
                env[key] = value
    return env


class Daemon:
    """`vps-agent run --root ROOT` in a private network namespace (the host's ruleset is never touched)."""

    def __init__(
        self, root: Path, log: Path, env: dict[str, str] | None = None, wrap: Sequence[str] = ("unshare", "--net", "--")
    ) -> None:
        """wrap: what runs the daemon (it must exec it, keeping the pid); by default a private network namespace."""
        self.root = root
        self.log = log
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(
            [*wrap, PYTHON, "-m", "agent.daemon", "run", "--root", str(root)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **unit_environment(), **(env or {})},
        )
        self.ps = psutil.Process(self.process.pid)  # unshare execs the interpreter: the same pid
        self.events = EventTail(root / "var/log/vps-agent/events.jsonl")
        self.exit_code: int | None = None
        self.stop_problem = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(f"the daemon exited with status {self.process.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def ctl(self, *args: str, netns: bool = False) -> subprocess.CompletedProcess[str]:
        """vps-agentctl --root ROOT ARGS; netns: in the daemon's network namespace (check, diff)."""
        argv = [PYTHON, "-m", "agent.cli", "--root", str(self.root), *args]
        if netns:
            argv = ["nsenter", "-t", str(self.pid), "-n", *argv]
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)

    def wait_ready(self, timeout: float = 60) -> None:
        """The socket answers and no control is still "starting": the start-up reconcile is done."""
        socket = self.root / "run/vps-agent/agent.sock"
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self.check_alive()
            if socket.exists():
                result = self.ctl("status", "--json")
                if result.returncode != 3 and result.stdout.strip():
                    controls = json.loads(result.stdout)["controls"]
                    if all(c["status"] != "starting" for c in controls):
                        return
                last = result.stdout.strip()[-300:] + result.stderr.strip()[-300:]
            time.sleep(0.05)
        raise BenchError(f"the daemon was not ready after {timeout:g}s ({last or 'no socket'}):\n{self.log_tail()}")

    def status(self) -> dict[str, dict[str, Any]]:
        result = self.ctl("status", "--json")
        return {c["control"]: c for c in json.loads(result.stdout)["controls"]}

    def in_netns(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-n", *argv], capture_output=True, text=True, timeout=timeout
        )

    def in_mountns(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", *argv], capture_output=True, text=True, timeout=timeout
        )

    def stop(self, timeout: float = 15.0) -> None:
        self.events.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.stop_problem = f"did not exit within {timeout:g}s of SIGTERM; killed"
                self.process.kill()
                self.process.wait(10)
        self.exit_code = self.process.returncode
        self._log_file.close()


@contextmanager
def running_daemon(
    config: str,
    env: dict[str, str] | None = None,
    keep: bool = False,
    ready_timeout: float = 60,
    wrap: Callable[[Path], Sequence[str]] | None = None,
) -> Iterator[Daemon]:
    """A fresh fake root with `config`, the daemon on it, ready; always stopped, the root removed.
    wrap(root): what runs the daemon instead of `unshare --net --`."""
    workdir = Path(tempfile.mkdtemp(prefix="vps-agent-bench-"))
    daemon: Daemon | None = None
    problem = ""
    try:
        root = make_root(workdir / "root", config=config)
        daemon = Daemon(root, workdir / "agent.log", env, *([wrap(root)] if wrap else []))
        daemon.wait_ready(ready_timeout)
        daemon.events.read()  # the start-up reconcile is not part of any measurement
        yield daemon
    finally:
        if daemon is not None:
            daemon.stop()
            if daemon.stop_problem or daemon.exit_code not in (0, None):
                problem = f"the daemon {daemon.stop_problem or f'exited {daemon.exit_code}'}:\n{daemon.log_tail()}"
        if keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if problem:
        raise BenchError(problem)


# --- one heal -----------------------------------------------------------------------------------------------


@dataclass
class Heal:
    kind: str
    t0: float
    outcome: str = "timeout"  # healed | timeout | remediation-failed | ...
    txid: str | None = None
    detected_ms: float | None = None  # tamper -> drift-detected
    latency_ms: float | None = None  # tamper -> drift-reverted: the effective state right again
    duration_ms: float | None = None  # the transaction's own duration_ms
    verified: bool | None = None
    verify_detail: str = ""
    others: list[str] = field(default_factory=list)  # events that belong to no tamper


def wait_for_heal(daemon: Daemon, control: str, kind: str, t0: float, timeout: float) -> Heal:
    """Follow the events from t0 for this control's drift-detected and the drift-reverted of the same
    transaction. The agent emits drift-reverted only after observing the effective state right again."""
    heal = Heal(kind, t0)
    deadline = time.monotonic() + timeout
    while True:
        for event in daemon.events.read():
            action, txid = action_of(event), txid_of(event)
            mine = event.get("control") == control
            if heal.txid is None and mine and action == "drift-detected":
                heal.txid = txid
                heal.detected_ms = (parse_timestamp(event["@timestamp"]) - t0) * 1000
            elif heal.txid is not None and txid == heal.txid and action == "drift-reverted":
                heal.outcome = "healed"
                heal.latency_ms = (parse_timestamp(event["@timestamp"]) - t0) * 1000
                heal.duration_ms = float(event["duration_ms"])
                return heal
            elif mine and action in FAILURE_ACTIONS:
                heal.outcome = action
                return heal
            else:
                heal.others.append(f"{action} ({event.get('control', '-')})")
        if time.monotonic() > deadline:
            return heal
        daemon.check_alive()
        time.sleep(0.001)  # the latency comes from the event's own timestamp, not from this poll


@dataclass(frozen=True)
class DriftKind:
    name: str
    description: str
    tamper: Callable[[Daemon], float]  # does the tamper; returns t0 = time.time() just before it
    verify: Callable[[Daemon], str]  # "" when the real tool says the state is right, else what is wrong
    tidy: Callable[[Daemon], None] = lambda daemon: None  # housekeeping after a heal, outside the timing


def measure_heals(
    daemon: Daemon,
    control: str,
    kinds: Sequence[DriftKind],
    runs: int,
    gap: float = 0.1,
    timeout: float = 5.0,
) -> list[Heal]:
    """`runs` tampers of each kind, interleaved; each verified with the real tool after its heal."""
    heals: list[Heal] = []
    for index in range(runs * len(kinds)):
        kind = kinds[index % len(kinds)]
        heal = wait_for_heal(daemon, control, kind.name, kind.tamper(daemon), timeout)
        if heal.outcome == "healed":
            problem = kind.verify(daemon)
            heal.verified, heal.verify_detail = not problem, problem
        kind.tidy(daemon)
        time.sleep(gap)  # each tamper its own transaction: closer ones would be merged by the debounce
        heal.others += [f"{action_of(e)} ({e.get('control', '-')})" for e in daemon.events.read()]
        heals.append(heal)
        if heal.outcome != "healed" or heal.verified is False:
            print(f"  !! {kind.name}: {heal.outcome} {heal.verify_detail}", file=sys.stderr, flush=True)
    return heals


def heal_report(section: Section, heals: Sequence[Heal], what: str, target_ms: float) -> None:
    """The latency tables and the target row for one guard's heals."""
    healed = [h for h in heals if h.outcome == "healed" and h.latency_ms is not None]
    latency = [h.latency_ms for h in healed if h.latency_ms is not None]
    failed = [h for h in heals if h.outcome != "healed"]
    unverified = [h for h in heals if h.verified is False]
    others = [o for h in heals for o in h.others]
    section.add(
        f"Tampers: {len(heals)}; healed: {len(healed)}; not healed: {len(failed)}"
        + (f" ({', '.join(sorted({h.outcome for h in failed}))})" if failed else "")
        + f"; real-tool verification failures after a heal: {len(unverified)}"
        + f"; other events: {len(others)}"
        + (f" ({', '.join(sorted(set(others))[:8])})" if others else "")
        + ".",
        "",
        "All times in ms; percentiles are nearest-rank.",
        "",
        STATS_HEADER,
    )
    by_kind: dict[str, list[Heal]] = {}
    for h in healed:
        by_kind.setdefault(h.kind, []).append(h)
    for kind, items in by_kind.items():
        section.add(stats_row(f"**{kind}**: tamper -> healed", [h.latency_ms for h in items if h.latency_ms]))
        section.add(stats_row(f"{kind}: tamper -> drift-detected", [h.detected_ms for h in items if h.detected_ms]))
        section.add(stats_row(f"{kind}: transaction duration_ms", [h.duration_ms for h in items if h.duration_ms]))
    if len(by_kind) > 1:
        section.add(stats_row("**all kinds**: tamper -> healed", latency))
    section.add("")
    for kind, items in by_kind.items():
        s = Stats.of([h.latency_ms for h in items if h.latency_ms is not None])
        met = s is not None and s.p99 < target_ms and not any(h.kind == kind for h in failed + unverified)
        measured = (
            "not measured" if s is None else f"p50 {s.p50:.1f} / p95 {s.p95:.1f} / p99 {s.p99:.1f} / max {s.max:.1f} ms"
        )
        section.targets.append(Target(f"{what} ({kind}) p99 < {target_ms:.0f} ms", measured, met))
    if failed or unverified:
        section.failed = True


# --- process accounting -------------------------------------------------------------------------------------


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, children: bool = True) -> float:
    """utime+stime from /proc/PID/stat, plus cutime+cstime (reaped children: sshd -T, fail2ban-client ...)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / CLOCK_TICKS


def memory(pid: int) -> dict[str, int]:
    """Rss and Pss (bytes) from /proc/PID/smaps_rollup, the high-water mark VmHWM from status."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss") and rest.strip().endswith("kB"):
            values[key.lower()] = int(rest.split()[0]) * 1024
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            values["hwm"] = int(line.split()[1]) * 1024
    return values


def context_switches(pid: int) -> dict[int, int]:
    """Per thread id: voluntary + involuntary context switches so far (every wake-up is one)."""
    counts: dict[int, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue  # the thread ended
        total = 0
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                total += int(line.split()[1])
        counts[int(task.name)] = total
    return counts


@dataclass(frozen=True)
class Ran:
    wall_ms: float
    peak_rss: int  # bytes: wait4's ru_maxrss, the largest of the process and the descendants it waited for
    cpu_s: float  # user + system of the process and its waited-for descendants
    result: subprocess.CompletedProcess[str]


def timed(argv: list[str], **kwargs: Any) -> Ran:
    """One run of argv with its wall time, peak memory (what /usr/bin/time -v calls "Maximum resident
    set size") and CPU time, all from wait4's rusage."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        process = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, **kwargs)
        _, status, usage = os.wait4(process.pid, 0)
        wall = (time.monotonic() - started) * 1000
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(
            argv, process.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace")
        )
    return Ran(wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime, result)

"""Drive the real daemon (`vps-agent run --root`) and the real sshd against a fake root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypedDict, Unpack

REPO = Path(__file__).resolve().parents[2]
SSHD = "/usr/sbin/sshd"
# the capabilities systemd/vps-agent.service leaves the daemon: no CAP_SYS_PTRACE, so sshd's fds are hidden
NO_PTRACE = ("setpriv", "--bounding-set", "-sys_ptrace", "--inh-caps", "-sys_ptrace", "--")


def effective_sshd(root: Path) -> dict[str, list[str]]:
    """`sshd -T` as sshd itself sees the fake root (its /etc/ssh bound over /etc/ssh in a private namespace)."""
    script = (
        'mount --make-rprivate / && mount --bind "$0/etc/ssh" /etc/ssh && mkdir -p /run/sshd && '
        f"exec {SSHD} -T -f /etc/ssh/sshd_config"
    )
    result = subprocess.run(["unshare", "--mount", "sh", "-c", script, str(root)], capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"sshd -T failed: {result.stderr}")
    values: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(" ")
        values.setdefault(key, []).append(value)
    return values


# Callable[...]: the predicates are lambdas that may bind a loop's value as a default
def wait_for(predicate: Callable[..., Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Agent:
    """One `vps-agent run --root` subprocess; stop() is always called by the fixture."""

    def __init__(
        self,
        root: Path,
        env: dict[str, str] | None = None,
        config: Path | None = None,
        netns: bool = True,
        wrap: Sequence[str] = (),
    ) -> None:
        """wrap: a command that runs the daemon instead of `unshare --net` (it must exec it, keeping the pid)."""
        self.root = root
        self.log = root.parent / f"agent-{os.getpid()}-{time.monotonic_ns()}.log"
        argv = [sys.executable, "-m", "agent.daemon", "run", "--root", str(root)]
        if wrap:
            argv = [*wrap, *argv]
        elif netns:
            # a private network namespace: the firewall guard may change only that one's ruleset
            argv = ["unshare", "--net", "--", *argv]
        if config is not None:
            argv += ["--config", str(config)]
        self.process = subprocess.Popen(
            argv, cwd=REPO, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    @property
    def events_file(self) -> Path:
        return self.root / "var/log/vps-agent/events.jsonl"

    def events(self) -> list[dict[str, Any]]:
        try:
            lines = self.events_file.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def wait_ready(self, timeout: float = 15.0) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"agent exited with {self.process.returncode}:\n{self.output()}")
            if not (self.root / "run/vps-agent/agent.sock").exists():
                return False
            status = self.ctl("status", "--json")
            return status.returncode != 3 and all(
                c["status"] != "starting" for c in json.loads(status.stdout)["controls"]
            )

        wait_for(ready, timeout, "the agent's start-up reconcile")

    def mark(self) -> int:
        return len(self.events())

    def wait_event(
        self, action: str, since: int = 0, timeout: float = 10.0, control: str | None = "ssh"
    ) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for event in self.events()[since:]:
                if event["event"]["action"] == action and (control is None or event.get("control") == control):
                    return event
            return None

        try:
            return wait_for(found, timeout, f"event {action}")
        except AssertionError:
            actions = [e["event"]["action"] for e in self.events()[since:]]
            raise AssertionError(f"no {action} event; got {actions}\n{self.output()}") from None

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", "--root", str(self.root), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def status(self) -> dict[str, Any]:
        result = self.ctl("status", "--json")
        return {c["control"]: c for c in json.loads(result.stdout)["controls"]}

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
                raise AssertionError("agent did not stop on SIGTERM") from None
        return self.process.returncode


class AgentOptions(TypedDict, total=False):
    """Agent's keywords, as start_agent passes them on."""

    env: dict[str, str] | None
    config: Path | None
    netns: bool
    wrap: Sequence[str]


class StartAgent(Protocol):
    """The start_agent fixture: start_agent(root) -> a running, ready Agent."""

    def __call__(self, root: Path, ready: bool = True, **options: Unpack[AgentOptions]) -> Agent: ...


def tree_snapshot(directory: Path) -> dict[str, tuple[bytes | str, int]]:
    """Every file under directory with its content (or link target) and mode: 'nothing written' means equal."""
    snapshot: dict[str, tuple[bytes | str, int]] = {}
    for path in sorted(directory.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            snapshot[str(path)] = (os.readlink(path), info.st_mode)
        elif path.is_file():
            snapshot[str(path)] = (path.read_bytes(), info.st_mode)
        else:
            snapshot[str(path)] = (b"<dir>", info.st_mode)
    return snapshot


def backup_set_of(root: Path, transaction_id: str, control: str = "ssh") -> Path:
    """The set holding a transaction's copies: its own, or the identical earlier one listing it as a repeat."""
    base = root / "var/lib/vps-agent/backups" / control
    for backup in sorted(base.iterdir()):
        if backup.name.endswith(f"-{transaction_id}"):
            return backup
        manifest = backup / "manifest.json"
        if manifest.is_file() and transaction_id in json.loads(manifest.read_text()).get("repeats", []):
            return backup
    raise AssertionError(f"no backup set holds transaction {transaction_id}")


def backup_of(root: Path, transaction_id: str, system_path: str) -> bytes:
    return (backup_set_of(root, transaction_id) / "files" / system_path.lstrip("/")).read_bytes()


@contextmanager
def sshd_in_namespaces(root: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real `sshd -D` on the fake root's /etc/ssh, in mount and network namespaces of its own (lo up),
    its pidfile in the fake root so the agent reloads it; stopped at the end. unshare and sh exec, so
    the process is sshd itself."""
    pidfile = root / "run/sshd.pid"
    pidfile.unlink(missing_ok=True)
    script = (
        'mount --make-rprivate / && mount --bind "$0/etc/ssh" /etc/ssh && mkdir -p /run/sshd && ip link set lo up && '
        f"exec {SSHD} -D -o PidFile={pidfile}"
    )
    sshd = subprocess.Popen(["unshare", "--mount", "--net", "sh", "-c", script, str(root)])
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() == str(sshd.pid), what="sshd's pidfile")
        yield sshd
    finally:
        sshd.terminate()
        sshd.wait(10)


def listening_in_netns_of(pid: int) -> set[int]:
    """The TCP ports anything listens on in process pid's network namespace (`ss -ltn`)."""
    out = in_netns_of(pid, "ss", "-Hltn").stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def in_netns_of(pid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run argv in the network namespace of process pid (the daemon's), never in the host's."""
    return subprocess.run(["nsenter", "-t", str(pid), "-n", *argv], capture_output=True, text=True, timeout=30)

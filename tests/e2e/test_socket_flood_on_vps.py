"""A member of group adm floods the control socket of the installed agent on a booted Debian 12 VPS:
1500 `events --follow` streams and 50 slow senders. The agent must keep healing as fast as without the
flood, answer root at once, stay the same process and keep its journal quiet."""

from __future__ import annotations

import json
import select
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest

from tests.e2e.sandbox import SCRIPT, Sandbox
from tests.e2e.test_agent_on_vps import FIREWALL_CHAIN, agent_vps, events, firewall_in_place, main_pid, wait_for

FLOODER = "flooder"  # in group adm: may connect to agent.sock for the read-only verbs
WATCHER = "watcher"  # another adm member, not flooding: its status must still be answered
FOLLOWERS = 1500
SLOW_SENDERS = 50
HEAL_TIMEOUT = 30.0  # how long to wait for a heal at all; the timings are asserted against each other
STATUS_BUDGET = 1.0  # seconds for root's `vps-agentctl status` while flooded

# Speaks agent/ipc.py's JSON-lines protocol directly, as an attacker would. Non-blocking connects: once
# the listen backlog is full a connect fails with EAGAIN at once instead of waiting. Prints one JSON line
# when everything is open ("holding"), then sends one byte a second to every slow sender still open and
# notes when the agent ended it; a line on stdin asks for the final report and ends the flood.
FLOOD_SCRIPT = r"""
import errno, json, os, resource, select, socket, sys, time

SOCK = "/run/vps-agent/agent.sock"
followers, slow_senders = int(sys.argv[1]), int(sys.argv[2])
started = time.monotonic()

connect_errors = {}

def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    for _ in range(50):
        try:
            s.connect(SOCK)
            break
        except BlockingIOError:
            time.sleep(0.01)  # the backlog is full: give the agent a moment to accept
        except OSError as exc:  # e.g. ENOENT: the agent died and took its socket along
            name = errno.errorcode.get(exc.errno, str(exc.errno))
            connect_errors[name] = connect_errors.get(name, 0) + 1
            time.sleep(0.01)
            s.close()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
    else:
        s.close()
        return None
    s.setblocking(True)
    return s

def first_line(s):
    # what the agent answered so far, without waiting
    s.setblocking(False)
    try:
        data = s.recv(4096)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        return f"<{errno.errorcode.get(exc.errno, exc.errno)}>"
    finally:
        s.setblocking(True)
    return data.split(b"\n")[0].decode(errors="replace") if data else "<eof>"

stats = {"follow_connect_failed": 0, "follow_send_failed": 0, "slow_connect_failed": 0}
follows = []
for _ in range(followers):
    s = connect()
    if s is None:
        stats["follow_connect_failed"] += 1
        continue
    try:
        s.sendall(b'{"verb": "events", "args": {"follow": true, "n": 0}}\n')
    except OSError:
        stats["follow_send_failed"] += 1
    follows.append(s)

request = b'{"verb": "status", "args": {"pad": "' + b"x" * 4000 + b'"}}\n'  # never finished at 1 byte/s
slow = {}
for _ in range(slow_senders):
    s = connect()
    if s is None:
        stats["slow_connect_failed"] += 1
        continue
    slow[s] = {"sent": 0, "opened": time.monotonic(), "ended": None, "answer": None}

stats["connect_errors"] = connect_errors
stats["follows_open"] = len(follows)
stats["slow_open"] = len(slow)
stats["setup_s"] = round(time.monotonic() - started, 2)
print(json.dumps({"phase": "holding", **stats}), flush=True)

while True:
    ready, _, _ = select.select([sys.stdin], [], [], 1.0)
    if ready:
        break
    for s, state in slow.items():
        if state["ended"] is not None:
            continue
        answer = first_line(s)
        if answer is not None:
            state["ended"], state["answer"] = time.monotonic(), answer
            continue
        try:
            s.send(request[state["sent"] : state["sent"] + 1])
            state["sent"] += 1
        except OSError as exc:
            state["ended"] = time.monotonic()
            state["answer"] = f"<{errno.errorcode.get(exc.errno, exc.errno)}>"

answers = {}
for s in follows:
    line = first_line(s) or "<nothing yet>"
    key = line if line.startswith("<") else json.loads(line).get("error", "stream") if line.startswith("{") else line
    answers[key] = answers.get(key, 0) + 1
slow_report = [
    {"held_s": None if st["ended"] is None else round(st["ended"] - st["opened"], 2), "answer": st["answer"]}
    for st in slow.values()
]
print(json.dumps({"phase": "report", "follow_answers": answers, "slow": slow_report, **stats}), flush=True)
"""


class Flood:
    """The flooder's script running inside the VPS as the adm member, until report() ends it."""

    def __init__(self, vps: Sandbox) -> None:
        # prlimit: the flooder needs more than 1024 fds of its own; setpriv then drops to the adm member
        argv = [str(SCRIPT), "exec", str(vps.root), "--", "prlimit", "--nofile=8192:8192"]
        argv += ["setpriv", f"--reuid={FLOODER}", f"--regid={FLOODER}", "--init-groups"]
        argv += ["python3", "-c", FLOOD_SCRIPT, str(FOLLOWERS), str(SLOW_SENDERS)]
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def line(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, f"the flood script said nothing within {timeout:.0f}s"
        text = self.process.stdout.readline()
        assert text, f"the flood script ended early (exit {self.process.wait()})"
        message: dict[str, Any] = json.loads(text)
        return message

    def report(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write("report\n")
        self.process.stdin.flush()
        report = self.line(60)
        self.process.wait(30)
        return report

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


@pytest.fixture(scope="module")
def vps(tmp_path_factory: pytest.TempPathFactory, release: str) -> Iterator[Sandbox]:
    with agent_vps(tmp_path_factory, "flood", release=release) as sandbox:
        for user in (FLOODER, WATCHER):
            sandbox.exec(["useradd", "--create-home", "--shell", "/bin/bash", user])
            sandbox.exec(["usermod", "-aG", "adm", user])
        # the SSH guard is pending until the admin has logged in with a key once; where the agent does
        # not see that login in sshd's journal (yet), the admin vouches for it as the guide says
        sandbox.ssh("true")
        try:
            wait_for("the key login to be seen", lambda: status_code(sandbox) == 0, 10)
        except AssertionError:
            sandbox.exec(["vps-agentctl", "confirm"])
        wait_for("vps-agentctl status to exit 0", lambda: status_code(sandbox) == 0, 30)
        yield sandbox


def status_code(vps: Sandbox) -> int:
    return vps.exec(["vps-agentctl", "status"], check=False).returncode


def socket_stats(vps: Sandbox) -> dict[str, Any]:
    """What `status --json` says about the control socket (agent/ipc.py IpcServer.stats)."""
    stats: dict[str, Any] = json.loads(vps.exec(["vps-agentctl", "status", "--json"], check=False).stdout)["ipc"]
    return stats


def timestamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["@timestamp"]).replace("Z", "+00:00")).timestamp()


def firewall_heal_seconds(vps: Sandbox) -> float:
    """Flush the agent's chain, wait for the heal; seconds from the flush to the drift-reverted event."""
    mark = len(events(vps))
    flushed_at = time.time()  # the VPS shares the host's clock
    vps.exec(["iptables", "-F", FIREWALL_CHAIN])

    def healed() -> list[dict[str, Any]]:
        return [
            e for e in events(vps)[mark:] if e.get("control") == "firewall" and e["event"]["action"] == "drift-reverted"
        ]

    wait_for("the heal of the flushed chain", lambda: bool(healed()) and firewall_in_place(vps), HEAL_TIMEOUT)
    assert "--dport 22 -j ACCEPT" in vps.exec(["iptables", "-S", FIREWALL_CHAIN]).stdout
    return timestamp(healed()[0]) - flushed_at


def sshd_heal_seconds(vps: Sandbox) -> float:
    """PermitRootLogin yes at the top of sshd_config; seconds from the edit to the drift-reverted event."""
    mark = len(events(vps))
    edited_at = time.time()
    vps.exec(["sed", "-i", "1i PermitRootLogin yes", "/etc/ssh/sshd_config"])

    def healed() -> list[dict[str, Any]]:
        return [e for e in events(vps)[mark:] if e.get("control") == "ssh" and e["event"]["action"] == "drift-reverted"]

    def root_login_off() -> bool:
        return "permitrootlogin no" in vps.exec(["sshd", "-T"]).stdout.splitlines()

    wait_for("the heal of PermitRootLogin yes", lambda: bool(healed()) and root_login_off(), HEAL_TIMEOUT)
    return timestamp(healed()[0]) - edited_at


def timed_status(vps: Sandbox, user: str | None = None) -> tuple[float, subprocess.CompletedProcess[str]]:
    argv = ["vps-agentctl", "status"] if user is None else ["runuser", "-u", user, "--", "vps-agentctl", "status"]
    started = time.monotonic()
    done = vps.exec(argv, check=False, timeout=30)
    return time.monotonic() - started, done


def unless_timed_out(measure: Callable[[Sandbox], float], vps: Sandbox) -> float | None:
    """The measurement, or None when what it waits for never came (printed, then asserted)."""
    try:
        return measure(vps)
    except AssertionError:
        return None


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.3f}s"


def held_for(slow: object) -> str:
    """How long the agent let each slow sender hold its connection, in seconds (None: still open)."""
    assert isinstance(slow, list)
    held = sorted(s["held_s"] for s in slow if s["held_s"] is not None)
    still_open = sum(s["held_s"] is None for s in slow)
    answers: dict[str, int] = {}
    for s in slow:
        answers[str(s["answer"])] = answers.get(str(s["answer"]), 0) + 1
    span = f"{held[0]}..{held[-1]}s" if held else "-"
    return f"{len(held)} ended after {span}, {still_open} still open; answers {json.dumps(answers)}"


def journal_since(vps: Sandbox, since: float) -> list[str]:
    out = vps.exec(["journalctl", "--no-pager", "-o", "cat", "-u", "vps-agent", "--since", f"@{since:.0f}"])
    return out.stdout.splitlines()


def test_an_adm_member_flooding_the_socket_stops_no_heal_and_never_locks_root_out(
    vps: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    pid = main_pid(vps)
    quiet_status, _ = timed_status(vps)
    quiet_firewall = firewall_heal_seconds(vps)
    quiet_sshd = sshd_heal_seconds(vps)

    flood_started = time.time()
    flood = Flood(vps)
    try:
        holding = flood.line(300)
        assert holding["phase"] == "holding", holding
        holding_since = time.monotonic()
        time.sleep(1.0)  # let the agent take in what is queued
        flooded_status, status = timed_status(vps)
        watcher_status, watched = timed_status(vps, WATCHER)
        flooded_firewall = unless_timed_out(firewall_heal_seconds, vps)
        flooded_sshd = unless_timed_out(sshd_heal_seconds, vps)
        time.sleep(max(0.0, 8.0 - (time.monotonic() - holding_since)))  # past the slow senders' deadline
        report = flood.report()
    finally:
        flood.kill()
    stats = socket_stats(vps)
    journal = journal_since(vps, flood_started)
    tracebacks = sum("Traceback" in line for line in journal)

    with capsys.disabled():  # shown in every run, pass or fail
        print(
            f"\n[e2e] socket flood by uid {FLOODER}: {json.dumps(holding)}"
            f"\n[e2e]   firewall heal {quiet_firewall:.3f}s quiet, {seconds(flooded_firewall)} flooded"
            f"\n[e2e]   sshd heal     {quiet_sshd:.3f}s quiet, {seconds(flooded_sshd)} flooded"
            f"\n[e2e]   root status   {quiet_status:.3f}s quiet, {flooded_status:.3f}s flooded"
            f" (exit {status.returncode})"
            f"\n[e2e]   {WATCHER}'s status {watcher_status:.3f}s flooded (exit {watched.returncode})"
            f"\n[e2e]   follow answers {json.dumps(report['follow_answers'])}"
            f"\n[e2e]   slow senders: {held_for(report['slow'])}"
            f"\n[e2e]   socket counts at the end: {json.dumps(stats)}"
            f"\n[e2e]   journal: {len(journal)} lines, {tracebacks} with a traceback, since the flood began"
        )
    # root is answered at once, and so is another adm member
    assert status.returncode == 0 and flooded_status < STATUS_BUDGET, (flooded_status, status.stdout, status.stderr)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    # the heals took as long as without the flood (the same, give or take the noise of a busy box)
    assert flooded_firewall is not None, "no firewall heal while flooded"
    assert flooded_firewall < 2 * quiet_firewall + 0.5, (quiet_firewall, flooded_firewall)
    assert flooded_sshd is not None, "no sshd heal while flooded"
    assert flooded_sshd < 2 * quiet_sshd + 0.5, (quiet_sshd, flooded_sshd)
    # the same process all along, and a journal an admin can still read
    assert main_pid(vps) == pid
    assert tracebacks == 0 and len(journal) < 100, "\n".join(journal[-40:])
    # the flooder was told why, and no slow sender outlived the request deadline
    answers = report["follow_answers"]
    assert isinstance(answers, dict)
    assert any(str(key).startswith("too many") for key in answers), answers
    slow = report["slow"]
    assert isinstance(slow, list)
    assert all(s["held_s"] is not None and s["held_s"] < 7.0 for s in slow), slow
    # and once it is gone, the agent is as it was: its streams end within a tick, not at the next event
    wait_for("status to exit 0 after the flood", lambda: status_code(vps) == 0, 30)
    flooder_uid = vps.exec(["id", "-u", FLOODER]).stdout.strip()
    wait_for("the flooder's connections to be gone", lambda: flooder_uid not in socket_stats(vps)["by_uid"], 5)

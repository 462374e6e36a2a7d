"""Crash-safe transactions through the real daemon, driven by the test-only fault hook (agent/engine/faults.py):
a bug mid-heal (a TypeError raised at a named step, as a bug in a control would) rolls back byte for byte;
a SIGKILL at every step of the SSH, firewall and fail2ban heals, then a restart, leaves no torn file, a
config sshd -t accepts, sshd running, the admin's own lines as they were, every backup set readable, and
the baseline back after the restart's one start-up reconcile. Real sshd (-t/-T, and a running one in
namespaces of its own), real iptables in a network namespace that outlives the crashed daemon, real
fail2ban-client -d."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.controls.fail2ban import parse_dump
from agent.engine import faults
from agent.system import backups, fs
from tests.conftest import require_root_and_tools
from tests.fakeroot import make_root
from tests.integration.harness import (
    Agent,
    effective_sshd,
    in_netns_of,
    sshd_in_namespaces,
    tree_snapshot,
    wait_for,
)

DROPIN = "etc/ssh/sshd_config.d/00-vps-agent.conf"


@pytest.mark.parametrize("step", ["after-validate", "during-reload"])
def test_a_bug_in_the_ssh_heal_restores_every_file_byte_for_byte(
    fake_root: Path, start_agent: Callable[..., Agent], step: str
) -> None:
    before = tree_snapshot(fake_root / "etc/ssh")
    agent = start_agent(fake_root, ready=False, env={"VPS_AGENT_TEST_FAULT": f"ssh:{step}:raise"})
    failed = agent.wait_event("remediation-failed", timeout=20)
    assert failed["error_type"] == "InjectedFault" and "fix rolled back: InjectedFault" in failed["message"]
    assert f"/{DROPIN}" in failed["restored"]
    assert tree_snapshot(fake_root / "etc/ssh") == before  # the drop-in gone again, sshd_config untouched
    agent.wait_ready()
    status = agent.status()["ssh"]
    assert status["status"] == "error" and "internal error: InjectedFault" in status["why"]
    # the bug fired once; the next converge heals
    assert agent.ctl("converge", "ssh").returncode == 0
    wait_for(lambda: (fake_root / DROPIN).exists(), what="the drop-in")
    assert effective_sshd(fake_root)["permitrootlogin"] == ["no"]


def test_fault_injection_is_refused_on_the_real_root() -> None:
    with pytest.raises(faults.FaultSpecError, match="fake root"):
        faults.from_environment(False, {faults.ENV: "ssh:after-write"})
    assert faults.from_environment(False, {}).fault is None


# --- the fault matrix: SIGKILL at every step of every guard's heal, then a restart -----------------------

SSH_STEPS = ["after-backup", "after-write#1", "after-write#2", "after-validate", "during-reload", "during-commit"]
FIREWALL_STEPS = [
    "after-backup",
    "after-command#1",
    "after-command#2",
    "after-validate",
    "during-reload",
    "during-commit",
]
FAIL2BAN_STEPS = ["after-backup", "after-write#1", "after-write#2", "after-validate", "during-reload", "during-commit"]
MATRIX = (
    [("ssh", s) for s in SSH_STEPS]
    + [("firewall", s) for s in FIREWALL_STEPS]
    + [("fail2ban", s) for s in FAIL2BAN_STEPS]
)
ADMIN_FILE = {"ssh": "etc/ssh/sshd_config", "fail2ban": "etc/fail2ban/jail.d/zzz-other.local"}
JAIL = "etc/fail2ban/jail.d/zzz-other.local"
CHAIN = "vps-agent-input"


@contextmanager
def network_namespace() -> Iterator[int]:
    """A network namespace that outlives the daemons run in it (a crashed one and its successor): the pid
    of a process holding it. This machine's own ruleset is never touched."""
    holder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"])
    try:
        wait_for(lambda: os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink("/proc/self/ns/net"), what="netns")
        yield holder.pid
    finally:
        holder.kill()
        holder.wait(5)


def tamper(root: Path, guard: str) -> None:
    """The drift each heal fixes; for the two file guards, in a file that is the admin's own."""
    if guard == "ssh":
        main = root / ADMIN_FILE["ssh"]
        main.write_text(main.read_text().replace("#PermitRootLogin prohibit-password", "PermitRootLogin yes"))
    elif guard == "fail2ban":
        (root / JAIL).write_text("[sshd]\nport = 99\nmaxretry = 10\nfindtime = 10m\n")


def firewall_baseline(netns: int) -> bool:
    for tool in ("iptables", "ip6tables"):
        rules = in_netns_of(netns, tool, "-S").stdout.splitlines()
        if "-P INPUT DROP" not in rules or f"-A INPUT -j {CHAIN}" not in rules:
            return False
        if not any(r.startswith(f"-A {CHAIN} ") and "--dport 2222" in r for r in rules):
            return False
    return True


def fail2ban_jail(root: Path) -> dict[str, str] | None:
    result = subprocess.run(
        ["fail2ban-client", "-c", str(root / "etc/fail2ban"), "-d"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, f"fail2ban-client -d refuses the configuration: {result.stderr}"
    return parse_dump(result.stdout)


def assert_nothing_torn(root: Path, *, swept: bool = True) -> None:
    """sshd -t (through -T) and fail2ban-client accept what is on disk, every backup set reads whole
    (manifest and copies, each copy's SHA-256 as the manifest says), and once a daemon has started
    (swept) no temporary file of a write the kill cut short is left."""
    leftovers = [p for p in root.rglob("*") if fs.TMP_MARKER in p.name]
    assert not swept or not leftovers, leftovers
    effective_sshd(root)
    fail2ban_jail(root)
    store = root / "var/lib/vps-agent/backups"
    for control in (p for p in store.iterdir() if p.is_dir()):
        for directory in (p for p in control.iterdir() if p.is_dir()):
            if (directory / backups.MANIFEST).exists():
                backups.load_set(directory, lambda path: root / path.lstrip("/"))


def states(root: Path, control: str) -> dict[str, str]:
    base = root / "var/lib/vps-agent/backups" / control
    found = {}
    for directory in sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []:
        manifest = directory / backups.MANIFEST
        # no intent record: cut short before it was written, so before any change
        state = json.loads(manifest.read_text())["state"] if manifest.exists() else "no-intent"
        found[directory.name.rsplit("-", 1)[-1]] = state
    return found


def admin_lines(text: str, guard: str) -> list[str]:
    """The admin's own lines: all but those the tamper put in (the heal comments those out, with a marker)."""
    tampered = {"ssh": {"PermitRootLogin yes"}, "fail2ban": {"port = 99", "maxretry = 10"}}[guard]
    return [line for line in text.splitlines() if line not in tampered and not line.startswith("# [vps-agent ")]


@pytest.mark.parametrize(("guard", "step"), MATRIX, ids=[f"{g}-{s}" for g, s in MATRIX])
def test_sigkill_at_a_step_of_a_heal_then_a_restart(
    tmp_path: Path, start_agent: Callable[..., Agent], guard: str, step: str
) -> None:
    require_root_and_tools("iptables", "ip6tables", "fail2ban-client")
    root = make_root(tmp_path / "root")
    tamper(root, guard)
    admin_before = (root / ADMIN_FILE[guard]).read_text() if guard in ADMIN_FILE else ""
    with sshd_in_namespaces(root) as sshd, network_namespace() as netns:
        wrap = ("nsenter", "-t", str(netns), "-n", "--")
        crashed = Agent(root, env={faults.ENV: f"{guard}:{step}"}, wrap=wrap)
        try:
            code = crashed.process.wait(30)
        except subprocess.TimeoutExpired:
            crashed.process.kill()
            raise AssertionError(f"the fault {guard}:{step} never fired:\n{crashed.output()}") from None
        assert code == -signal.SIGKILL, crashed.output()
        assert_nothing_torn(root, swept=False)
        assert sshd.poll() is None, "sshd was left stopped"
        left = states(root, guard)
        pending = [txid for txid, state in left.items() if state == backups.PENDING]
        assert len(pending) == (0 if step == "during-commit" else 1), left
        # the other guards' start-up heals ran at the same time: the kill may have cut theirs short too
        every_pending = sorted(
            (name, txid)
            for name in ("ssh", "firewall", "fail2ban", "accounts")
            for txid, state in states(root, name).items()
            if state in (backups.PENDING, "no-intent")
        )

        mark = len(crashed.events())
        agent = start_agent(root, wrap=wrap)  # its start-up reconcile is the one reconcile allowed
        recovered = [e for e in agent.events()[mark:] if e["event"]["action"] == "transaction-recovered"]
        assert sorted((e["control"], e["transaction"]["id"]) for e in recovered) == every_pending
        assert all(e["event"]["outcome"] == "success" for e in recovered), recovered
        for name in ("ssh", "firewall", "fail2ban", "accounts"):
            assert not {backups.PENDING, "no-intent"} & set(states(root, name).values())
        assert_nothing_torn(root)
        effective = effective_sshd(root)
        assert (effective["permitrootlogin"], effective["port"]) == (["no"], ["2222"])
        wait_for(lambda: firewall_baseline(netns), 10, "the firewall baseline")
        jail = fail2ban_jail(root)
        assert jail is not None and (jail["port"], jail["maxretry"]) == ("2222", "5"), jail
        if guard in ADMIN_FILE:
            after = (root / ADMIN_FILE[guard]).read_text()
            assert admin_lines(after, guard) == admin_lines(admin_before, guard)
        assert sshd.poll() is None, "sshd was left stopped"
        status = agent.status()
        assert all(status[name]["status"] in ("healed", "compliant") for name in ("ssh", "firewall", "fail2ban")), (
            status
        )


# --- resource faults: a full state filesystem, a read-only /etc --------------------------------------------


def in_mount_namespace(script: str, *paths: Path) -> tuple[str, ...]:
    """A wrap for the daemon: unshare its own mount (and network) namespace, run script there (its $1, $2...
    are paths), then exec the daemon keeping the pid. Mounts made here never reach this machine's."""
    body = f'mount --make-rprivate / && {script} && shift {len(paths)} && exec "$@"'
    return ("unshare", "--mount", "--net", "--", "sh", "-c", body, "sh", *map(str, paths))


def test_a_full_state_filesystem_changes_nothing_names_the_disk_and_heals_once_there_is_room(
    fake_root: Path, tmp_path: Path, start_agent: Callable[..., Agent]
) -> None:
    state, stash = fake_root / "var/lib/vps-agent", tmp_path / "stash"
    wrap = in_mount_namespace(
        'cp -a "$1/." "$2/" && mount -t tmpfs -o size=512k,mode=0755 tmpfs "$1" && cp -a "$2/." "$1/"', state, stash
    )
    stash.mkdir()
    agent = start_agent(fake_root, wrap=wrap)
    pid = agent.process.pid
    filler = state / "filler"
    subprocess.run(["nsenter", "-t", str(pid), "-m", "sh", "-c", f"cat /dev/zero > {filler}"], capture_output=True)
    mark = agent.mark()
    dropin = fake_root / DROPIN
    dropin.unlink()
    failed = agent.wait_event("remediation-failed", mark)
    assert "cannot back up, so nothing changed" in failed["message"] and "No space left on device" in failed["message"]
    assert f"the filesystem mounted at {state} is full" in failed["message"]
    assert not dropin.exists()  # nothing applied without its backup
    assert agent.status()["ssh"]["status"] == "failed"
    subprocess.run(["nsenter", "-t", str(pid), "-m", "rm", str(filler)], check=True)
    agent.wait_event("drift-reverted", mark, timeout=15)  # by itself, once there is room
    assert dropin.exists() and effective_sshd(fake_root)["permitrootlogin"] == ["no"]
    assert not [e for e in agent.events()[mark:] if e["event"]["action"] == "flapping"]


def test_a_read_only_etc_is_a_clear_error_and_nothing_is_half_written(
    fake_root: Path, start_agent: Callable[..., Agent]
) -> None:
    etc = fake_root / "etc"
    before = tree_snapshot(etc / "ssh")
    wrap = in_mount_namespace('mount --bind "$1" "$1" && mount -o remount,bind,ro "$1"', etc)
    agent = start_agent(fake_root, ready=False, wrap=wrap)
    failed = agent.wait_event("remediation-failed", timeout=20)
    assert "Read-only file system" in failed["message"] and f"mounted at {etc} is read-only" in failed["message"]
    assert failed["restored"] == []
    assert tree_snapshot(etc / "ssh") == before
    leftovers = [p for p in etc.rglob("*") if fs.TMP_MARKER in p.name]
    assert not leftovers

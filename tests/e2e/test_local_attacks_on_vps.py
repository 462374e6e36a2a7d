"""Local users against the installed .deb on a booted Debian 12 VPS: nobody on the box can turn the agent
against its admin (issue 15). The created admin races the key install with a symlinked ~/.ssh, a shell
user floods the events by toggling a mode, prometheus swaps the textfile directory for a symlink, and
nobody names a process sshd; the agent changes nothing it should not, and says so, boundedly."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.sandbox import RESTART_TIMEOUT, Sandbox
from tests.e2e.test_accounts_on_vps import CONFIG as ACCOUNTS_CONFIG
from tests.e2e.test_accounts_on_vps import accounts_status
from tests.e2e.test_agent_on_vps import agent_vps, events, prove_key_login, status_code, wait_for

# the accounts config of test_accounts_on_vps, and flap damping off: the racing admin gets every heal it asks for
CONFIG = ACCOUNTS_CONFIG + "engine:\n  flap_max_heals: 1000000\n"
VICTIM = "/var/lib/victim"  # root's, with a marker: what the admin tries to own through ~/.ssh
RACE_ROUNDS = 300
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
METRICS_VICTIM = "/etc/ssh/sshd_config.d"  # writable by the agent's unit: where prometheus points it
FLOOD_SECONDS = 10
FAKE_SSHD_PORT = 4444

# The admin's race, run as deploy: remove the configured key (the agent re-installs it), and the moment
# the agent starts (inotify on ~/.ssh: install -d touches it, install creates authorized_keys) swap
# ~/.ssh for a symlink to the victim for a moment, then back. Prints one JSON line of counts.
RACE = r"""
import ctypes, json, os, random, select, struct, sys, time

home, victim, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
ssh, aside = home + "/.ssh", home + "/.ssh.real"
keys = ssh + "/authorized_keys"
libc = ctypes.CDLL("libc.so.6", use_errno=True)
IN_ATTRIB, IN_CREATE, IN_MOVED_TO, IN_CLOSE_WRITE = 0x4, 0x100, 0x80, 0x8
seen = swapped = 0
for n in range(rounds):
    if os.path.islink(ssh):
        os.unlink(ssh)
    if os.path.isdir(aside) and not os.path.exists(ssh):
        os.rename(aside, ssh)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    libc.inotify_add_watch(fd, ssh.encode(), IN_ATTRIB | IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE)
    try:
        os.unlink(keys)
    except FileNotFoundError:
        pass
    # odd rounds swap at the first sign of the agent (before it writes the file), even ones once it is written
    wanted = IN_ATTRIB | IN_CREATE | IN_MOVED_TO if n % 2 else IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE
    deadline = time.monotonic() + 3
    hit = False
    while not hit and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            break
        data = os.read(fd, 65536)
        at = 0
        while at < len(data):
            wd, mask, cookie, size = struct.unpack_from("iIII", data, at)
            at += 16 + size
            hit = hit or bool(mask & wanted)
    os.close(fd)
    if not hit:
        continue
    seen += 1
    try:
        os.rename(ssh, aside)
        os.symlink(victim, ssh)
        swapped += 1
    except OSError:
        continue
    time.sleep(random.uniform(0.0, 0.3))
print(json.dumps({"rounds": rounds, "agent_seen": seen, "swapped": swapped}))
if os.path.islink(ssh):
    os.unlink(ssh)
if os.path.isdir(aside) and not os.path.exists(ssh):
    os.rename(aside, ssh)
"""

FAKE_SSHD = f"""
import ctypes, socket, time
ctypes.CDLL("libc.so.6").prctl(15, b"sshd", 0, 0, 0)  # PR_SET_NAME: /proc/PID/comm now says sshd
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("0.0.0.0", {FAKE_SSHD_PORT}))
listener.listen()
time.sleep(600)
"""


def as_user(user: str, *argv: str) -> list[str]:
    """argv run as user (its uid and primary group, no others), as a local attacker runs it."""
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--", *argv]


def tree(vps: Sandbox, path: str) -> str:
    """Owner, group, mode and contents of path and what is in it (find -printf, then the files' bytes)."""
    listing = vps.exec(["find", path, "-printf", "%p %U:%G %m %y\n"], check=False).stdout
    contents = vps.exec(["sh", "-c", f"find {path} -type f -print0 | sort -z | xargs -0r sha256sum"]).stdout
    return listing + contents


def accounts_events_since(vps: Sandbox, mark: int) -> list[dict[str, Any]]:
    return [e for e in events(vps)[mark:] if e.get("control") == "accounts"]


def admin_proven(vps: Sandbox) -> None:
    """The admin's key login, and `vps-agentctl confirm` after it where this build's sshd journal door does
    not see it (agent/system/journal.py is a placeholder until the issue14-journal branch lands)."""
    try:
        prove_key_login(vps)
    except AssertionError:
        vps.exec(["vps-agentctl", "confirm"])
        wait_for("passwords off after confirm", lambda: status_code(vps) == 0)


@pytest.fixture(scope="module")
def vps(tmp_path_factory: pytest.TempPathFactory, release: str) -> Iterator[Sandbox]:
    """A VPS of its own: the .deb, the accounts config (the agent creates deploy with the client's key)."""
    with agent_vps(tmp_path_factory, "vps-local-attacks", release=release) as sandbox:
        sandbox.ssh("true")  # the sandbox's admin logs in once: the SSH guard's proof
        key = (sandbox.client_dir / "id_ed25519.pub").read_text().strip()
        sandbox.exec(["sh", "-c", "cat > /etc/vps-agent/config.yaml"], input=CONFIG.format(key=key))
        sandbox.exec(["systemctl", "reload", "vps-agent"])
        admin_proven(sandbox)
        wait_for(
            "the agent to create deploy with its key",
            lambda: (
                accounts_status(sandbox)["status"] in ("healed", "compliant")
                and sandbox.exec(["test", "-s", "/home/deploy/.ssh/authorized_keys"], check=False).returncode == 0
            ),
        )
        yield sandbox


def test_the_admin_racing_the_key_install_with_a_symlinked_ssh_dir_owns_nothing_new(
    vps: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    vps.exec(["install", "-d", "-o", "root", "-g", "root", "-m", "0755", VICTIM])
    vps.exec(["sh", "-c", f"echo 'root owns this' > {VICTIM}/marker && chmod 0644 {VICTIM}/marker"])
    before = tree(vps, VICTIM)
    etc = vps.exec(["stat", "-c", "%U:%G %a", "/etc"]).stdout
    race = vps.exec(
        as_user("deploy", "python3", "-c", RACE, "/home/deploy", VICTIM, str(RACE_ROUNDS)),
        timeout=RACE_ROUNDS * 5 + 60,
    )
    counts = json.loads(race.stdout.strip().splitlines()[-1])
    with capsys.disabled():
        print(f"\n[e2e] the admin's ~/.ssh race: {counts}")
    assert counts["agent_seen"] >= RACE_ROUNDS // 2, counts  # the agent answered: the race was run
    assert counts["swapped"] >= RACE_ROUNDS // 2, counts
    assert tree(vps, VICTIM) == before  # still root's, its mode and its marker as they were, nothing added
    assert vps.exec(["stat", "-c", "%U:%G %a", "/etc"]).stdout == etc
    # and the admin's own keys are back, its own
    wait_for(
        "deploy's key to be back",
        lambda: (
            vps.exec(["test", "-s", "/home/deploy/.ssh/authorized_keys"], check=False).returncode == 0
            and accounts_status(vps)["status"] in ("healed", "compliant")
        ),
    )
    modes = vps.exec(["stat", "-c", "%a %U %G", "/home/deploy/.ssh", "/home/deploy/.ssh/authorized_keys"]).stdout
    assert modes.split("\n")[:2] == ["700 deploy deploy", "600 deploy deploy"], modes
    assert vps.ssh("id -un", user="deploy").stdout.strip() == "deploy"


def test_a_symlinked_ssh_dir_is_a_finding_naming_it_and_nothing_is_written_through_it(vps: Sandbox) -> None:
    before = tree(vps, VICTIM)
    home = "/home/deploy"
    vps.exec(as_user("deploy", "sh", "-c", f"mv {home}/.ssh {home}/.ssh.real && ln -s {VICTIM} {home}/.ssh"))
    try:
        wait_for(
            "a finding naming the symlink",
            lambda: any(f"{home}/.ssh" in d and "symlink" in d for d in accounts_status(vps)["drift"]),
        )
        assert tree(vps, VICTIM) == before
    finally:
        vps.exec(as_user("deploy", "sh", "-c", f"rm {home}/.ssh && mv {home}/.ssh.real {home}/.ssh"))
    wait_for("the finding to clear", lambda: accounts_status(vps)["status"] in ("healed", "compliant"))


def test_a_shell_user_toggling_a_mode_makes_a_bounded_number_of_events(
    vps: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    vps.exec(["useradd", "--create-home", "--shell", "/bin/bash", "alice"])
    key = (vps.client_dir / "id_ed25519.pub").read_text().strip()
    keys = "~alice/.ssh/authorized_keys"
    setup = f"mkdir -m 700 ~alice/.ssh && echo '{key}' > {keys} && chmod 600 {keys}"
    vps.exec(as_user("alice", "sh", "-c", setup))
    wait_for("the accounts guard to be compliant", lambda: accounts_status(vps)["status"] in ("healed", "compliant"))
    mark = len(events(vps))
    toggle = (
        f"end=$(($(date +%s) + {FLOOD_SECONDS})); n=0; while [ $(date +%s) -lt $end ]; do "
        "chmod 666 ~alice/.ssh/authorized_keys; sleep 0.02; chmod 600 ~alice/.ssh/authorized_keys; sleep 0.02; "
        "n=$((n+1)); done; echo $n"
    )
    toggles = int(vps.exec(as_user("alice", "sh", "-c", toggle), timeout=FLOOD_SECONDS + 30).stdout.strip())
    time.sleep(2)  # the last converges
    during = accounts_events_since(vps, mark)
    with capsys.disabled():
        print(f"\n[e2e] {toggles} chmod toggles in {FLOOD_SECONDS}s: {len(during)} events")
    assert toggles > 50, toggles
    # the first appearance and its clearing at once; the rest folded into one summary 5 minutes on
    # (agent/engine/findings.py), which this test does not wait for
    assert len(during) <= 3, [e["message"] for e in during]
    assert [e["event"]["action"] for e in during][:2] == ["drift-detected", "findings-cleared"], during
    assert accounts_status(vps)["status"] in ("healed", "compliant")  # settled at 600: status is exact

    # left world-writable: status says so, at once, though the event about it was folded
    vps.exec(as_user("alice", "chmod", "666", "/home/alice/.ssh/authorized_keys"))
    wait_for(
        "status to show the writable authorized_keys",
        lambda: any("/home/alice/.ssh/authorized_keys" in d for d in accounts_status(vps)["drift"]),
    )
    vps.exec(["userdel", "-r", "alice"], check=False)


def test_prometheus_swapping_the_textfile_directory_for_a_symlink_gets_nothing_written_there(
    vps: Sandbox,
) -> None:
    # Debian's prometheus-node-exporter: user prometheus owns /var/lib/prometheus, node-exporter/ is root's
    if vps.exec(["getent", "passwd", "prometheus"], check=False).returncode != 0:
        vps.exec(["useradd", "--system", "--user-group", "--home-dir", "/var/lib/prometheus", "--no-create-home",
                  "--shell", "/usr/sbin/nologin", "prometheus"])  # fmt: skip
    vps.exec(["install", "-d", "-o", "root", "-g", "root", "-m", "0755", TEXTFILE_DIR])
    vps.exec(["chown", "prometheus:prometheus", "/var/lib/prometheus"])
    # ReadWritePaths=-/var/lib/prometheus/node-exporter now exists
    vps.exec(["systemctl", "restart", "vps-agent"], timeout=RESTART_TIMEOUT)
    metrics = f"{TEXTFILE_DIR}/vps_agent.prom"
    wait_for("the metrics", lambda: vps.exec(["test", "-s", metrics], check=False).returncode == 0)
    before = vps.exec(["ls", "-a", METRICS_VICTIM]).stdout
    mark = len(events(vps))

    vps.exec(as_user("prometheus", "sh", "-c",
                     f"mv {TEXTFILE_DIR} {TEXTFILE_DIR}.old && ln -s {METRICS_VICTIM} {TEXTFILE_DIR}"))  # fmt: skip
    try:
        # the next restart (an upgrade, a reboot) makes the unit's ReadWritePaths= follow the link too
        vps.exec(["systemctl", "restart", "vps-agent"], timeout=RESTART_TIMEOUT)
        vps.exec(["vps-agentctl", "converge"], check=False)

        def refused() -> list[dict[str, Any]]:
            return [
                e
                for e in events(vps)[mark:]
                if e["event"]["action"] == "output-failed" and e.get("output") == "prometheus_textfile"
            ]

        wait_for("output-failed naming the symlink", lambda: bool(refused()))
        message = str(refused()[-1]["message"])
        assert TEXTFILE_DIR in message and "symlink" in message, message
        time.sleep(3)  # the writer's refresh and a converge or two
        assert vps.exec(["ls", "-a", METRICS_VICTIM]).stdout == before
        assert vps.exec(["systemctl", "is-active", "vps-agent"]).stdout.strip() == "active"
        assert vps.exec(["vps-agentctl", "status"], check=False).returncode in (0, 1)  # it goes on guarding
    finally:
        vps.exec(["sh", "-c", f"rm -f {TEXTFILE_DIR} && mv {TEXTFILE_DIR}.old {TEXTFILE_DIR}"], check=False)
        vps.exec(["rm", "-f", f"{METRICS_VICTIM}/vps_agent.prom"], check=False)
        vps.exec(["systemctl", "restart", "vps-agent"], timeout=RESTART_TIMEOUT)


def test_a_process_of_nobody_named_sshd_gets_no_port_opened(vps: Sandbox) -> None:
    unit = "e2e-fake-sshd"
    vps.exec(["systemd-run", f"--unit={unit}", "--uid=nobody", "--gid=nogroup", "python3", "-c", FAKE_SSHD])
    try:
        connect = f"import socket; socket.create_connection(('127.0.0.1', {FAKE_SSHD_PORT}), 2)"
        wait_for("the fake sshd to listen", lambda: vps.exec(["python3", "-c", connect], check=False).returncode == 0)
        vps.exec(["vps-agentctl", "converge", "firewall"], check=False)
        rules = vps.exec(["iptables-save"]).stdout + vps.exec(["ip6tables-save"]).stdout
        assert str(FAKE_SSHD_PORT) not in rules, rules
        # nor in what `check` (as root in a shell, with every capability) would make the firewall
        check = vps.exec(["vps-agentctl", "check", "--json"], check=False).stdout
        assert f"{FAKE_SSHD_PORT}" not in check, check
    finally:
        vps.exec(["systemctl", "stop", unit], check=False)

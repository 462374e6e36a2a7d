"""The .deb on a booted Debian 12 VPS, the way a user meets it: installed, configured, attacked, killed,
power-cycled, upgraded and purged. systemd is PID 1 inside; the admin logs in with a real ssh."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.sinks import catalog
from tests.conftest import require_root_and_tools
from tests.debs import BUILD_TOOLS, built_deb
from tests.e2e.sandbox import CLIENT_ADDR, RESTART_TIMEOUT, VPS_ADDR, Sandbox

TOOLS = ("debootstrap", "unshare", "nsenter", "ip", "ssh", *BUILD_TOOLS)
PREVIOUS_VERSION = "0.0.9"
USER_CONFIG = """# written by the admin after install
ssh:
  port: 2222
  permit_root_login: "no"
  password_authentication: false
"""
FIREWALL_CHAIN = "vps-agent-input"
ENFORCING_CONFIG = Path(__file__).resolve().parents[2] / "config.example.yaml"  # firewall.mode: enforce
BLOCKED_PORT = 8080  # not in the config: the default-deny INPUT drops it until firewall.allow_tcp names it


def wait_for(
    what: str, check: Callable[[], bool], timeout: float = 30.0, explain: Callable[[], str] | None = None
) -> None:
    """Poll `check` until it holds; on a timeout the error carries what `explain` says about the state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    seen = f"\n{explain()}" if explain is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{seen}")


def sshd_effective(vps: Sandbox) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in vps.exec(["sshd", "-T"]).stdout.splitlines():
        key, _, value = line.partition(" ")
        values.setdefault(key, []).append(value)
    return values


def hardened(vps: Sandbox, port: str = "2222") -> bool:
    effective = sshd_effective(vps)
    return (
        effective["port"] == [port]
        and effective["permitrootlogin"] == ["no"]
        and effective["passwordauthentication"] == ["no"]
    )


def main_pid(vps: Sandbox) -> int:
    return int(vps.exec(["systemctl", "show", "-p", "MainPID", "--value", "vps-agent"]).stdout.strip())


def agent_active(vps: Sandbox) -> bool:
    return vps.exec(["systemctl", "is-active", "vps-agent"], check=False).stdout.strip() == "active"


def status_code(vps: Sandbox) -> int:
    return vps.exec(["vps-agentctl", "status"], check=False).returncode


def status_text(vps: Sandbox) -> str:
    """What `vps-agentctl status` shows now and the last events: a timed-out wait's explanation."""
    status = vps.exec(["vps-agentctl", "status"], check=False).stdout
    tail = vps.exec(["vps-agentctl", "events", "-n", "15"], check=False).stdout
    return f"status:\n{status}\nlast events:\n{tail}"


def events(vps: Sandbox) -> list[dict[str, Any]]:
    text = vps.exec(["cat", "/var/log/vps-agent/events.jsonl"], check=False).stdout
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def firewall_in_place(vps: Sandbox) -> bool:
    """INPUT's policy is DROP and INPUT jumps to the agent's chain, for IPv4 and IPv6 alike."""
    for tool in ("iptables", "ip6tables"):
        rules = vps.exec([tool, "-S", "INPUT"]).stdout.splitlines()
        if "-P INPUT DROP" not in rules or f"-A INPUT -j {FIREWALL_CHAIN}" not in rules:
            return False
    return True


def firewall_status(vps: Sandbox) -> dict[str, Any]:
    controls = json.loads(vps.exec(["vps-agentctl", "status", "--json"], check=False).stdout)["controls"]
    firewall: dict[str, Any] = next(c for c in controls if c["control"] == "firewall")
    return firewall


def client_connects(vps: Sandbox, port: int) -> bool:
    """A TCP connect from the client namespace to the VPS (a dropped SYN times out after 2 s)."""
    code = f"import socket; socket.create_connection(({VPS_ADDR!r}, {port}), timeout=2).close()"
    return vps.client(["/usr/bin/python3", "-c", code], check=False, timeout=30).returncode == 0


def firewall_heals(vps: Sandbox) -> int:
    return sum(e["event"]["action"] == "drift-reverted" and e.get("control") == "firewall" for e in events(vps))


def configure(vps: Sandbox) -> None:
    """The admin's config (SSH on 2222), applied the way an admin meets it: the agent opens 2222 beside
    22, the admin's first login on 2222 proves it, then 22 closes."""
    vps.exec(["sh", "-c", "cat > /etc/vps-agent/config.yaml"], input=USER_CONFIG)
    vps.exec(["systemctl", "reload", "vps-agent"])
    if not hardened(vps):
        wait_for("sshd on 2222 beside 22", lambda: "2222" in sshd_effective(vps)["port"])
        wait_for("the admin's login on 2222", lambda: admin_gets_in(vps), 30)
    wait_for("the agent to apply the admin's config", lambda: hardened(vps) and status_code(vps) == 0)


def prove_key_login(vps: Sandbox, port: int = 22) -> None:
    """The admin's first key login, as a user makes it after install: sshd's journal proves the key, and
    the SSH guard turns password logins off (until then it is pending, exit 1)."""
    assert vps.ssh("id -un", port=port).stdout.strip() == "admin"
    wait_for(
        "passwords off after the admin's key login",
        lambda: sshd_effective(vps)["passwordauthentication"] == ["no"] and status_code(vps) == 0,
        30,
    )


@contextmanager
def agent_vps(
    factory: pytest.TempPathFactory,
    name: str,
    admin: str = "key",
    release: str = "bookworm",
    config: Path | None = ENFORCING_CONFIG,
) -> Iterator[Sandbox]:
    """A fresh Debian VPS of `release`, the .deb installed before first boot, booted, the agent active;
    destroyed when the block ends. admin: the sandbox's admin (Sandbox.create). config: placed before the
    install; the default, the example (every guard enforcing, the firewall too), is what these tests
    start from; None: a first install's own (its firewall in report mode: test_first_install_on_vps.py)."""
    require_root_and_tools(*TOOLS)
    sandbox = Sandbox(factory.mktemp(f"{name}-{release}") / "root", release)
    sandbox.create(debs=[built_deb()], admin=admin, config=config)
    try:
        sandbox.boot()
        wait_for("vps-agent.service to be active", lambda: agent_active(sandbox), 60)
        yield sandbox
    finally:
        sandbox.destroy()


@pytest.fixture(scope="module")
def vps(tmp_path_factory: pytest.TempPathFactory, release: str) -> Iterator[Sandbox]:
    """One VPS for the module, with the admin's config applied."""
    with agent_vps(tmp_path_factory, "vps", release=release) as sandbox:
        configure(sandbox)
        yield sandbox


def test_installed_agent_is_active_compliant_and_the_admin_still_gets_in(vps: Sandbox) -> None:
    assert agent_active(vps)
    assert vps.exec(["systemctl", "is-enabled", "vps-agent"]).stdout.strip() == "enabled"
    status = vps.exec(["vps-agentctl", "status"])
    assert "ssh" in status.stdout and ("compliant" in status.stdout or "healed" in status.stdout)
    assert hardened(vps)
    assert vps.ssh("id -un", port=2222).stdout.strip() == "admin"
    root_login = vps.ssh("id -un", user="root", port=2222, check=False)
    assert root_login.returncode != 0
    old_port = vps.ssh("true", port=22, check=False, timeout=30)
    assert old_port.returncode != 0


def test_unit_verifies_clean_and_reports_its_exposure(vps: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    # --man=no: a minimal VPS has no man-db to resolve the Documentation= pages with
    unit = "/usr/lib/systemd/system/vps-agent.service"
    verify = vps.exec(["systemd-analyze", "verify", "--man=no", unit], check=False)
    assert verify.returncode == 0 and verify.stdout.strip() == "" and verify.stderr.strip() == "", verify.stderr
    security = vps.exec(["systemd-analyze", "security", "--no-pager", "vps-agent.service"]).stdout
    overall = [line for line in security.splitlines() if "Overall exposure level" in line]
    assert overall, security
    exposure = float(overall[0].split(":")[1].split()[0])
    with capsys.disabled():  # shown in every run, pass or fail
        print(f"\n[e2e] systemd-analyze security vps-agent.service: exposure {exposure} (0 best, 10 worst)")
    assert exposure <= 4.0  # "OK" or better: the agent is root but fenced in


def sshd_drifts(planted: str) -> list[list[str]]:
    """The sshd drifts every e2e module makes: a line above the Include, a planted drop-in (`planted`: its
    first line, Port 22 after it), the agent's own drop-in removed, the Include removed."""
    return [
        ["sed", "-i", "1i PermitRootLogin yes", "/etc/ssh/sshd_config"],
        ["sh", "-c", f"printf '{planted}\\nPort 22\\n' > /etc/ssh/sshd_config.d/00-evil.conf"],
        ["rm", "-f", "/etc/ssh/sshd_config.d/00-vps-agent.conf"],
        ["sed", "-i", "/^Include /d", "/etc/ssh/sshd_config"],
    ]


def heal_each(vps: Sandbox, drifts: list[list[str]], settled: Callable[[], bool]) -> None:
    """Make each drift in turn; each must get a `drift-reverted` and leave sshd `settled` within 20 s."""
    for drift in drifts:
        healed_before = sum(e["event"]["action"] == "drift-reverted" for e in events(vps))
        vps.exec(drift)

        def healed(before: int = healed_before) -> bool:
            return sum(e["event"]["action"] == "drift-reverted" for e in events(vps)) > before and settled()

        wait_for(
            f"the heal of {' '.join(drift)}",
            healed,
            20,
            explain=lambda: status_text(vps),
        )


def test_ssh_drifts_inside_the_vps_are_healed_by_the_installed_service(vps: Sandbox) -> None:
    heal_each(vps, sshd_drifts("PasswordAuthentication yes"), lambda: hardened(vps))
    assert vps.ssh("id -un", port=2222).stdout.strip() == "admin"


def journal(vps: Sandbox, *matches: str) -> list[dict[str, Any]]:
    out = vps.exec(["journalctl", "-o", "json", "--no-pager", "SYSLOG_IDENTIFIER=vps-agent", *matches]).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_the_journal_has_the_events_as_native_fields_with_message_ids(vps: Sandbox) -> None:
    reverted = [e for e in events(vps) if e["event"]["action"] == "drift-reverted"][-1]
    transaction = reverted["transaction"]["id"]
    heal_id = catalog.CATALOG["drift-reverted"].message_id

    def heal_in_the_journal() -> list[dict[str, Any]]:
        return [j for j in journal(vps, f"MESSAGE_ID={heal_id}") if j.get("TRANSACTION_ID") == transaction]

    wait_for("the heal in the journal", lambda: bool(heal_in_the_journal()), 20)
    [entry] = heal_in_the_journal()
    assert entry["MESSAGE"] == reverted["message"] and entry["PRIORITY"] == "6"
    assert entry["EVENT_ACTION"] == "drift-reverted" and entry["EVENT_OUTCOME"] == "success"
    assert entry["CONTROL"] == reverted["control"] and entry["FILE_PATH"] == reverted["file"]["path"]
    assert entry["HOST_NAME"] == "vps" and json.loads(str(entry["EVENT_CATEGORY"])) == ["configuration"]
    assert entry["_SYSTEMD_UNIT"] == "vps-agent.service"
    # every event has its type's MESSAGE_ID, and no event is JSON text any more
    entries = journal(vps)
    described = [e for e in entries if "EVENT_ACTION" in e]
    assert {"agent-started", "drift-detected", "drift-reverted"} <= {str(e["EVENT_ACTION"]) for e in described}
    assert all(e["MESSAGE_ID"] == catalog.lookup(str(e["EVENT_ACTION"])).message_id for e in described)
    assert not [e for e in entries if str(e.get("MESSAGE", "")).startswith('{"@timestamp"')]
    started = journal(vps, f"MESSAGE_ID={catalog.CATALOG['agent-started'].message_id}")
    assert started and all(e["EVENT_ACTION"] == "agent-started" for e in started)
    outputs = json.loads(vps.exec(["vps-agentctl", "status", "--json"], check=False).stdout)["outputs"]
    assert outputs["journald"] == "native" and not outputs["journald_note"], outputs
    # all is well with the journal: `status` has no line about it (only a failing output gets one)
    shown = vps.exec(["vps-agentctl", "status"], check=False).stdout.splitlines()
    assert not [line for line in shown if line.startswith("journal:")], shown


def test_kill_9_is_restarted_by_systemd(vps: Sandbox) -> None:
    before = main_pid(vps)
    vps.exec(["kill", "-9", str(before)])
    wait_for("a new agent process", lambda: agent_active(vps) and main_pid(vps) not in (0, before), 30)
    wait_for("status to answer again", lambda: status_code(vps) == 0, 30)


# The firewall tests run right after the kill -9 test: a fresh agent process, so their heals (two config
# reloads, two flushes) stay under engine.flap_max_heals (5 a minute) with the SSH drifts' heals behind.


def test_the_firewall_is_in_place_after_install_and_ssh_still_gets_through(vps: Sandbox) -> None:
    wait_for("the firewall baseline", lambda: firewall_in_place(vps), 30)
    for tool in ("iptables", "ip6tables"):
        chain = vps.exec([tool, "-S", FIREWALL_CHAIN]).stdout
        assert "--dport 2222 -j ACCEPT" in chain, chain
    status = vps.exec(["vps-agentctl", "status"], check=False).stdout
    assert any(line.startswith("firewall") for line in status.splitlines()), status
    firewall = firewall_status(vps)
    assert firewall["status"] in ("compliant", "healed"), firewall
    facts = firewall["facts"]
    assert isinstance(facts, dict)
    assert facts["backend"] == "iptables-nft" and facts["ipv4_policy"] == facts["ipv6_policy"] == "DROP"
    assert "2222" in str(facts["ssh_ports_accepted"])
    # the admin's SSH on the configured port goes through the firewall from the client namespace
    assert vps.ssh("id -un", port=2222).stdout.strip() == "admin"


def test_a_port_not_allowed_is_dropped_until_the_config_allows_it(vps: Sandbox) -> None:
    unit = "e2e-http-8080"
    vps.exec(["systemd-run", f"--unit={unit}", "python3", "-m", "http.server", str(BLOCKED_PORT), "--bind", "0.0.0.0"])
    try:
        listening = f"import socket; socket.create_connection(('127.0.0.1', {BLOCKED_PORT}), timeout=2).close()"
        inside = ["python3", "-c", listening]
        wait_for("the listener inside the VPS", lambda: vps.exec(inside, check=False).returncode == 0)
        assert not client_connects(vps, BLOCKED_PORT)  # listening, but the default-deny INPUT drops it

        allowed = USER_CONFIG + f"firewall:\n  allow_tcp: [{BLOCKED_PORT}]\n"
        vps.exec(["sh", "-c", "cat > /etc/vps-agent/config.yaml"], input=allowed)
        vps.exec(["systemctl", "reload", "vps-agent"])
        wait_for(
            f"tcp/{BLOCKED_PORT} in the agent's chain",
            lambda: f"--dport {BLOCKED_PORT} -j ACCEPT" in vps.exec(["iptables", "-S", FIREWALL_CHAIN]).stdout,
        )
        assert client_connects(vps, BLOCKED_PORT)
        assert firewall_in_place(vps)
    finally:
        vps.exec(["systemctl", "stop", unit], check=False)
        configure(vps)  # back to the admin's config (port 8080 closed again)
    wait_for(
        f"tcp/{BLOCKED_PORT} gone from the agent's chain",
        lambda: f"--dport {BLOCKED_PORT} " not in vps.exec(["iptables", "-S", FIREWALL_CHAIN]).stdout,
    )


def test_iptables_flush_inside_the_vps_is_healed(vps: Sandbox) -> None:
    for drift in (["iptables", "-F"], ["ip6tables", "-F"]):
        before = firewall_heals(vps)
        vps.exec(drift)

        def healed(count: int = before) -> bool:
            return firewall_heals(vps) > count and firewall_in_place(vps)

        wait_for(f"the heal of {' '.join(drift)}", healed, 20)
    assert "--dport 2222 -j ACCEPT" in vps.exec(["iptables", "-S", FIREWALL_CHAIN]).stdout
    assert firewall_status(vps)["status"] in ("compliant", "healed")
    assert vps.ssh("id -un", port=2222).stdout.strip() == "admin"


F2B_JAIL_FILE = "/etc/fail2ban/jail.d/zz-vps-agent.local"


def fail2ban_guarding_2222(vps: Sandbox) -> bool:
    """fail2ban runs with the sshd jail, and the jail it loaded watches port 2222."""
    if vps.exec(["systemctl", "is-active", "fail2ban"], check=False).stdout.strip() != "active":
        return False
    if vps.exec(["fail2ban-client", "status", "sshd"], check=False).returncode != 0:
        return False
    actions = vps.exec(["fail2ban-client", "get", "sshd", "actions"], check=False).stdout.split()
    if not actions:
        return False
    port = vps.exec(["fail2ban-client", "get", "sshd", "action", actions[-1], "port"], check=False).stdout
    return port.strip() == "2222"


def test_fail2ban_runs_the_sshd_jail_on_the_ssh_port_and_is_kept_running(vps: Sandbox) -> None:
    # stock fail2ban cannot start on Debian 12 (no auth.log): the agent's jail file makes it work
    wait_for("fail2ban active with the sshd jail on 2222", lambda: fail2ban_guarding_2222(vps), 30)
    jail = vps.exec(["cat", F2B_JAIL_FILE]).stdout
    assert "port = 2222" in jail and "backend = systemd" in jail
    vps.exec(["test", "-s", "/var/lib/vps-agent/backups/fail2ban/jail.conf.orig"])
    vps.exec(["systemctl", "stop", "fail2ban"])
    wait_for("the stopped fail2ban to be started again", lambda: fail2ban_guarding_2222(vps), 30)
    vps.exec(["rm", F2B_JAIL_FILE])
    wait_for(
        "the deleted jail file to be healed",
        lambda: vps.exec(["cat", F2B_JAIL_FILE], check=False).stdout == jail and fail2ban_guarding_2222(vps),
        30,
    )
    controls = json.loads(vps.exec(["vps-agentctl", "status", "--json"], check=False).stdout)["controls"]
    fail2ban = next(c for c in controls if c["control"] == "fail2ban")
    assert fail2ban["status"] in ("compliant", "healed"), fail2ban
    assert fail2ban["facts"]["port"] == "2222" and "banned" in fail2ban["facts"], fail2ban
    assert vps.ssh("id -un", port=2222).stdout.strip() == "admin"


# Before the ban test: a reinstalled fail2ban starts with an empty database and reads the journal back
# over findtime, so the failed logins of the ban test would be found again and the client banned anew.
def test_a_purged_fail2ban_is_installed_again_once_dpkg_has_finished(vps: Sandbox) -> None:
    wait_for("fail2ban active with the sshd jail on 2222", lambda: fail2ban_guarding_2222(vps), 30)
    mark = len(events(vps))
    # the agent sees fail2ban stop while dpkg still runs: it waits for dpkg, then installs it again
    # (offline: the .deb is in the VPS's apt cache, as on any Debian that installed it)
    vps.exec(["apt-get", "purge", "-y", "-q", "fail2ban"], timeout=300)
    wait_for("fail2ban installed again, guarding 2222", lambda: fail2ban_guarding_2222(vps), 180)
    # the package's postinst starts fail2ban before the agent's transaction has verified and reported
    wait_for(
        "the heal to be reported",
        lambda: any(e["event"]["action"] == "drift-reverted" for e in events_since(vps, mark, "fail2ban")),
        60,
    )
    installed = vps.exec(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "fail2ban"]).stdout
    assert installed.strip() == "ii"
    seen = events_since(vps, mark, "fail2ban")
    actions = [e["event"]["action"] for e in seen]
    assert "remediation-failed" not in actions, json.dumps(seen, indent=1)
    reverted = [e for e in seen if e["event"]["action"] == "drift-reverted"]
    assert any("install fail2ban" in str(e["message"]) for e in reverted), json.dumps(seen, indent=1)
    # it waited for the purge's dpkg instead of fighting it
    waits = [e["event"]["outcome"] for e in seen if e["event"]["action"] == "package-manager-busy"]
    assert waits[:2] == ["unknown", "success"], json.dumps(seen, indent=1)
    vps.exec(["test", "-s", F2B_JAIL_FILE])
    # the guide's backup of jail.conf is still the very first one
    vps.exec(["test", "-s", "/var/lib/vps-agent/backups/fail2ban/jail.conf.orig"])
    status = vps.exec(["vps-agentctl", "status"], check=False)
    assert status.returncode == 0, status.stdout


MAXRETRY = 5  # fail2ban.maxretry's default; the module's config keeps it
# PasswordAuthentication is off: sshd still logs "Invalid user nosuchuser from 10.213.0.2" before any
# method is tried, and the sshd filter counts that line
BAD_LOGIN = ["-o", "PreferredAuthentications=password", "-o", "PubkeyAuthentication=no"]


def failed_login(vps: Sandbox) -> None:
    result = vps.ssh("true", user="nosuchuser", port=2222, options=BAD_LOGIN, check=False, timeout=15)
    assert result.returncode != 0, result.stdout


def banned(vps: Sandbox) -> list[str]:
    """The sshd jail's "Banned IP list" per `fail2ban-client status sshd`."""
    status = vps.exec(["fail2ban-client", "status", "sshd"]).stdout
    line = next(line for line in status.splitlines() if "Banned IP list:" in line)
    return line.split("Banned IP list:")[1].split()


def ignored_lines(vps: Sandbox) -> int:
    """How often fail2ban skipped a line of the client's because its address is in ignoreip."""
    log = vps.exec(["cat", "/var/log/fail2ban.log"], check=False).stdout
    return sum(f"Ignore {CLIENT_ADDR} by ip" in line for line in log.splitlines())


def admin_gets_in(vps: Sandbox) -> bool:
    return vps.ssh("id -un", port=2222, check=False, timeout=15).stdout.strip() == "admin"


def test_failed_logins_get_the_client_banned_unless_ignoreip_names_it(vps: Sandbox) -> None:
    wait_for("fail2ban active with the sshd jail on 2222", lambda: fail2ban_guarding_2222(vps), 30)
    if CLIENT_ADDR in banned(vps):  # a leftover would make the first half prove nothing
        vps.exec(["fail2ban-client", "set", "sshd", "unbanip", CLIENT_ADDR])
    attempts = 0
    while CLIENT_ADDR not in banned(vps):
        assert attempts < MAXRETRY, f"{attempts} failed logins and {CLIENT_ADDR} is not banned"
        failed_login(vps)
        attempts += 1
        try:  # the journal reaches fail2ban a moment after ssh returns
            wait_for(f"{CLIENT_ADDR} banned", lambda: CLIENT_ADDR in banned(vps), 3 if attempts < MAXRETRY else 15)
        except AssertionError:
            continue
    # banned: a new connection to the SSH port from the client fails (the ban rejects tcp/2222)
    assert not client_connects(vps, 2222)
    assert vps.ssh("true", port=2222, check=False, timeout=15).returncode != 0
    vps.exec(["fail2ban-client", "set", "sshd", "unbanip", CLIENT_ADDR])
    wait_for("the admin to get in again after the unban", lambda: admin_gets_in(vps), 20)

    # an address in ignoreip is never banned, however often it fails
    ignoring = USER_CONFIG + f'fail2ban:\n  ignoreip: ["127.0.0.1/8", "::1", "{CLIENT_ADDR}"]\n'
    vps.exec(["sh", "-c", "cat > /etc/vps-agent/config.yaml"], input=ignoring)
    vps.exec(["systemctl", "reload", "vps-agent"])
    ignoreip = ["fail2ban-client", "get", "sshd", "ignoreip"]
    wait_for("fail2ban to ignore the client", lambda: CLIENT_ADDR in vps.exec(ignoreip, check=False).stdout, 30)
    try:
        before = ignored_lines(vps)
        for _ in range(MAXRETRY + 2):
            failed_login(vps)
        # fail2ban read every one of them, and ignored each
        wait_for("fail2ban to read the failed logins", lambda: ignored_lines(vps) >= before + MAXRETRY + 2, 20)
        assert CLIENT_ADDR not in banned(vps)
        assert admin_gets_in(vps)
    finally:
        configure(vps)  # back to the module's config: the default ignoreip
    wait_for("the default ignoreip again", lambda: CLIENT_ADDR not in vps.exec(ignoreip, check=False).stdout, 30)
    assert admin_gets_in(vps)


def events_since(vps: Sandbox, count: int, control: str) -> list[dict[str, Any]]:
    return [e for e in events(vps)[count:] if e.get("control") == control]


def test_neither_jail_local_nor_a_later_local_turns_the_sshd_jail_off(vps: Sandbox) -> None:
    wait_for("fail2ban active with the sshd jail on 2222", lambda: fail2ban_guarding_2222(vps), 30)
    # jail.local is read before the agent's jail.d/*.local: restarted with it, the jail still runs
    vps.exec(["sh", "-c", "printf '[sshd]\\nenabled = false\\nport = 22\\n' > /etc/fail2ban/jail.local"])
    try:
        vps.exec(["systemctl", "restart", "fail2ban"])
        wait_for("the sshd jail on 2222 despite jail.local", lambda: fail2ban_guarding_2222(vps), 30)
        # a .local sorting after the agent's file would win: its line is neutralised
        mark = len(events(vps))
        late = "/etc/fail2ban/jail.d/zzz-late.local"
        vps.exec(["sh", "-c", f"printf '[sshd]\\nenabled = false\\n' > {late}"])
        wait_for(
            "the later .local to be neutralised",
            lambda: "# [vps-agent" in vps.exec(["cat", late]).stdout,
            10,
        )
        vps.exec(["fail2ban-client", "reload"])  # the admin applies it: nothing to apply
        wait_for("the sshd jail on 2222 after the reload", lambda: fail2ban_guarding_2222(vps), 30)
        actions = [e["event"]["action"] for e in events_since(vps, mark, "fail2ban")]
        assert "drift-reverted" in actions, actions
    finally:
        vps.exec(["rm", "-f", "/etc/fail2ban/jail.local", "/etc/fail2ban/jail.d/zzz-late.local"])


def test_a_hung_agent_is_restarted_by_the_watchdog(vps: Sandbox) -> None:
    # the shipped WatchdogSec is 30 s; a drop-in shortens it so the test does not wait that long
    vps.exec(["mkdir", "-p", "/etc/systemd/system/vps-agent.service.d"])
    vps.exec(["sh", "-c", "printf '[Service]\\nWatchdogSec=3\\n' > /etc/systemd/system/vps-agent.service.d/wd.conf"])
    vps.exec(["systemctl", "daemon-reload"])
    vps.exec(["systemctl", "restart", "vps-agent"], timeout=RESTART_TIMEOUT)
    wait_for("the restarted agent", lambda: status_code(vps) == 0, 30)
    before = main_pid(vps)
    vps.exec(["kill", "-STOP", str(before)])
    wait_for("the watchdog to replace the stopped agent", lambda: main_pid(vps) not in (0, before), 30)
    wait_for("status to answer again", lambda: status_code(vps) == 0, 30)
    journal = vps.exec(["journalctl", "-u", "vps-agent", "--no-pager", "-n", "200"]).stdout
    assert "Watchdog timeout" in journal or "watchdog" in journal.lower()


def test_power_cycle_comes_back_compliant(vps: Sandbox) -> None:
    vps.power_cycle()
    wait_for("vps-agent.service after boot", lambda: agent_active(vps), 60)
    wait_for("compliance after boot", lambda: status_code(vps) == 0 and hardened(vps), 60)
    # compliant config first; sshd itself may still be starting (slower on a loaded machine)
    try:
        wait_for("the admin's ssh login on 2222 after boot", lambda: admin_gets_in(vps), 30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnose(vps)}") from None


def diagnose(vps: Sandbox) -> str:
    """What an admin would look at when ssh fails: listeners, sshd's unit and log, the firewall, bans."""
    parts = []
    for cmd in (
        ["ss", "-ltnp"],
        ["systemctl", "status", "--no-pager", "ssh"],
        ["journalctl", "-b", "--no-pager", "-n", "40", "-u", "ssh", "-u", "vps-agent"],
        ["iptables", "-S"],
        ["fail2ban-client", "status", "sshd"],
    ):
        done = vps.exec(cmd, check=False)
        parts.append(f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}")
    return "\n".join(parts)


def test_upgrade_from_the_previous_version_then_purge(tmp_path_factory: pytest.TempPathFactory, release: str) -> None:
    require_root_and_tools(*TOOLS)
    previous, current = built_deb(PREVIOUS_VERSION), built_deb()
    with Sandbox(tmp_path_factory.mktemp(f"upgrade-{release}") / "root", release) as vps:
        vps.create(debs=[previous])
        vps.boot()
        wait_for("the previous version running", lambda: agent_active(vps), 60)
        assert PREVIOUS_VERSION in vps.exec(["vps-agentctl", "--version"]).stdout
        configure(vps)
        pid_before = main_pid(vps)

        (vps.root / "root" / current.name).write_bytes(current.read_bytes())
        # the VPS has no route out: apt can only use what is on it (--no-download trips apt 2.6.1)
        package = f"/root/{current.name}"
        upgrade = vps.exec(["apt-get", "install", "-y", package], check=False, timeout=300)
        assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
        assert "error" not in upgrade.stderr.lower()
        assert current.name.split("_")[1] in vps.exec(["vps-agentctl", "--version"]).stdout
        wait_for("the upgraded agent restarted", lambda: agent_active(vps) and main_pid(vps) != pid_before, 30)
        assert "port: 2222" in vps.exec(["cat", "/etc/vps-agent/config.yaml"]).stdout  # the admin's conffile kept
        wait_for("compliance after the upgrade", lambda: status_code(vps) == 0 and hardened(vps), 30)

        purge = vps.exec(["apt-get", "purge", "-y", "vps-agent"], check=False, timeout=300)
        assert purge.returncode == 0, purge.stdout + purge.stderr
        assert "error" not in purge.stderr.lower() and "warning: while removing" not in purge.stdout.lower()
        leftovers = vps.exec(
            ["sh", "-c", "ls -d /var/lib/vps-agent /var/log/vps-agent /etc/vps-agent /usr/share/vps-agent 2>/dev/null"],
            check=False,
        ).stdout
        assert leftovers.strip() == ""
        assert vps.exec(["dpkg-query", "-W", "vps-agent"], check=False).returncode != 0
        assert hardened(vps)  # purge never undoes the hardening
        assert vps.ssh("id -un", port=2222).stdout.strip() == "admin"

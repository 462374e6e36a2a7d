"""The fail2ban guard on a fake root: rendering, reading `fail2ban-client -d`, diff, plan, neutralising.

The dumps in tests/data were printed by the real fail2ban-client 1.0.2 (Debian 12): the stock config,
one with the agent's jail file plus a later jail.d/zzz-other.local setting `port = 99`, and one with the
agent's jail file setting `mode = aggressive`. The *.fail2ban-1.1.0 ones were printed by upstream's
fail2ban 1.1.0 (the tag, run from source on Debian 12 with its own config/, as Debian 13 ships it) with
the agent's jail file, `mode = normal` and `mode = aggressive`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from agent import accounts
from agent.config import Config, Fail2banConfig, SshConfig
from agent.controls.base import Changes, ObserveError
from agent.controls.fail2ban import (
    CLIENT,
    JOURNALMATCH,
    Fail2banControl,
    Fail2banObserved,
    banaction_for,
    overrides,
    parse_dump,
    parse_ignore_list,
    parse_status,
    render_jail,
)
from agent.paths import SystemRoot
from agent.system.netfilter import Backend
from tests.guards import SSH_2222, SSH_ON_22_FOR_2222
from tests.unit.conftest import DeclaredCommands

DATA = Path(__file__).parents[1] / "data"
DUMP = (DATA / "fail2ban-client-d.debian12").read_text()
STOCK = (DATA / "fail2ban-client-d.stock.debian12").read_text()


def _control(tmp_path: Path, backend: str = "nft") -> Fail2banControl:
    root = SystemRoot.at(tmp_path)
    (tmp_path / "etc/fail2ban/jail.d").mkdir(parents=True)
    (tmp_path / "etc/fail2ban/jail.conf").write_text("[DEFAULT]\nbantime = 10m\n")
    return Fail2banControl(root, detect_backend=lambda: Backend(backend))


def _config(**fail2ban: Any) -> Config:
    return Config(ssh=SshConfig(port=2222), fail2ban=Fail2banConfig(**fail2ban))


def test_the_dump_of_the_real_tool_gives_the_effective_sshd_jail() -> None:
    assert parse_dump(DUMP) == {
        "enabled": "true",
        "backend": "systemd",
        "maxretry": "3",
        "findtime": "10m",
        "bantime": "-1",
        "ignoreip": "127.0.0.1/8 ::1 10.0.0.0/8",
        "banaction": "nftables-multiport",
        "port": "99",  # the later zzz-other.local wins over the agent's 2222,22
        # the filter's stock match: an OR of sshd.service (not Debian's ssh.service) and any process named sshd
        "journalmatch": "_SYSTEMD_UNIT=sshd.service + _COMM=sshd",
        "mode": "normal",  # no failregex that counts a preauth close
    }


def test_the_stock_debian_dump_is_the_auto_backend_on_port_ssh() -> None:
    stock = parse_dump(STOCK)
    assert stock is not None
    assert (stock["backend"], stock["port"], stock["maxretry"], stock["banaction"]) == (
        "auto",
        "ssh",
        "5",
        "iptables-multiport",
    )


def test_a_jail_that_is_not_started_is_disabled() -> None:
    without_sshd = "\n".join(line for line in DUMP.splitlines() if "'sshd'" not in line)
    assert parse_dump(without_sshd) is None


def test_banned_count_from_status() -> None:
    text = (
        "Status for the jail: sshd\n|- Actions\n|  |- Currently banned:\t2\n|  `- Banned IP list:\t10.0.0.1 10.0.0.2\n"
    )
    assert parse_status(text) == 2


@pytest.mark.parametrize(
    ("backend", "action"),
    [("nft", "iptables-multiport"), ("legacy", "iptables-multiport"), ("nftables", "nftables-multiport")],
)
def test_banaction_matches_the_firewall_backend(backend: str, action: str) -> None:
    assert banaction_for(Backend(backend)) == action


def test_desired_uses_the_ssh_ports_the_firewall_keeps_open_and_the_journal(tmp_path: Path) -> None:
    control = _control(tmp_path, "nftables")
    desired = control.desired(
        _config(maxretry=3, bantime=-1, findtime=600, ignoreip=("10.0.0.0/8",)), SSH_ON_22_FOR_2222
    )
    assert desired.effective == {
        "enabled": "true",
        "port": "22,2222",
        "maxretry": "3",
        "findtime": "600",
        "bantime": "-1",
        "ignoreip": "10.0.0.0/8",
        "banaction": "nftables-multiport",
        "backend": "systemd",
        # only sshd's own unit, as root: OpenSSH 10's sshd-session too, no forged /dev/log line
        "journalmatch": JOURNALMATCH,
    }
    assert "[sshd]\nenabled = true\nport = 22,2222\n" in desired.text
    assert desired.text == render_jail(desired.effective)


def test_with_an_auth_log_the_backend_is_left_to_fail2ban(tmp_path: Path) -> None:
    control = _control(tmp_path)
    (tmp_path / "var/log").mkdir(parents=True)
    (tmp_path / "var/log/auth.log").write_text("")
    assert not {"backend", "journalmatch"} & set(control.desired(_config(), SSH_2222).effective)


def test_observe_reads_the_real_tools_dump(tmp_path: Path, commands: DeclaredCommands) -> None:
    control = _control(tmp_path)
    commands.expect(["fail2ban-client", "-d"], stdout=DUMP)
    observed = control.observe(control.desired(_config(), SSH_2222))
    assert observed.effective is not None and observed.effective["port"] == "99"
    assert observed.agent_file is None and observed.running is None  # a fake root: never asked
    assert commands.calls == [["fail2ban-client", "-d"]]


def test_a_later_local_overriding_the_port_is_neutralised_and_the_agent_file_written(tmp_path: Path) -> None:
    control = _control(tmp_path)
    other = tmp_path / "etc/fail2ban/jail.d/zzz-other.local"
    other.write_text("[DEFAULT]\nport = 1\n[sshd]\nport = 99\n  100\nmaxretry = 10\nmode = aggressive\nbantime = 1h\n")
    (tmp_path / "etc/fail2ban/jail.d/aa-early.local").write_text("[sshd]\nenabled = false\n")
    desired = control.desired(_config(), SSH_2222)
    observed = Fail2banObserved(parse_dump(DUMP), None, None, control._later_files(), b"[DEFAULT]\n", running=None)
    drift = control.diff(observed, desired)
    assert drift is not None
    described = drift.summary()
    assert "/etc/fail2ban/jail.d/zzz-other.local:4: port is '99\\n100'" in described  # as fail2ban reads it
    assert "/etc/fail2ban/jail.d/zzz-other.local:6: maxretry is '10'" in described
    assert "aa-early" not in described  # read before the agent's file: it cannot win
    changes = control.plan(observed, desired, drift)
    by_path = {c.system_path: c for c in changes.files}
    assert set(by_path) == {
        "/var/lib/vps-agent/backups/fail2ban/jail.conf.orig",
        "/etc/fail2ban/jail.d/zz-vps-agent.local",
        "/etc/fail2ban/jail.d/zzz-other.local",
    }
    assert by_path["/var/lib/vps-agent/backups/fail2ban/jail.conf.orig"].content == b"[DEFAULT]\n"
    edited = (by_path["/etc/fail2ban/jail.d/zzz-other.local"].content or b"").decode().splitlines()
    assert edited[:3] == ["[DEFAULT]", "port = 1", "[sshd]"]  # DEFAULT is not the sshd jail's
    assert edited[3].startswith("# [vps-agent ") and edited[3].endswith("the agent keeps port = 2222: port = 99")
    assert edited[4] == "# [vps-agent] 100"  # the continued value goes with its key
    assert "the agent keeps maxretry = 5: maxretry = 10" in edited[5]
    assert edited[6] == "mode = aggressive"  # guarded only while sshd takes no passwords: the admin's choice
    assert edited[7] == "bantime = 1h"  # 3600 seconds, as the agent wants
    left = overrides("\n".join(edited))
    assert [(a.line, a.key, a.value) for a in left] == [(7, "mode", "aggressive"), (8, "bantime", "1h")]


def test_compliant_when_effective_and_file_agree(tmp_path: Path) -> None:
    control = _control(tmp_path)
    desired = control.desired(_config(), SSH_2222)
    observed = Fail2banObserved(dict(desired.effective), desired.text.encode(), None, (), None, running=None)
    assert control.diff(observed, desired) is None


def test_a_jail_conf_that_appears_later_is_kept_as_the_original_at_once(tmp_path: Path) -> None:
    # fail2ban was installed after the agent wrote its jail file: all else already agrees
    control = _control(tmp_path)
    desired = control.desired(_config(), SSH_2222)
    observed = Fail2banObserved(dict(desired.effective), desired.text.encode(), None, (), b"[INCLUDES]\n", None)
    drift = control.diff(observed, desired)
    assert drift is not None and [item.what for item in drift.items] == ["jail.conf backup"]
    changes = control.plan(observed, desired, drift)
    assert [(c.system_path, c.content) for c in changes.files] == [
        ("/var/lib/vps-agent/backups/fail2ban/jail.conf.orig", b"[INCLUDES]\n")
    ]


def test_a_disabled_jail_and_a_stopped_service_are_drift(tmp_path: Path) -> None:
    control = _control(tmp_path)
    desired = control.desired(_config(), SSH_2222)
    observed = Fail2banObserved(None, desired.text.encode(), None, (), None, running=False)
    drift = control.diff(observed, desired)
    assert drift is not None
    whats = {item.what: item.actual for item in drift.items}
    assert whats["enabled"] == "false" and whats["fail2ban"] == "not active"
    changes = control.plan(observed, desired, drift)
    assert changes.notes[-1] == "start fail2ban.service"


def test_reload_never_touches_fail2ban_in_a_fake_root(tmp_path: Path, commands: DeclaredCommands) -> None:
    outcome = _control(tmp_path).reload(Changes())
    assert outcome.ok and commands.calls == []


def test_validate_is_fail2bans_config_test(tmp_path: Path, commands: DeclaredCommands) -> None:
    from agent.controls.base import Changes, ValidationError

    commands.expect(["fail2ban-client", "-t"], returncode=255, stderr="ERROR  No section: 'Definition'")
    with pytest.raises(ValidationError, match="No section"):
        _control(tmp_path).validate(Changes())


def test_the_config_test_prints_what_it_tested_and_that_is_the_observe_again(
    tmp_path: Path, commands: DeclaredCommands
) -> None:
    from agent.controls.base import Changes

    control = _control(tmp_path)
    commands.expect(["fail2ban-client", "-t", "-d"], stdout=DUMP + "OK: configuration test is successful\n")
    after = control.validate(Changes())
    assert after.effective is not None and after.effective["port"] == "99"
    assert after.running is None  # the reload that follows starts fail2ban when it was down
    assert commands.calls == [["fail2ban-client", "-t", "-d"]]  # one run: no second -d after the test


class _HostRoot(SystemRoot):
    """The host as the guard decides on it ("/"), its files in a temporary directory."""

    @property
    def is_host(self) -> bool:
        return True


def test_after_a_heal_on_a_host_status_shows_what_the_reload_saw(tmp_path: Path, commands: DeclaredCommands) -> None:
    from agent.controls.base import Changes

    (tmp_path / "etc/fail2ban/jail.d").mkdir(parents=True)
    (tmp_path / "run/systemd/system").mkdir(parents=True)  # systemd runs this "host"
    control = Fail2banControl(_HostRoot(tmp_path), detect_backend=lambda: Backend("nft"))
    commands.expect([CLIENT, "-t", "-d"], stdout=DUMP)
    commands.expect(["systemctl", "is-active"])
    commands.expect([CLIENT, "reload"])
    # fail2ban 1.1 has the jail before its actions: the reload is done once it can ban
    answers = iter(["No actions for jail sshd", "No actions for jail sshd"])
    commands.expect_with(
        [CLIENT, "get", "sshd", "actions"],
        lambda argv: (0, next(answers, "The jail sshd has the following actions:\nnftables-multiport"), ""),
    )
    commands.expect([CLIENT, "status", "sshd"], stdout="Status for the jail: sshd\n   |- Currently banned:\t3\n")
    after = control.validate(Changes())  # the observe-again, before the reload
    reloaded = control.reload(Changes())
    assert reloaded.ok
    assert [c[:4] for c in commands.calls].count([CLIENT, "get", "sshd", "actions"]) == 3
    desired = control.desired(_config(), SSH_2222)
    assert "service" not in control.facts(after, desired)  # the -t -d knows nothing of the service
    facts = {**control.facts(after, desired), **reloaded.facts}  # as the transaction merges them
    assert (facts["service"], facts["banned"]) == ("active", 3)


def _host_control(tmp_path: Path) -> Fail2banControl:
    (tmp_path / "etc/fail2ban/jail.d").mkdir(parents=True)
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    return Fail2banControl(_HostRoot(tmp_path), detect_backend=lambda: Backend("nft"))


def test_a_reload_after_which_the_jail_never_gets_its_action_is_followed_by_a_restart_and_fails_if_that_does_not_help(
    tmp_path: Path, commands: DeclaredCommands, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.controls.fail2ban import control as fail2ban

    control = _host_control(tmp_path)
    monkeypatch.setattr(fail2ban, "ACTIONS_WAIT", 0.3)
    commands.expect(["systemctl", "is-active"])
    commands.expect([CLIENT, "reload"])
    commands.expect(["systemctl", "restart", "fail2ban.service"])
    commands.expect([CLIENT, "get", "sshd", "actions"], stdout="No actions for jail sshd\n")
    outcome = control.reload(Changes())
    assert not outcome.ok and "the sshd jail has no ban action 0.3s later (No actions for jail sshd)" in outcome.detail
    assert outcome.detail.startswith("systemctl restart fail2ban.service (fail2ban-client reload: the sshd jail has no")
    assert [CLIENT, "reload"] in commands.calls and ["systemctl", "restart", "fail2ban.service"] in commands.calls


def test_a_reload_that_leaves_no_action_is_mended_by_a_restart(
    tmp_path: Path, commands: DeclaredCommands, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.controls.fail2ban import control as fail2ban

    control = _host_control(tmp_path)
    monkeypatch.setattr(fail2ban, "ACTIONS_WAIT", 0.3)
    restarted: list[bool] = []
    commands.expect(["systemctl", "is-active"])
    commands.expect([CLIENT, "reload"])

    def restart(argv: list[str]) -> tuple[int, str, str]:
        restarted.append(True)
        return 0, "", ""

    commands.expect_with(["systemctl", "restart", "fail2ban.service"], restart)
    commands.expect_with(
        [CLIENT, "get", "sshd", "actions"],
        lambda argv: (0, "The jail sshd has the following actions:\nnftables" if restarted else "No actions", ""),
    )
    commands.expect([CLIENT, "status", "sshd"], stdout="Status for the jail: sshd\n   |- Currently banned:\t0\n")
    outcome = control.reload(Changes())
    assert outcome.ok and outcome.detail.startswith("systemctl restart fail2ban.service (fail2ban-client reload:")


def test_a_heal_that_renames_the_ban_action_restarts_fail2ban_instead_of_reloading(
    tmp_path: Path, commands: DeclaredCommands
) -> None:
    """Debian 13 ships `banaction = nftables`; the agent bans with iptables-multiport (iptables-nft here)
    or nftables-multiport. fail2ban 1.1's reload drops the old action and never adds the new one
    (`No actions for jail sshd`, seen on a booted Debian 13 VPS until fail2ban restarted): a restart it is."""
    control = _host_control(tmp_path)
    desired = control.desired(_config(), SSH_2222)
    debian13 = parse_dump(STOCK)
    assert debian13 is not None
    debian13["banaction"] = "nftables"
    observed = Fail2banObserved(debian13, None, None, (), b"[DEFAULT]\n", running=True)
    drift = control.diff(observed, desired)
    assert drift is not None
    changes = control.plan(observed, desired, drift)
    commands.expect(["systemctl", "is-active"])
    commands.expect(["systemctl", "restart", "fail2ban.service"])
    commands.expect([CLIENT, "get", "sshd", "actions"], stdout="The jail sshd has the following actions:\nx\n")
    commands.expect([CLIENT, "status", "sshd"], stdout="Status for the jail: sshd\n   |- Currently banned:\t0\n")
    outcome = control.reload(changes)
    assert outcome.ok, outcome.detail
    assert "the ban action changes: nftables -> iptables-multiport" in outcome.detail
    assert [CLIENT, "reload"] not in commands.calls


def _missing(tmp_path: Path, commands: DeclaredCommands, host: bool) -> Fail2banControl:
    """No fail2ban on the system: no fail2ban-client, no /etc/fail2ban beyond the agent's jail.d."""
    (tmp_path / "etc/fail2ban/jail.d").mkdir(parents=True)
    root = _HostRoot(tmp_path) if host else SystemRoot.at(tmp_path)
    commands.expect([CLIENT, "-d"], returncode=127, stderr=f"{CLIENT}: command not found")
    return Fail2banControl(root, detect_backend=lambda: Backend("nft"))


def test_a_fake_root_reports_fail2ban_missing_and_never_installs(tmp_path: Path, commands: DeclaredCommands) -> None:
    control = _missing(tmp_path, commands, host=False)
    desired = control.desired(_config(install=True), SSH_2222)
    with pytest.raises(ObserveError, match="fail2ban is not installed"):
        control.observe(desired)
    assert [c[0] for c in commands.calls] == [CLIENT]


def test_with_install_false_the_host_reports_and_never_installs(tmp_path: Path, commands: DeclaredCommands) -> None:
    control = _missing(tmp_path, commands, host=True)
    desired = control.desired(_config(install=False), SSH_2222)
    with pytest.raises(ObserveError, match=r"fail2ban is not installed .*fail2ban.install is false"):
        control.observe(desired)
    assert [c[0] for c in commands.calls] == [CLIENT]


def test_on_the_host_a_missing_fail2ban_is_installed_after_the_jail_file_is_written(
    tmp_path: Path, commands: DeclaredCommands
) -> None:
    control = _missing(tmp_path, commands, host=True)
    desired = control.desired(_config(install=True), SSH_2222)
    observed = control.observe(desired)
    assert not observed.installed and observed.running is False
    drift = control.diff(observed, desired)
    assert drift is not None
    assert ("fail2ban", "installed", "not installed") in [(i.what, i.expected, i.actual) for i in drift.items]
    changes = control.plan(observed, desired, drift)
    assert [c.path.name for c in changes.files] == ["zz-vps-agent.local"]
    (install,) = changes.commands
    assert install.undo is None and install.check is None
    assert install.apply.argv[0] == "apt-get" and install.apply.argv[-3:] == (
        "-y",
        "--no-install-recommends",
        "fail2ban",
    )
    assert "DPkg::Lock::Timeout=120" in install.apply.argv and "Dpkg::Options::=--force-confold" in install.apply.argv
    assert dict(install.apply.env)["DEBIAN_FRONTEND"] == "noninteractive" and install.apply.timeout >= 300
    assert any("install fail2ban" in note for note in changes.notes)
    assert [c[0] for c in commands.calls] == [CLIENT]  # planning installs nothing


def test_an_interrupted_dpkg_is_configured_before_the_install_and_apt_runs_outside_the_sandbox(
    tmp_path: Path, commands: DeclaredCommands
) -> None:
    (tmp_path / "var/lib/dpkg/updates").mkdir(parents=True)
    (tmp_path / "var/lib/dpkg/updates/0001").write_text("")
    (tmp_path / "run/systemd/system").mkdir(parents=True)  # systemd runs this host
    control = _missing(tmp_path, commands, host=True)
    desired = control.desired(_config(), SSH_2222)  # install: true is the default
    observed = control.observe(desired)
    drift = control.diff(observed, desired)
    assert drift is not None
    repair, install = control.plan(observed, desired, drift).commands
    for command in (repair, install):
        assert command.apply.argv[:2] == ("systemd-run", "--wait")
        assert "--setenv=DEBIAN_FRONTEND=noninteractive" in command.apply.argv
    assert repair.apply.argv[-2:] == ("--configure", "-a")
    assert "apt-get" in install.apply.argv and install.apply.argv[-1] == "fail2ban"


# --- passwords off: the mode that counts a guesser; live admin sessions never banned ---------------------


def _with(control: Fail2banControl, passwords: bool | None) -> Fail2banControl:
    control._password_logins = lambda _config: passwords
    return control


def test_the_jail_is_aggressive_only_while_sshd_takes_no_passwords(tmp_path: Path) -> None:
    control = _control(tmp_path)
    assert _with(control, False).desired(_config(), SSH_2222).effective["mode"] == "aggressive"
    assert "mode = aggressive\n" in control.desired(_config(), SSH_2222).text
    assert "mode" not in _with(control, True).desired(_config(), SSH_2222).effective  # the admin's own mode stays
    assert "mode" not in _with(control, None).desired(_config(), SSH_2222).effective  # sshd -T failed: not known


@pytest.mark.parametrize(
    ("dump", "mode"),
    [
        ("fail2ban-client-d.debian12", "normal"),
        ("fail2ban-client-d.aggressive.debian12", "aggressive"),
        ("fail2ban-client-d.fail2ban-1.1.0", "normal"),
        ("fail2ban-client-d.aggressive.fail2ban-1.1.0", "aggressive"),
    ],
)
def test_the_dump_tells_the_mode_by_the_failregex_that_counts_a_preauth_close(dump: str, mode: str) -> None:
    # dumps of the real fail2ban-client: Debian 12's 1.0.2, and upstream 1.1.0 (what Debian 13 ships)
    parsed = parse_dump((DATA / dump).read_text())
    assert parsed is not None and parsed["mode"] == mode


def _session(tmp_path: Path, name: str, user: str, host: str, service: str = "sshd", owner: int = 0) -> Path:
    path = tmp_path / "run/systemd/sessions" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"UID=1000\nUSER={user}\nACTIVE=1\nSTATE=active\nREMOTE=1\nSERVICE={service}\nREMOTE_HOST={host}\n")
    os.chown(path, owner, 0)
    return path


def _accounts(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir(exist_ok=True)
    (tmp_path / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nadmin:x:1000:1000::/home/admin:/bin/bash\n"
        "web:x:1001:1001::/home/web:/bin/bash\n"
    )
    (tmp_path / "etc/group").write_text("sudo:x:27:admin\nadmin:x:1000:\nweb:x:1001:\n")
    (tmp_path / "etc/sudoers").write_text("%sudo ALL=(ALL:ALL) ALL\n")


def test_only_sshd_sessions_of_sudo_admins_in_root_owned_files_count(tmp_path: Path) -> None:
    _accounts(tmp_path)
    _session(tmp_path, "1", "admin", "192.0.2.7")
    _session(tmp_path, "2", "web", "198.51.100.1")  # no sudo rights
    _session(tmp_path, "3", "admin", "198.51.100.2", service="login")  # not over SSH
    _session(tmp_path, "4", "admin", "198.51.100.3", owner=1001)  # not written by logind
    (tmp_path / "run/systemd/sessions/5").symlink_to(tmp_path / "run/systemd/sessions/1")
    root = SystemRoot.at(tmp_path)
    found = accounts.admin_sessions(root, accounts.read_facts(root))
    assert found is not None and [(s.user, s.address) for s in found] == [("admin", "192.0.2.7")]
    assert accounts.live_ssh_sessions(SystemRoot.at(tmp_path / "nowhere")) is None


def _running(control: Fail2banControl, runtime: tuple[str, ...], banned: tuple[str, ...] = ()) -> Fail2banObserved:
    root = control.root
    found = accounts.admin_sessions(root, accounts.read_facts(root))
    desired = control.desired(_config(), SSH_2222)
    text = render_jail(desired.effective).encode()
    return Fail2banObserved(
        dict(desired.effective),
        text,
        None,
        (),
        None,  # jail.conf: its copy is not the point here
        True,
        len(banned),
        True,
        runtime,
        banned,
        tuple(found or ()),
    )


def test_a_live_admin_sessions_address_is_ignored_and_unbanned_and_dropped_when_it_ends(tmp_path: Path) -> None:
    control = _control(tmp_path)
    _accounts(tmp_path)
    session = _session(tmp_path, "7", "admin", "192.0.2.7")
    desired = control.desired(_config(), SSH_2222)
    observed = _running(control, ("127.0.0.0/8", "::1"), banned=("192.0.2.7",))
    drift = control.diff(observed, desired)
    assert drift is not None and {i.actual for i in drift.items} == {"banned", "not ignored"}
    changes = control.plan(observed, desired, drift)
    assert [c.apply.argv for c in changes.commands] == [
        (CLIENT, "set", "sshd", "unbanip", "192.0.2.7"),
        (CLIENT, "set", "sshd", "addignoreip", "192.0.2.7"),
    ]
    assert changes.files == () and "no reload" in control.reload(changes).detail  # a reload would drop it again
    assert control.facts(observed, desired)["admin_sessions_ignored"] == "192.0.2.7 (admin)"
    # covered by a configured network: nothing to add; the session over: the address the agent added goes
    assert control.diff(_running(control, ("127.0.0.0/8", "::1", "192.0.2.7")), desired) is None
    session.unlink()
    ended = _running(control, ("127.0.0.0/8", "::1", "192.0.2.7"))
    drift = control.diff(ended, desired)
    assert drift is not None
    [command] = control.plan(ended, desired, drift).commands
    assert command.apply.argv == (CLIENT, "set", "sshd", "delignoreip", "192.0.2.7")
    assert command.undo is not None and command.undo.argv[-2:] == ("addignoreip", "192.0.2.7")


def test_the_running_ignore_list_is_read_as_fail2ban_client_prints_it() -> None:
    text = "These IP addresses/networks are ignored:\n|- 127.0.0.0/8\n|- ::1\n`- 192.0.2.7\n"
    assert parse_ignore_list(text) == ("127.0.0.0/8", "::1", "192.0.2.7")
    assert parse_ignore_list("No IP address/network is ignored\n") == ()


def test_the_jails_actions_as_fail2ban_client_prints_them() -> None:
    from agent.controls.fail2ban import parse_actions

    assert parse_actions("The jail sshd has the following actions:\niptables-multiport\n") == ["iptables-multiport"]
    assert parse_actions("The jail sshd has the following actions:\nnftables, sendmail\n") == ["nftables", "sendmail"]
    assert parse_actions("No actions for jail sshd\n") == []  # fail2ban 1.1 right after a reload
    assert parse_actions("") == []


# --- later files read as fail2ban's parser reads them (found by tests/unit/test_properties_fail2ban.py) -------


def _neutralised(tmp_path: Path, text: bytes) -> bytes | None:
    control = _control(tmp_path)
    (tmp_path / "etc/fail2ban/jail.d/zzz-admin.local").write_bytes(text)
    desired = control.desired(_config(), SSH_2222)
    observed = Fail2banObserved(
        dict(desired.effective), desired.text.encode(), None, control._later_files(), None, running=None
    )
    drift = control.diff(observed, desired)
    if drift is None:
        return None
    changes = control.plan(observed, desired, drift)
    edited = [c.content for c in changes.files if c.system_path.endswith("zzz-admin.local")]
    return edited[0] if edited else None


def test_a_crlf_file_keeps_its_line_ends_when_a_line_is_neutralised(tmp_path: Path) -> None:
    after = _neutralised(tmp_path, b"[sshd]\r\nenabled = false\r\nlogpath = /var/log/x\r\n")
    assert after is not None
    lines = after.split(b"\r\n")
    assert lines[0] == b"[sshd]" and lines[2] == b"logpath = /var/log/x" and lines[3] == b""
    assert lines[1].startswith(b"# [vps-agent ") and lines[1].endswith(b": enabled = false")


@pytest.mark.parametrize(
    "text",
    ["[sshd] # off for now\nenabled = false\n", "[sshd]\t; note\nenabled = false\n", "[sshd]\n  enabled = false\n"],
)
def test_a_jail_key_fail2ban_reads_is_neutralised_however_it_is_spelled(tmp_path: Path, text: str) -> None:
    # fail2ban's parser takes "[sshd] # x" for the header [sshd], and an indented first key for a key
    after = _neutralised(tmp_path, text.encode())
    assert after is not None
    assert b"neutralised, the agent keeps enabled = true: enabled = false" in after


@pytest.mark.parametrize(
    "text",
    [
        "[ sshd ]\nenabled = false\n",  # the jail " sshd ", not sshd
        "[sshd]\nfindtime = 600 ; ten minutes\n",  # an inline comment: fail2ban reads 600
        "[sshd]\nlogpath = /var/log/x\n  enabled = false\n",  # part of logpath's value, not a key
    ],
)
def test_what_fail2ban_does_not_read_as_a_conflicting_key_is_left_alone(tmp_path: Path, text: str) -> None:
    assert _neutralised(tmp_path, text.encode()) is None


def test_a_jail_file_renamed_in_while_fail2ban_reads_is_in_the_observation_so_the_plan_covers_it(
    tmp_path: Path, commands: DeclaredCommands
) -> None:
    """fail2ban-client -d runs first and the files are read after it: a file saved (renamed in) while the tool
    reads is then in both or only in the files, and the plan neutralises what the tool saw. The other way round
    (the files listed before a rename the tool then read) planned nothing and failed "still drifted" (bench:
    1 to 18 of 20 such tampers under load)."""
    control = _control(tmp_path)
    later = tmp_path / "etc/fail2ban/jail.d/zzz-off.local"

    def saved_meanwhile(argv: list[str]) -> tuple[int, str, str]:
        later.write_text("[sshd]\nenabled = false\n")  # an editor's rename, landing while fail2ban reads
        return 0, "['set', 'loglevel', 'INFO']\n", ""  # what -d prints with the sshd jail off

    commands.expect_with([CLIENT, "-d"], saved_meanwhile)
    desired = control.desired(_config(), SSH_2222)
    observed = control.observe(desired)
    drift = control.diff(observed, desired)
    assert drift is not None and observed.effective is None  # the tool saw the jail off
    changes = control.plan(observed, desired, drift)
    assert "/etc/fail2ban/jail.d/zzz-off.local" in {change.system_path for change in changes.files}

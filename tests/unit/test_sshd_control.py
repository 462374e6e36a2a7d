"""The SSH guard's decisions on a fake root (sshd itself is faked here; tests/integration uses the real one)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.controls.base import Drift, FileChange
from agent.controls.ssh.control import SshdControl, SshdDesired, SshdObserved
from agent.controls.ssh.portmove import PortMoves
from agent.paths import SystemRoot
from tests.guards import NO_SSH, ssh_guard
from tests.unit import fake_sshd
from tests.unit.conftest import DeclaredCommands

CONFIG = parse_config('ssh: {port: 2222, permit_root_login: "no", password_authentication: false}')


@pytest.fixture
def control(fake_root: Path, commands: DeclaredCommands) -> SshdControl:
    root = SystemRoot.at(fake_root)
    fake_sshd.install(commands, root)
    return ssh_guard(root)


def drift_of(control: SshdControl) -> tuple[SshdObserved, SshdDesired, Drift]:
    desired = control.desired(CONFIG, NO_SSH)
    observed = control.observe(desired)
    drift = control.diff(observed, desired)
    assert drift is not None
    return observed, desired, drift


def text_of(change: FileChange) -> str:
    """What a planned file will hold (the plans here write files, none deletes one)."""
    assert change.content is not None
    return change.content.decode()


def test_stock_debian_config_drifts_on_all_three_keywords_and_the_missing_dropin(control: SshdControl) -> None:
    _, _, drift = drift_of(control)
    assert drift is not None
    what = {item.what for item in drift.items}
    assert {"port", "permitrootlogin", "passwordauthentication", "agent drop-in"} <= what
    assert "-port 22" in drift.diff and "+port 2222" in drift.diff


def test_plan_writes_only_the_agent_dropin_when_nothing_conflicts(control: SshdControl) -> None:
    observed, desired, drift = drift_of(control)
    changes = control.plan(observed, desired, drift)
    assert [c.system_path for c in changes.files] == ["/etc/ssh/sshd_config.d/00-vps-agent.conf"]
    body = text_of(changes.files[0])
    assert "Port 2222\nPermitRootLogin no\nPasswordAuthentication no\n" in body
    assert "+PermitRootLogin no" in changes.diff


def test_dropin_with_permitrootlogin_yes_is_neutralised_with_a_marker(control: SshdControl, fake_root: Path) -> None:
    evil = fake_root / "etc/ssh/sshd_config.d/00-evil.conf"
    evil.write_text("# planted\nPermitRootLogin yes\nX11Forwarding no\n")
    observed, desired, drift = drift_of(control)
    assert any(i.where == "/etc/ssh/sshd_config.d/00-evil.conf" and i.line == 2 for i in drift.items)
    changes = control.plan(observed, desired, drift)
    edited = {c.system_path: text_of(c) for c in changes.files}["/etc/ssh/sshd_config.d/00-evil.conf"]
    lines = edited.splitlines()
    assert lines[0] == "# planted" and lines[2] == "X11Forwarding no"
    assert (
        lines[1].startswith("# [vps-agent ") and "neutralised" in lines[1] and lines[1].endswith("PermitRootLogin yes")
    )


def test_a_crlf_dropin_keeps_its_line_ends_and_every_other_byte_when_a_line_is_neutralised(
    control: SshdControl, fake_root: Path
) -> None:
    # sshd reads lines up to \n and strips a trailing \r: a file edited on Windows is a valid config
    evil = fake_root / "etc/ssh/sshd_config.d/00-crlf.conf"
    evil.write_bytes(b"# from a Windows editor\r\nPermitRootLogin yes\r\nX11Forwarding no")
    observed, desired, drift = drift_of(control)
    assert any(i.where == "/etc/ssh/sshd_config.d/00-crlf.conf" and i.line == 2 for i in drift.items)
    changes = control.plan(observed, desired, drift)
    edited = {c.system_path: c.content for c in changes.files}["/etc/ssh/sshd_config.d/00-crlf.conf"]
    assert edited is not None
    first, second, third = edited.split(b"\r\n")
    assert first == b"# from a Windows editor" and third == b"X11Forwarding no"  # no line end added either
    assert second.startswith(b"# [vps-agent ") and second.endswith(b": PermitRootLogin yes")


def test_line_numbers_are_sshd_s_a_form_feed_inside_a_line_is_no_line_break(
    control: SshdControl, fake_root: Path
) -> None:
    # Python's str.splitlines() breaks at \f, \v, \x1c..\x1e, \x85, \u2028; sshd breaks at \n only
    odd = fake_root / "etc/ssh/sshd_config.d/00-odd.conf"
    odd.write_bytes(b"# a page\x0cbreak\nX11Forwarding no\nPermitRootLogin yes\n")
    observed, desired, drift = drift_of(control)
    assert any(i.where == "/etc/ssh/sshd_config.d/00-odd.conf" and i.line == 3 for i in drift.items), drift.items
    changes = control.plan(observed, desired, drift)
    edited = {c.system_path: c.content for c in changes.files}["/etc/ssh/sshd_config.d/00-odd.conf"]
    assert edited is not None
    lines = edited.split(b"\n")
    assert lines[:2] == [b"# a page\x0cbreak", b"X11Forwarding no"] and lines[3] == b""
    assert lines[2].startswith(b"# [vps-agent ") and lines[2].endswith(b"PermitRootLogin yes")


def test_a_restored_include_in_a_crlf_sshd_config_has_crlf_line_ends(control: SshdControl, fake_root: Path) -> None:
    main = fake_root / "etc/ssh/sshd_config"
    original = main.read_text().replace("Include /etc/ssh/sshd_config.d/*.conf\n", "")
    main.write_bytes(original.replace("\n", "\r\n").encode())
    observed, desired, drift = drift_of(control)
    changes = control.plan(observed, desired, drift)
    new_main = {c.system_path: c.content for c in changes.files}["/etc/ssh/sshd_config"]
    assert new_main is not None
    assert b"\r\nInclude /etc/ssh/sshd_config.d/*.conf\r\n" in new_main
    kept = [line for line in new_main.split(b"\r\n") if b"Include restored" not in line and b"Include /" not in line]
    assert b"\r\n".join(kept) == original.replace("\n", "\r\n").encode()  # every other byte as it was


def test_agreeing_directive_elsewhere_is_left_alone(control: SshdControl, fake_root: Path) -> None:
    (fake_root / "etc/ssh/sshd_config.d/50-cloud.conf").write_text("PermitRootLogin no\nPasswordAuthentication no\n")
    observed, desired, drift = drift_of(control)
    changes = control.plan(observed, desired, drift)
    assert "/etc/ssh/sshd_config.d/50-cloud.conf" not in {c.system_path for c in changes.files}


def test_prohibit_password_and_without_password_are_the_same_value(control: SshdControl, fake_root: Path) -> None:
    config = parse_config("ssh: {port: 22, permit_root_login: prohibit-password, password_authentication: false}")
    (fake_root / "etc/ssh/sshd_config.d/50-x.conf").write_text("PermitRootLogin without-password\n")
    desired = control.desired(config, NO_SSH)
    observed = control.observe(desired)
    drift = control.diff(observed, desired)
    assert drift is not None
    assert not any(i.where.endswith("50-x.conf") for i in drift.items)


def test_extra_port_and_listenaddress_with_another_port_are_conflicts(control: SshdControl, fake_root: Path) -> None:
    main = fake_root / "etc/ssh/sshd_config"
    main.write_text(
        main.read_text() + "Port 22\nListenAddress 0.0.0.0:22\nListenAddress [::]:2222\nListenAddress 10.0.0.1\n"
    )
    observed, desired, drift = drift_of(control)
    conflicts = [(i.what, i.actual) for i in drift.items if i.where == "/etc/ssh/sshd_config"]
    assert ("port", "22") in conflicts and ("listenaddress", "0.0.0.0:22") in conflicts
    assert ("listenaddress", "[::]:2222") not in conflicts and ("listenaddress", "10.0.0.1") not in conflicts


def test_removed_include_is_restored_before_the_first_directive(control: SshdControl, fake_root: Path) -> None:
    main = fake_root / "etc/ssh/sshd_config"
    original = main.read_text()
    main.write_text(original.replace("Include /etc/ssh/sshd_config.d/*.conf\n", ""))
    observed, desired, drift = drift_of(control)
    assert any(i.what == "include" for i in drift.items)
    changes = control.plan(observed, desired, drift)
    new_main = {c.system_path: text_of(c) for c in changes.files}["/etc/ssh/sshd_config"]
    directives = [line for line in new_main.splitlines() if line.strip() and not line.startswith("#")]
    assert directives[0] == "Include /etc/ssh/sshd_config.d/*.conf"
    assert new_main.startswith("\n# This is the sshd server system-wide configuration file.")


def test_include_inside_a_match_block_does_not_count(control: SshdControl, fake_root: Path) -> None:
    main = fake_root / "etc/ssh/sshd_config"
    text = main.read_text().replace("Include /etc/ssh/sshd_config.d/*.conf\n", "")
    main.write_text(text + "Match User backup\n    Include /etc/ssh/sshd_config.d/*.conf\n")
    _, _, drift = drift_of(control)
    assert any(i.what == "include" for i in drift.items)


def test_symlink_at_the_dropin_path_is_drift_and_is_replaced_not_followed(
    control: SshdControl, fake_root: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, fake_root / "etc/ssh/sshd_config.d/00-vps-agent.conf")
    observed, desired, drift = drift_of(control)
    assert any(i.what == "agent drop-in" and "symlink" in i.actual for i in drift.items)
    changes = control.plan(observed, desired, drift)
    assert changes.files[0].system_path == "/etc/ssh/sshd_config.d/00-vps-agent.conf"


def test_compliant_after_the_plan_is_applied(control: SshdControl) -> None:
    observed, desired, drift = drift_of(control)
    for change in control.plan(observed, desired, drift).files:
        change.path.write_bytes(text_of(change).encode())
    assert control.diff(control.observe(desired), desired) is None


def test_invalid_current_config_is_an_observe_error_naming_file_and_line(
    fake_root: Path, commands: DeclaredCommands
) -> None:
    from agent.controls.base import ObserveError

    root = SystemRoot.at(fake_root)
    fake_sshd.install(commands, root, reject="/etc/ssh/sshd_config line 3: Bad configuration option: \\377garbage")
    with pytest.raises(ObserveError, match="sshd_config line 3"):
        guard = ssh_guard(root)
        guard.observe(guard.desired(CONFIG, NO_SSH))


def test_oversized_sshd_config_is_refused_before_sshd_reads_it(fake_root: Path, commands: DeclaredCommands) -> None:
    from agent.controls.base import ObserveError

    root = SystemRoot.at(fake_root)
    fake_sshd.install(commands, root)
    with open(fake_root / "etc/ssh/sshd_config", "a") as handle:
        handle.write("# padding\n" * 1_100_000)
    with pytest.raises(ObserveError, match="over the 1048576-byte limit"):
        guard = ssh_guard(root)
        guard.observe(guard.desired(CONFIG, NO_SSH))


# ---- Ubuntu 22.10+: sshd started by ssh.socket -----------------------------------------------------


def _socket_activated(fake_root: Path) -> None:
    wants = fake_root / "etc/systemd/system/sockets.target.wants"
    wants.mkdir(parents=True)
    (wants / "ssh.socket").symlink_to("/lib/systemd/system/ssh.socket")


def test_where_ssh_socket_listens_the_guard_moves_the_socket_too(control: SshdControl, fake_root: Path) -> None:
    _socket_activated(fake_root)
    observed, desired, drift = drift_of(control)
    assert observed.socket_activated and drift is not None
    assert any(i.what == "ssh.socket ListenStream" and i.actual == "missing" for i in drift.items)
    changes = control.plan(observed, desired, drift)
    socket = {c.system_path: text_of(c) for c in changes.files}["/etc/systemd/system/ssh.socket.d/00-vps-agent.conf"]
    # the unit's own ListenStream (port 22) is reset, then the guard's port for both families
    assert socket.splitlines()[2:] == [
        "[Socket]",
        "ListenStream=",
        "ListenStream=0.0.0.0:2222",
        "ListenStream=[::]:2222",
    ]
    assert any("daemon-reload and restart ssh.socket" in note for note in changes.notes)


def test_during_a_port_move_the_socket_listens_on_both_ports(fake_root: Path, commands: DeclaredCommands) -> None:
    root = SystemRoot.at(fake_root)
    fake_sshd.install(commands, root)
    _socket_activated(fake_root)
    moves = PortMoves(root)
    moves.on_config(CONFIG, frozenset({22}), 1000.0)
    control = ssh_guard(root, moves)
    desired = control.desired(CONFIG, NO_SSH)
    assert [v for k, v in desired.settings if k == "Port"] == ["22", "2222"]
    assert ("LogLevel", "VERBOSE") in desired.settings  # the log names the port of each login: the proof
    listen = [line for line in desired.socket_text.splitlines() if line.startswith("ListenStream=")]
    assert listen == ["ListenStream=", *(f"ListenStream={a}:{p}" for p in (22, 2222) for a in ("0.0.0.0", "[::]"))]


def test_without_socket_activation_no_socket_dropin_is_written(control: SshdControl) -> None:
    observed, desired, drift = drift_of(control)
    assert not observed.socket_activated
    changes = control.plan(observed, desired, drift)
    assert all("ssh.socket" not in c.system_path for c in changes.files)


def test_a_changed_socket_is_reloaded_through_systemd(fake_root: Path, commands: DeclaredCommands) -> None:
    class SystemdHost(SystemRoot):
        @property
        def is_host(self) -> bool:
            return True

    root = SystemdHost(fake_root)
    (fake_root / "run/systemd/system").mkdir(parents=True)
    fake_sshd.install(commands, root)
    commands.expect(["systemctl"])
    _socket_activated(fake_root)
    control = ssh_guard(root)
    desired = control.desired(CONFIG, NO_SSH)
    observed = control.observe(desired)
    drift = control.diff(observed, desired)
    assert drift is not None
    outcome = control.reload(control.plan(observed, desired, drift))
    systemctl = [c for c in commands.calls if c[0] == "systemctl"]
    assert systemctl[:2] == [["systemctl", "daemon-reload"], ["systemctl", "restart", "ssh.socket"]]
    assert outcome.ok and "ssh.socket restarted" in outcome.detail

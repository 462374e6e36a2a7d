"""The accounts guard in the real daemon (`vps-agent run --root`): what it reports and never changes, and
the admin it creates with the real useradd (`useradd --root DIR`, chrooted into the fake root)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.fakeroot import client_key
from tests.integration.harness import StartAgent, wait_for

ACCOUNT_FILES = ("etc/passwd", "etc/shadow", "etc/group")


def account_files(root: Path) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in ACCOUNT_FILES}


def test_root_without_a_password_and_a_second_uid0_account_are_reported_and_left_alone(
    fake_root: Path, start_agent: StartAgent
) -> None:
    shadow = fake_root / "etc/shadow"
    shadow.write_text("root::19000:0:99999:7:::\n" + shadow.read_text().split("\n", 1)[1])
    with (fake_root / "etc/passwd").open("a") as passwd:
        passwd.write("toor:x:0:0::/root:/bin/bash\n")
    before = account_files(fake_root)
    agent = start_agent(fake_root)
    accounts = agent.status()["accounts"]
    assert accounts["status"] == "drifted", accounts
    assert accounts["facts"]["uid0"] == "root,toor" and accounts["facts"]["root_password"] == "empty"
    assert any(d.startswith("/etc/shadow: finding: root password is empty") for d in accounts["drift"])
    assert any(d.startswith("/etc/passwd:5: finding: uid-0 account toor") for d in accounts["drift"])
    status = agent.ctl("status")
    assert status.returncode == 1, status.stdout
    assert "accounts  drifted" in status.stdout and "uid-0 account toor" in status.stdout
    reported = agent.wait_event("drift-detected", control="accounts")
    assert len(reported["findings"]) == 2
    assert account_files(fake_root) == before  # reported, never "fixed"
    assert "drift-reverted" not in [e["event"]["action"] for e in agent.events() if e.get("control") == "accounts"]

    # the admin fixes both by hand: the guard sees it at once and is compliant again
    (fake_root / "etc/passwd").write_bytes(before["etc/passwd"].replace(b"toor:x:0:0::/root:/bin/bash\n", b""))
    shadow.write_text("root:*:19000:0:99999:7:::\n" + shadow.read_text().split("\n", 1)[1])
    wait_for(lambda: agent.status()["accounts"]["status"] == "compliant", what="the findings to clear")
    assert agent.status()["accounts"]["facts"]["root_password"] == "locked"
    assert agent.ctl("status").returncode == 0


def let_accounts_through(root: Path) -> None:
    """Search (not read) permission for everyone on the fake root's ancestors, as / and /home have on a
    host: the agent writes the admin's keys as the admin, who must reach its home below pytest's 0700 dir."""
    for directory in root.parents:
        mode = stat.S_IMODE(directory.stat().st_mode)
        if not mode & stat.S_IXOTH:
            os.chmod(directory, mode | stat.S_IXOTH)


def test_the_admin_in_the_config_is_created_by_the_real_useradd_and_its_key_kept(
    fake_root: Path, start_agent: StartAgent
) -> None:
    let_accounts_through(fake_root)
    key = client_key().decode().strip()
    config = fake_root / "etc/vps-agent/config.yaml"
    config.write_text(
        config.read_text() + f'accounts:\n  admin_user: deploy\n  create_admin: true\n  admin_keys: ["{key}"]\n'
    )
    agent = start_agent(fake_root)
    created = agent.wait_event("drift-reverted", control="accounts")
    assert "create user deploy (useradd --create-home --home-dir /home/deploy --shell /bin/bash" in created["message"]
    [entry] = [line for line in (fake_root / "etc/passwd").read_text().splitlines() if line.startswith("deploy:")]
    name, _, uid, _, comment, home, shell = entry.split(":")
    assert (home, shell, comment) == ("/home/deploy", "/bin/bash", "admin created by vps-agent")
    [sudo] = [line for line in (fake_root / "etc/group").read_text().splitlines() if line.startswith("sudo:")]
    assert "deploy" in sudo.split(":")[3].split(",")
    [hashed] = [
        line.split(":")[1] for line in (fake_root / "etc/shadow").read_text().splitlines() if line.startswith("deploy:")
    ]
    assert hashed.startswith(("!", "*"))  # no password: the config never carries one
    ssh_dir = fake_root / "home/deploy/.ssh"
    keys = ssh_dir / "authorized_keys"
    assert keys.read_text() == key + "\n"
    for path, mode in ((ssh_dir, 0o700), (keys, 0o600)):
        info = path.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (mode, int(uid)), path
    accounts = agent.status()["accounts"]
    assert accounts["status"] in ("healed", "compliant"), accounts
    assert accounts["facts"]["admin_user"] == "deploy has a key but no usable password for sudo and no NOPASSWD rule"
    assert any("warning: admin user deploy can log in but has no password for sudo" in d for d in accounts["drift"])
    assert agent.ctl("status").returncode == 0  # a warning does not make the machine non-compliant

    # its key removed: added back at once; its authorized_keys made group-writable: reported, not touched
    mark = agent.mark()
    keys.unlink()
    agent.wait_event("drift-reverted", mark, control="accounts")
    assert keys.read_text() == key + "\n" and stat.S_IMODE(keys.stat().st_mode) == 0o600
    os.chmod(keys, 0o660)
    wait_for(lambda: agent.status()["accounts"]["status"] == "drifted", what="the writable authorized_keys")
    drift = agent.status()["accounts"]["drift"]
    assert any(
        d.startswith("/home/deploy/.ssh/authorized_keys: finding: login files of deploy is writable") for d in drift
    )
    assert stat.S_IMODE(keys.stat().st_mode) == 0o660
    assert agent.ctl("status").returncode == 1

"""The strict guard in the real daemon against a fake root: under profile: strict its three files appear, a
tamper or a removal is reverted and reported, a loaded module blocks only its own lines; under baseline the
guard is off and writes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.fakeroot import CONFIG, make_root
from tests.integration.harness import Agent, StartAgent, wait_for

STRICT = CONFIG + "profile: strict\n"
FILES = (
    "etc/systemd/coredump.conf.d/vps-agent.conf",
    "etc/security/limits.d/vps-agent-core.conf",
    "etc/modprobe.d/vps-agent-blacklist.conf",
)


def strict_root(path: Path) -> Path:
    """A fake root under strict with the three directories the .deb ships (packaging/debian/vps-agent.dirs)."""
    root = make_root(path, config=STRICT)
    for name in FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
    return root


def row(agent: Agent) -> dict[str, Any]:
    return agent.status()["strict"]


def test_strict_writes_and_keeps_its_files(tmp_path: Path, start_agent: StartAgent) -> None:
    root = strict_root(tmp_path / "root")
    agent = start_agent(root)
    wait_for(lambda: all((root / f).is_file() for f in FILES) and row(agent)["status"] in ("healed", "compliant"))
    assert "Storage=none" in (root / FILES[0]).read_text()
    assert "install usb-storage /bin/false" in (root / FILES[2]).read_text()
    mark = agent.mark()
    (root / FILES[1]).write_text("* hard core unlimited\n")
    reverted = agent.wait_event("drift-reverted", mark, control="strict")
    assert reverted["file"]["path"] == "/" + FILES[1]
    assert (root / FILES[1]).read_text().endswith("* hard core 0\n")
    mark = agent.mark()
    (root / FILES[2]).unlink()
    agent.wait_event("drift-reverted", mark, control="strict")
    assert "install dccp /bin/false" in (root / FILES[2]).read_text()


def test_login_defs_and_the_banners_are_edited_and_a_sed_i_is_reverted(tmp_path: Path, start_agent: StartAgent) -> None:
    root = strict_root(tmp_path / "root")
    debian = (Path(__file__).parent.parent / "data/login.defs.debian12").read_text()
    (root / "etc/login.defs").write_text(debian)
    (root / "etc/issue").write_text("Debian GNU/Linux 12 \\n \\l\n\n")
    agent = start_agent(root)
    kept = ["UMASK\t027", "SHA_CRYPT_MIN_ROUNDS\t65536", "SHA_CRYPT_MAX_ROUNDS\t65536"]

    def active() -> list[str]:
        lines = (root / "etc/login.defs").read_text().splitlines()
        return [
            line
            for line in lines
            if line.split()[:1] and line.split()[0] in ("UMASK", "SHA_CRYPT_MIN_ROUNDS", "SHA_CRYPT_MAX_ROUNDS")
        ]

    wait_for(lambda: active() == kept and row(agent)["status"] in ("healed", "compliant"), 10, "login.defs kept")
    assert "monitored and logged" in (root / "etc/issue").read_text()
    assert "monitored and logged" in (root / "etc/issue.net").read_text()
    mark = agent.mark()
    text = (root / "etc/login.defs").read_text().replace("UMASK\t027\n", "UMASK\t022\n")
    staged = root / "etc/.login.defs.sed"
    staged.write_text(text)
    staged.rename(root / "etc/login.defs")  # sed -i: a new file renamed over the old
    reverted = agent.wait_event("drift-reverted", mark, control="strict")
    assert reverted["file"]["path"] == "/etc/login.defs" and sorted(active()) == sorted(kept)
    assert (root / "etc/login.defs").read_text().startswith(debian.split("UMASK")[0])  # the admin's lines stay


def test_a_loaded_module_blocks_only_its_lines(tmp_path: Path, start_agent: StartAgent) -> None:
    root = strict_root(tmp_path / "root")
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc/modules").write_text("sctp 409600 4 - Live 0x0\next4 1 2 - Live 0x0\n")
    agent = start_agent(root)
    wait_for(lambda: row(agent)["status"] == "blocked", 10, "strict blocked")
    [held] = row(agent)["held"]
    assert held["setting"] == "install sctp /bin/false" and "sctp is loaded now" in held["reason"]
    blacklist = (root / FILES[2]).read_text()
    assert "sctp" not in blacklist and "install tipc /bin/false" in blacklist
    assert (root / FILES[0]).is_file() and (root / FILES[1]).is_file()


def test_baseline_leaves_the_guard_off(tmp_path: Path, start_agent: StartAgent) -> None:
    root = make_root(tmp_path / "root", config=CONFIG)
    agent = start_agent(root)
    assert row(agent)["status"] == "disabled"
    assert not any((root / f).exists() for f in FILES)

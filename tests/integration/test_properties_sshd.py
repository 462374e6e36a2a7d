"""Property, with the real sshd: whatever an admin's drop-in holds and however sshd_config was tampered
with, one heal of the SSH guard leaves a configuration in which `sshd -T` itself reads the baseline (port
2222, no root login, no passwords; for root coming from outside too, where Match blocks apply), a second
look finds nothing to heal, and every line the agent did not neutralise is byte-identical: line ends (CRLF,
a last line without one) included.

The heal is the real one (tests/integration/sshd_heal_worker.py: the daemon's transaction, in the daemon's
own private mount namespace over a fake root); the files are generated: guarded keywords with conflicting
values and harmless ones, any case, `Keyword value` or `Keyword=value`, comments, blank lines, trailing
blanks, CRLF, Match blocks, the main file's Include removed or a directive planted above it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.controls.ssh.sshd_config import sshd_lines
from tests.fakeroot import make_root

ADMIN_FILE = "etc/ssh/sshd_config.d/50-admin.conf"
MAIN = "etc/ssh/sshd_config"
INCLUDE = "Include /etc/ssh/sshd_config.d/*.conf"
BASELINE = {"port": ["2222"], "permitrootlogin": ["no"], "passwordauthentication": ["no"]}
MARK = "# [vps-agent "
REPO = Path(__file__).resolve().parents[2]

GUARDED = {
    "PermitRootLogin": ["yes", "no", "prohibit-password", "without-password", "forced-commands-only"],
    "PasswordAuthentication": ["yes", "no"],
    "Port": ["22", "2222", "2200"],
}
HARMLESS = {
    "X11Forwarding": ["yes", "no"],
    "MaxAuthTries": ["3", "6", "10"],
    "ClientAliveInterval": ["0", "300"],
    "AcceptEnv": ["LANG LC_*", "EDITOR"],
    "LoginGraceTime": ["30", "2m"],
    "UseDNS": ["no"],
    "Banner": ["none"],
}
# what sshd_config(5) allows after a Match line (Port, UseDNS, LoginGraceTime are global only)
IN_MATCH = {
    "PermitRootLogin": GUARDED["PermitRootLogin"],
    "PasswordAuthentication": GUARDED["PasswordAuthentication"],
    **{k: HARMLESS[k] for k in ("X11Forwarding", "MaxAuthTries", "ClientAliveInterval", "AcceptEnv", "Banner")},
}
MATCHES = ["Match User root", "Match Address 203.0.113.0/24", "Match all", "Match Group sudo"]


def spelled(keyword: str) -> st.SearchStrategy[str]:
    return st.sampled_from([keyword, keyword.lower(), keyword.upper()])


@st.composite
def directive(draw: st.DrawFn, pool: dict[str, list[str]]) -> str:
    keyword = draw(st.sampled_from(sorted(pool)))
    separator = draw(st.sampled_from([" ", "\t", "=", " = ", "  "]))
    indent = draw(st.sampled_from(["", "", "  ", "\t"]))
    trailing = draw(st.sampled_from(["", "", " ", "\t "]))
    return f"{indent}{draw(spelled(keyword))}{separator}{draw(st.sampled_from(pool[keyword]))}{trailing}"


COMMENT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(lambda t: "#" + t)
LINE = st.one_of(directive(GUARDED), directive(HARMLESS), COMMENT, st.sampled_from(["", "   "]))


@st.composite
def admin_file(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(LINE, max_size=12))
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from(MATCHES)))
        lines += draw(st.lists(st.one_of(directive(IN_MATCH), COMMENT), min_size=1, max_size=4))
    ends = draw(st.sampled_from(["\n", "\r\n", "mixed"]))
    out = ""
    for index, line in enumerate(lines):
        end = ends if ends != "mixed" else draw(st.sampled_from(["\n", "\r\n"]))
        out += line + ("" if index == len(lines) - 1 and draw(st.booleans()) else end)
    return out.encode()


@dataclass(frozen=True)
class MainTamper:
    remove_include: bool
    planted: str | None  # a directive put above everything (where the Include would be read too late)


MAIN_TAMPER = st.builds(MainTamper, st.booleans(), st.one_of(st.none(), directive(GUARDED)))


class Worker:
    def __init__(self, root: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        argv = [sys.executable, "-m", "tests.integration.sshd_heal_worker", str(root)]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env
        )

    def heal(self) -> dict[str, object]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("heal\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the heal worker died (exit {self.process.poll()})"
        answer: dict[str, object] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(30)


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, bytes, Worker]]:
    root = make_root(tmp_path_factory.mktemp("sshd-property") / "root")
    stock = (root / MAIN).read_bytes()
    worker = Worker(root)
    try:
        yield root, stock, worker
    finally:
        worker.close()


def listening(effective: object) -> object:
    if not isinstance(effective, dict):
        return effective  # sshd -T's error
    return {**effective, "port": sorted(set(effective.get("port", [])))}


def kept_or_neutralised(before: bytes, after: bytes) -> list[str]:
    """What differs other than lines commented out with the agent's marker, their ends kept."""
    old, new = sshd_lines(before.decode()), sshd_lines(after.decode())
    if len(old) != len(new):
        return [f"{len(old)} lines became {len(new)}"]
    wrong = []
    for number, (was, now) in enumerate(zip(old, new, strict=True), start=1):
        if now == was:
            continue
        end = was[len(was.rstrip("\r\n")) :]
        if not (now.startswith(MARK) and now.endswith(was.strip() + end)):
            wrong.append(f"line {number}: {was!r} became {now!r}")
    return wrong


@settings(max_examples=100 if os.environ.get("CI") == "true" else 50)  # about 0.1 s each (three sshd runs)
@given(admin=admin_file(), tamper=MAIN_TAMPER)
@example(admin=b"PermitRootLogin yes\r\nX11Forwarding no", tamper=MainTamper(False, None))
@example(admin=b"Match User root\nPermitRootLogin yes\n", tamper=MainTamper(True, "port 22"))
@example(admin=b"# a page\x0cbreak\nPasswordAuthentication=yes\n", tamper=MainTamper(False, "PermitRootLogin yes"))
def test_one_heal_gives_sshd_the_baseline_and_keeps_every_other_byte(
    fake: tuple[Path, bytes, Worker], admin: bytes, tamper: MainTamper
) -> None:
    root, stock, worker = fake
    dropins = root / "etc/ssh/sshd_config.d"
    shutil.rmtree(dropins)
    dropins.mkdir()
    main = stock
    if tamper.remove_include:
        main = main.replace(INCLUDE.encode() + b"\n", b"")
    if tamper.planted is not None:
        main = tamper.planted.encode() + b"\n" + main
    (root / MAIN).write_bytes(main)
    (root / ADMIN_FILE).write_bytes(admin)

    answer = worker.heal()

    assert answer["status"] == "healed", answer["detail"]
    # an agreeing `Port 2222` of the admin's stays: sshd -T then lists 2222 twice, and sshd listens once
    # (the second bind fails "Address already in use", logged, harmless), so the ports count as a set
    assert listening(answer["effective"]) == BASELINE, answer
    assert listening(answer["root_from_outside"]) == BASELINE, answer
    assert answer["again"] == "compliant", answer
    assert kept_or_neutralised(admin, (root / ADMIN_FILE).read_bytes()) == []
    healed_main = (root / MAIN).read_bytes()
    if tamper.remove_include:  # the Include comes back (with its marker line) and nothing else changes
        lines = sshd_lines(healed_main.decode())
        restored = [n for n, line in enumerate(lines) if line.strip() == INCLUDE]
        assert len(restored) == 1 and lines[restored[0] - 1].startswith(MARK), healed_main
        healed_main = "".join(lines[: restored[0] - 1] + lines[restored[0] + 1 :]).encode()
    assert kept_or_neutralised(main, healed_main) == []

"""Property: whatever a later jail.d/*.local (or jail.local) holds, the fail2ban guard's plan leaves a file
in which fail2ban reads the agent's values for the sshd jail, changes nothing else fail2ban reads, and
keeps every line it did not neutralise byte for byte.

"What fail2ban reads" is fail2ban's own parser settings on the standard library's ConfigParser
(fail2ban/client/configparserinc.py: `inline_comment_prefixes=";"`, strict, reading a file with universal
newlines): the model the effective state (`fail2ban-client -d`) is built from (checked against fail2ban
1.0.2's own SafeConfigParserWithIncludes on the regression cases in test_fail2ban_control.py). The files are generated:
sections the agent guards and others, odd spellings of headers, guarded and unguarded keys in any case,
`=` and `:`, inline comments, continued values, comments, blank lines, CRLF.
"""

from __future__ import annotations

import configparser
import io
import tempfile
from pathlib import Path

from hypothesis import assume, example, given
from hypothesis import strategies as st

from agent.config import Config, Fail2banConfig, SshConfig
from agent.controls.fail2ban import KEYS, MARKER, Fail2banControl, Fail2banDesired, Fail2banObserved, agrees
from agent.paths import SystemRoot
from agent.system.netfilter import Backend
from tests.guards import SSH_2222

LATER = "/etc/fail2ban/jail.d/zzz-admin.local"
CONFLICTING = {
    "enabled": ["false", "no", "0", "true", "True"],
    "port": ["22", "2222", "ssh", "22,2222", "2222\n    22"],
    "maxretry": ["3", "5", "10"],
    "findtime": ["600", "10m", "1h", "600 ; ten minutes"],
    "bantime": ["3600", "1h", "-1", "60m"],
    "ignoreip": ["127.0.0.1/8 ::1", "10.0.0.0/8", "127.0.0.1/8  ::1"],
    "banaction": ["iptables-multiport", "nftables-multiport", "ufw"],
    "backend": ["systemd", "auto", "polling"],
    "journalmatch": ["_SYSTEMD_UNIT=ssh.service", "_COMM=sshd"],
    "mode": ["aggressive", "normal"],
}
OTHER_KEYS = ["logpath", "filter", "action", "usedns", "chain", "enabled_not", "port.x"]


def _model(text: str) -> dict[str, dict[str, str]]:
    """What fail2ban's parser reads from one file: section -> option -> value (the file's own, no DEFAULT)."""
    parser = configparser.ConfigParser(inline_comment_prefixes=";", interpolation=None)
    parser.read_file(io.StringIO(text, newline=None))
    return {name: dict(parser.items(name, raw=True)) for name in parser.sections()} | {
        "DEFAULT": dict(parser.defaults())
    }


def _own_options(text: str, section: str) -> dict[str, str]:
    parser = configparser.ConfigParser(inline_comment_prefixes=";", interpolation=None, default_section="\0none")
    parser.read_file(io.StringIO(text, newline=None))
    return dict(parser.items(section, raw=True)) if parser.has_section(section) else {}


def _parses(text: str) -> bool:
    try:
        _model(text)
    except configparser.Error:
        return False
    return True


headers = {
    "sshd": ["[sshd]", "[sshd]  ", "[sshd] # the admin's", "[sshd]\t; note", " [sshd]"],
    "DEFAULT": ["[DEFAULT]"],
    "recidive": ["[recidive]"],
    "SSHD": ["[SSHD]"],
    " sshd ": ["[ sshd ]"],
    "nginx-http-auth": ["[nginx-http-auth]"],
}
spellings = st.sampled_from(["{k} = {v}", "{k}={v}", "{k} : {v}", "{k}\t=\t{v}", "{k} = {v} ; inline", "{k}= {v}  "])
fillers = st.sampled_from(["", "# a comment", "; a comment", "   ", "#enabled = false", "\t# indented comment"])


@st.composite
def jail_files(draw: st.DrawFn) -> str:
    lines: list[str] = draw(st.lists(fillers, max_size=2))
    for name in draw(st.lists(st.sampled_from(sorted(headers)), min_size=1, max_size=4, unique=True)):
        lines.append(draw(st.sampled_from(headers[name])))
        for key in draw(st.lists(st.sampled_from([*KEYS, *OTHER_KEYS]), max_size=6, unique=True)):
            spelled = draw(st.sampled_from([key, key.upper(), key.capitalize()]))
            value = draw(st.sampled_from(CONFLICTING.get(key, ["x", "a b", "%(known/port)s"])))
            first, *rest = value.split("\n")
            line = draw(spellings).format(k=spelled, v=first)
            if draw(st.integers(0, 9)) == 0:
                line = "  " + line  # indented: a continuation of the value before it, or an option
            lines.append(line)
            lines.extend(rest)
            lines.extend(draw(st.lists(fillers, max_size=1)))
    ending = draw(st.sampled_from(["\n", "\r\n"]))
    return ending.join(lines) + draw(st.sampled_from([ending, ""]))


def _control(tmp_path: Path, later: str) -> tuple[Fail2banControl, Fail2banDesired, Fail2banObserved]:
    root = SystemRoot.at(tmp_path)
    jail_d = tmp_path / "etc/fail2ban/jail.d"
    jail_d.mkdir(parents=True, exist_ok=True)
    (jail_d / "zzz-admin.local").write_bytes(later.encode())
    control = Fail2banControl(root, detect_backend=lambda: Backend("nft"))
    desired = control.desired(Config(ssh=SshConfig(port=2222), fail2ban=Fail2banConfig()), SSH_2222)
    observed = Fail2banObserved(
        dict(desired.effective), desired.text.encode(), None, control._later_files(), None, running=None
    )
    return control, desired, observed


def _planned(control: Fail2banControl, desired: Fail2banDesired, observed: Fail2banObserved) -> str | None:
    drift = control.diff(observed, desired)
    if drift is None:
        return None
    changes = control.plan(observed, desired, drift)
    edited = [c for c in changes.files if c.system_path == LATER]
    assert all(c.system_path == LATER for c in changes.files), [c.system_path for c in changes.files]
    return (edited[0].content or b"").decode() if edited else None


@given(jail_files())
@example("[sshd]\r\nenabled = false\r\nlogpath = /var/log/x\r\n")
@example("[sshd] # the admin's\nenabled = false\n")
@example("[sshd]\n  enabled = false\n")
@example("[ sshd ]\nenabled = false\n")
def test_a_later_local_healed_reads_as_the_agents_jail_and_keeps_every_other_line(text: str) -> None:
    assume(_parses(text))  # a file fail2ban refuses is an observe error (fail2ban-client -d), not a plan
    with tempfile.TemporaryDirectory(prefix="f2b-prop-") as tmp:
        control, desired, observed = _control(Path(tmp), text)
        after = _planned(control, desired, observed)
    result = text if after is None else after
    # 1. fail2ban reads the agent's values for the sshd jail from this file, or none
    own = _own_options(result, "sshd")
    wrong = {k: v for k, v in own.items() if k in desired.effective and not agrees(k, v, desired.effective[k])}
    assert not wrong, f"still read from {LATER}: {wrong}\n{result!r}"
    if after is None:
        return
    # 2. every line not neutralised is byte for byte what it was, its line end too (a neutralised last line
    # without one gets one)
    before_lines, after_lines = text.split("\n"), after.split("\n")
    if len(after_lines) == len(before_lines) + 1 and after_lines[-1] == "":
        after_lines.pop()
    assert len(after_lines) == len(before_lines), (text, after)
    for old, new in zip(before_lines, after_lines, strict=True):
        assert new == old or new.startswith(f"# [{MARKER}"), f"{old!r} became {new!r}"
    # 3. nothing else fail2ban reads changed: other sections, unguarded keys, agreeing values
    before_model, after_model = _model(text), _model(after)
    for section, options in before_model.items():
        for key, value in options.items():
            conflicting = section == "sshd" and key in desired.effective
            if not (conflicting and not agrees(key, value, desired.effective[key])):
                assert after_model.get(section, {}).get(key) == value, f"[{section}] {key} = {value!r} lost: {after!r}"


@given(jail_files())
def test_jail_local_is_never_edited(text: str) -> None:
    """jail.local is read before jail.d/*.local: the agent's file wins over it, so it is never the agent's to edit."""
    with tempfile.TemporaryDirectory(prefix="f2b-prop-") as tmp:
        control, desired, observed = _control(Path(tmp), "")
        (Path(tmp) / "etc/fail2ban/jail.local").write_bytes(text.encode())
        observed = Fail2banObserved(
            dict(desired.effective), desired.text.encode(), None, control._later_files(), None, running=None
        )
        drift = control.diff(observed, desired)
        changes = control.plan(observed, desired, drift) if drift is not None else None
    assert changes is None or all(not c.system_path.endswith("jail.local") for c in changes.files)

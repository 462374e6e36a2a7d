"""`vps-agentctl enforce` edits one key in place: the admin's comments, order, quoting and every other key
stay byte-identical; a file the loader refuses is refused before anything is written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.cli import EXIT_ERROR, main
from agent.config import UneditableConfig, parse_config, set_key

REPO = Path(__file__).resolve().parents[2]
ADMINS = """# my host: nginx on 80 and 443
ssh:
  port: 2222   # moved off 22

firewall:
  # the web server
  allow_tcp: [80, 443]
  mode: report   # until I am sure
  poll_interval: 1s
"""


def enforce(text: str) -> str:
    edited = set_key(text, "firewall", "mode", "enforce")
    assert parse_config(edited).firewall.mode == "enforce"
    return edited


def test_only_the_value_changes_and_every_comment_stays() -> None:
    assert enforce(ADMINS) == ADMINS.replace("mode: report   # until", "mode: enforce   # until")


def test_a_quoted_value_is_replaced_whole() -> None:
    assert enforce('firewall:\n  mode: "report"\n') == "firewall:\n  mode: enforce\n"


def test_a_section_without_the_key_gets_it_as_its_first_line_indented_like_the_others() -> None:
    text = "firewall:\n    # web\n    allow_tcp: [80]\nssh: {port: 22}\n"
    assert enforce(text) == "firewall:\n    mode: enforce\n    # web\n    allow_tcp: [80]\nssh: {port: 22}\n"


def test_a_file_without_a_firewall_section_gets_one_appended() -> None:
    text = "ssh:\n  port: 2222\n# the end"
    assert enforce(text) == "ssh:\n  port: 2222\n# the end\nfirewall:\n  mode: enforce\n"


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "---\n"])
def test_an_empty_file_gets_the_section(text: str) -> None:
    assert enforce(text) == text + "firewall:\n  mode: enforce\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("firewall: {allow_tcp: [80], mode: report}\n", "firewall: {allow_tcp: [80], mode: enforce}\n"),
        ("firewall: {allow_tcp: [80]}\n", "firewall: {mode: enforce, allow_tcp: [80]}\n"),
        ("firewall: {}\n", "firewall: {mode: enforce}\n"),
        ("{ssh: {port: 22}}\n", "{firewall: {mode: enforce}, ssh: {port: 22}}\n"),
    ],
)
def test_a_flow_style_mapping_is_edited_inside_its_braces(text: str, expected: str) -> None:
    assert enforce(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("firewall:\nssh: {}\n", "firewall: {mode: enforce}\nssh: {}\n"),
        ("firewall: ~  # later\n", "firewall: {mode: enforce}  # later\n"),
    ],
)
def test_an_empty_firewall_section_becomes_a_flow_mapping(text: str, expected: str) -> None:
    assert enforce(text) == expected


def test_already_enforcing_is_the_same_text() -> None:
    text = "firewall:\n  mode: enforce  # yes\n"
    assert set_key(text, "firewall", "mode", "enforce") is text


def test_the_shipped_example_changes_on_its_mode_line_only() -> None:
    example = (REPO / "config.example.yaml").read_text()
    report = example.replace("\n  mode: enforce\n  # Inbound TCP", "\n  mode: report\n  # Inbound TCP")
    assert report != example
    assert enforce(report) == example


@pytest.mark.parametrize("text", ["- a list\n", "firewall: [1, 2]\n", "firewall: {mode: [report]}\n"])
def test_what_is_not_a_mapping_of_sections_is_refused(text: str) -> None:
    with pytest.raises(UneditableConfig):
        set_key(text, "firewall", "mode", "enforce")


def test_enforce_refuses_a_bad_config_with_its_file_line_error_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "etc/vps-agent/config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("firewall:\n  mode: report\n  alow_tcp: [80]\n")
    before = os.stat(config)
    assert main(["--root", str(tmp_path), "enforce"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert f"{config}:3:3: firewall.alow_tcp" in err and "nothing changed" in err
    assert config.read_text() == "firewall:\n  mode: report\n  alow_tcp: [80]\n"
    assert os.stat(config).st_ino == before.st_ino and os.stat(config).st_mtime_ns == before.st_mtime_ns


def _fake_root_config(tmp_path: Path, text: str) -> Path:
    config = tmp_path / "etc/vps-agent/config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(text)
    return config


def test_enforce_refuses_to_cut_a_listener_without_yes_and_cuts_it_with_yes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent import cli
    from agent.console import enforce as console_enforce
    from agent.controls.firewall.exposure import WouldCut

    nginx = WouldCut(80, "tcp", None, "root", "nginx.service")
    monkeypatch.setattr(console_enforce, "read_would_cut", lambda firewall, ssh: (nginx,))
    config = _fake_root_config(tmp_path, ADMINS)
    socket = str(tmp_path / "no.sock")
    assert main(["--root", str(tmp_path), "--socket", socket, "enforce"]) == cli.EXIT_DRIFT
    assert "would cut off 80/tcp (nginx.service); nothing changed" in capsys.readouterr().err
    assert config.read_text() == ADMINS
    # --yes: the file is edited in place; the daemon is down here (3): it enforces when it starts
    assert main(["--root", str(tmp_path), "--socket", socket, "enforce", "--yes"]) == cli.EXIT_UNREACHABLE
    out = capsys.readouterr()
    assert "cutting off 80/tcp (nginx.service) (--yes)" in out.out and "enforces when it starts" in out.err
    assert config.read_text() == ADMINS.replace("mode: report   # until", "mode: enforce   # until")


def test_enforce_with_nothing_to_cut_just_enforces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent import cli
    from agent.console import enforce as console_enforce

    monkeypatch.setattr(console_enforce, "read_would_cut", lambda firewall, ssh: ())
    config = _fake_root_config(tmp_path, "firewall: {mode: report, allow_tcp: [80]}\n")
    assert main(["--root", str(tmp_path), "--socket", str(tmp_path / "no.sock"), "enforce"]) == cli.EXIT_UNREACHABLE
    assert config.read_text() == "firewall: {mode: enforce, allow_tcp: [80]}\n"
    assert f"{config}: firewall.mode: enforce" in capsys.readouterr().out

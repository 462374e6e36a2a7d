"""The events: section's outputs: journald, remote syslog, the Prometheus textfile; bad input names file, line
and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import (
    DEFAULT_PROMETHEUS_TEXTFILE,
    ConfigError,
    EventsConfig,
    SyslogConfig,
    locate_key,
    parse_config,
)


def events(text: str) -> EventsConfig:
    return parse_config("events:\n" + text, source="c.yaml").events


def error_for(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config("events:\n" + text, source="c.yaml")
    return str(caught.value)


def test_defaults_journald_auto_no_syslog_textfile_for_node_exporter() -> None:
    config = parse_config("").events
    assert config.journald is None and config.syslog is None
    assert (
        config.prometheus_textfile == DEFAULT_PROMETHEUS_TEXTFILE == "/var/lib/prometheus/node-exporter/vps_agent.prom"
    )


@pytest.mark.parametrize(("text", "wanted"), [("auto", None), ("true", True), ("false", False), ("yes", True)])
def test_journald_is_auto_true_or_false(text: str, wanted: bool | None) -> None:
    assert events(f"  journald: {text}\n").journald is wanted


@pytest.mark.parametrize(
    ("target", "extra", "wanted"),
    [
        ("udp://logs.example.net", "", ("udp", "logs.example.net", 514, False)),
        ("tcp://10.0.0.5:1514", "", ("tcp", "10.0.0.5", 1514, False)),
        ("tcp://logs.example.net", ", tls: true", ("tcp", "logs.example.net", 6514, True)),
        ("tcp://[2001:db8::1]:601", "", ("tcp", "2001:db8::1", 601, False)),
    ],
)
def test_syslog_target_url(target: str, extra: str, wanted: tuple[str, str, int, bool]) -> None:
    syslog = events(f'  syslog: {{target: "{target}"{extra}}}\n').syslog
    assert syslog is not None and (syslog.protocol, syslog.host, syslog.port, syslog.tls) == wanted
    assert (syslog.target, syslog.buffer, syslog.facility, syslog.ca_file) == (target, 1000, "daemon", None)


def test_syslog_every_key() -> None:
    syslog = events(
        "  syslog:\n    target: tcp://logs:6514\n    tls: true\n    ca_file: /etc/ssl/logs-ca.pem\n"
        "    buffer: 50\n    facility: local3\n"
    ).syslog
    assert syslog == SyslogConfig("tcp://logs:6514", "tcp", "logs", 6514, True, "/etc/ssl/logs-ca.pem", 50, "local3")


URL_HELP = 'a URL "udp://HOST[:PORT]" or "tcp://HOST[:PORT]" (an IPv6 address in brackets)'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '  syslog: {target: "http://logs:514"}\n',
            f"c.yaml:2:20: events.syslog.target: expected {URL_HELP}, got 'http://logs:514'",
        ),
        (
            '  syslog: {target: "tcp://logs:"}\n',
            f"c.yaml:2:20: events.syslog.target: expected {URL_HELP}, got 'tcp://logs:'",
        ),
        (
            '  syslog: {target: "tcp://lo gs"}\n',
            f"c.yaml:2:20: events.syslog.target: expected {URL_HELP}, got 'tcp://lo gs'",
        ),
        (
            '  syslog: {target: "udp://logs:0"}\n',
            f"c.yaml:2:20: events.syslog.target: expected {URL_HELP} with a port 1..65535, got 'udp://logs:0'",
        ),
        (
            '  syslog: {target: "tcp://[fe80::zz]"}\n',
            f"c.yaml:2:20: events.syslog.target: expected {URL_HELP}, got 'tcp://[fe80::zz]'",
        ),
        (
            "  syslog:\n    tls: true\n",
            f"c.yaml:3:5: events.syslog.target: expected {URL_HELP}, got nothing (the key is missing)",
        ),
        (
            "  syslog:\n    target: udp://logs\n    tls: true\n",
            "c.yaml:4:10: events.syslog.tls: expected false with a udp:// target (TLS needs tcp://), got true",
        ),
        (
            "  syslog:\n    target: tcp://logs\n    ca_file: /ca.pem\n",
            "c.yaml:4:14: events.syslog.ca_file: expected null unless tls is true, got '/ca.pem'",
        ),
        (
            "  syslog:\n    target: tcp://logs\n    buffer: 5\n",
            "c.yaml:4:13: events.syslog.buffer: expected an integer 10..1000000, got 5",
        ),
        ("  syslog:\n    target: tcp://logs\n    facility: local9\n", None),
        ("  syslog:\n    target: tcp://logs\n    port: 514\n", None),
        ("  syslog: tcp://logs:514\n", None),
        ("  journald: maybe\n", "c.yaml:2:13: events.journald: expected auto, true or false, got 'maybe'"),
        (
            "  prometheus_textfile: /var/lib/node/vps_agent.txt\n",
            "c.yaml:2:24: events.prometheus_textfile: expected null, or an absolute path of a file ending in .prom "
            "(node_exporter reads only those), got '/var/lib/node/vps_agent.txt'",
        ),
        ("  prometheus_textfile: vps_agent.prom\n", None),
    ],
)
def test_bad_output_settings_name_file_line_and_key(text: str, message: str | None) -> None:
    error = error_for(text)
    if message is not None:
        assert error == message
    else:
        assert error.startswith("c.yaml:") and ": events." in error and " expected " in error


def test_syslog_and_textfile_can_be_switched_off() -> None:
    config = events("  syslog: null\n  prometheus_textfile: null\n")
    assert config.syslog is None and config.prometheus_textfile is None


def test_locate_key_finds_the_line_of_a_setting_checked_only_at_run_time(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("ssh:\n  port: 2222\n\nevents:\n  # metrics\n  prometheus_textfile: /srv/m/vps_agent.prom\n")
    assert locate_key(str(path), "events.prometheus_textfile") == 6
    assert locate_key(str(path), "ssh.port") == 2
    assert locate_key(str(path), "events.syslog") is None
    assert locate_key(str(tmp_path / "missing.yaml"), "ssh.port") is None

"""Remote syslog over TLS (RFC 5425) into Debian's rsyslogd with its openssl driver, the receiving side being
the shipped snippet's rules with its TLS block: the agent checks the collector's certificate against
events.syslog.ca_file, and refuses a collector whose certificate that CA did not sign."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_root_and_tools
from tests.fakeroot import CONFIG, make_root
from tests.integration.harness import REPO, StartAgent, in_netns_of, wait_for

SNIPPET = REPO / "packaging/collectors/rsyslog-vps-agent.conf"
DROPIN = "etc/ssh/sshd_config.d/00-vps-agent.conf"
PORT = 10516


@pytest.fixture(autouse=True)
def _needs_rsyslog_with_openssl() -> None:
    require_root_and_tools("rsyslogd", "openssl", "ip")
    if not list(Path("/usr/lib").glob("*/rsyslog/lmnsd_ossl.so")):
        message = "NOT TESTED: rsyslog's openssl driver is missing (apt-get install rsyslog-openssl)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def make_ca(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for 127.0.0.1 (subjectAltName IP): (ca.pem, cert.pem, key.pem)."""
    directory.mkdir(parents=True)
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "key.pem", "req.csr", "cert.pem"))

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
            "-subj", f"/CN={name} test CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return ca, cert, key


def tls_rsyslog_conf(workdir: Path, ca: Path, cert: Path, key: Path) -> Path:
    """The shipped snippet with its commented TLS block switched on (paths and port replaced) instead of the
    plain TCP and UDP inputs."""
    text = SNIPPET.read_text()
    tls_block = re.search(r"^#   global\(DefaultNetstreamDriver.*?^#   input\(.*?\)$", text, re.M | re.S)
    assert tls_block, "the snippet's TLS block"
    enabled = re.sub(r"^#   ", "", tls_block.group(0), flags=re.M)
    enabled = (
        enabled.replace("/etc/rsyslog-tls/ca.pem", str(ca))
        .replace("/etc/rsyslog-tls/cert.pem", str(cert))
        .replace("/etc/rsyslog-tls/key.pem", str(key))
        .replace('port="6514"', f'port="{PORT}"')
    )
    plain = [
        'module(load="imtcp")',
        'module(load="imudp")',
        'input(type="imtcp" port="514" ruleset="vps-agent")',
        'input(type="imudp" port="514" ruleset="vps-agent")',
    ]
    lines = [line for line in text.splitlines() if not any(line.startswith(p) for p in plain)]
    snippet = "\n".join(lines).replace("/var/log/vps-agent-remote", str(workdir / "out")) + "\n" + enabled + "\n"
    (workdir / "vps-agent.conf").write_text(snippet)
    conf = workdir / "rsyslog.conf"
    conf.write_text(f'global(workDirectory="{workdir}")\ninclude(file="{workdir / "vps-agent.conf"}")\n')
    return conf


def received(workdir: Path) -> list[dict[str, Any]]:
    out = workdir / "out"
    lines = []
    for path in sorted(out.glob("*.jsonl")) if out.is_dir() else []:
        lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines


@contextmanager
def agent_and_tls_collector(
    tmp_path: Path, start_agent: StartAgent, ca_file: Path, conf: Path
) -> Iterator[tuple[Path, Any]]:
    """The agent on a fake root sending its events over TLS (checked against ca_file, read inside the
    root), and rsyslogd on conf listening in the agent's network namespace, until the block ends."""
    config = CONFIG + (
        f"events:\n  syslog:\n    target: tcp://127.0.0.1:{PORT}\n    tls: true\n"
        "    ca_file: /etc/vps-agent/syslog-ca.pem\n"
    )
    root = make_root(tmp_path / "root", config=config)
    (root / "etc/vps-agent/syslog-ca.pem").write_bytes(ca_file.read_bytes())
    agent = start_agent(root)
    in_netns_of(agent.process.pid, "ip", "link", "set", "lo", "up")
    workdir = conf.parent
    argv = [
        "nsenter",
        "-t",
        str(agent.process.pid),
        "-n",
        "rsyslogd",
        "-n",
        "-f",
        str(conf),
        "-i",
        str(workdir / "pid"),
    ]
    rsyslog = subprocess.Popen(argv, stdout=(workdir / "rsyslogd.log").open("w"), stderr=subprocess.STDOUT)
    try:
        yield root, agent
    finally:
        rsyslog.terminate()
        rsyslog.wait(10)


def test_events_reach_rsyslog_over_tls_checked_against_ca_file(tmp_path: Path, start_agent: StartAgent) -> None:
    workdir = tmp_path / "rsyslog"
    ca, cert, key = make_ca(workdir / "pki", "collector")
    conf = tls_rsyslog_conf(workdir, ca, cert, key)
    check = subprocess.run(["rsyslogd", "-N1", "-f", str(conf)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr

    with agent_and_tls_collector(tmp_path, start_agent, ca, conf) as (root, agent):
        mark = agent.mark()
        (root / DROPIN).unlink()
        reverted = agent.wait_event("drift-reverted", mark)

        def delivered() -> list[dict[str, Any]]:
            return [
                m
                for m in received(workdir)
                if m["rfc5424-sd"]["vps-agent@32473"].get("transaction.id") == reverted["transaction"]["id"]
                and m["msgid"] == "drift-reverted"
            ]

        [message] = wait_for(delivered, 30, "the heal over TLS at rsyslog")
        assert message["rfc5424-sd"]["vps-agent@32473"]["file.path"] == reverted["file"]["path"]
        status = json.loads(agent.ctl("status", "--json").stdout)["outputs"]["syslog"]
        assert status["tls"] is True and status["connected"] is True and status["dropped"] == 0


def test_a_collector_certificate_from_another_ca_is_refused(tmp_path: Path, start_agent: StartAgent) -> None:
    workdir = tmp_path / "rsyslog"
    _, cert, key = make_ca(workdir / "pki", "collector")
    other_ca, _, _ = make_ca(tmp_path / "other", "someone else")
    conf = tls_rsyslog_conf(workdir, workdir / "pki/ca.pem", cert, key)
    with agent_and_tls_collector(tmp_path, start_agent, other_ca, conf) as (_, agent):

        def refused() -> str | None:
            syslog = json.loads(agent.ctl("status", "--json").stdout)["outputs"]["syslog"]
            error = syslog["error"] or ""
            return error if "CERTIFICATE_VERIFY_FAILED" in error or "certificate verify failed" in error else None

        wait_for(refused, 30, "the certificate refused")
        assert received(workdir) == []

"""Real TCP between two network namespaces across the agent's firewall: allowed port reachable, another
port not, and an established connection survives a flush and the heal. Addresses 10.214.0.1/30 and
10.214.0.2/30 exist only inside those namespaces."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root_and_tools
from tests.integration.harness import StartAgent, in_netns_of, wait_for

SERVER, CLIENT = "10.214.0.1", "10.214.0.2"
ECHO = """
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(8)
while True:
    conn, _ = srv.accept()
    while data := conn.recv(100):
        conn.sendall(data.upper())
    conn.close()
"""
CLIENT_SCRIPT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
for line in sys.stdin:
    s.sendall(line.strip().encode()); print(s.recv(100).decode(), flush=True)
"""


@pytest.fixture(autouse=True)
def _needs_tools() -> None:
    require_root_and_tools("iptables", "ip6tables", "unshare", "ip", "nsenter")


@pytest.fixture
def client_netns() -> Iterator[str]:
    name = f"vpsa-client-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "delete", name], check=False)


def test_allowed_port_reachable_other_not_established_survives_a_heal(
    tmp_path: Path, client_netns: str, start_agent: StartAgent
) -> None:
    from tests.fakeroot import make_root

    root = make_root(tmp_path / "root", config="ssh: {port: 2222}\nfirewall: {allow_tcp: [8080]}\n")
    agent = start_agent(root)
    pid = str(agent.process.pid)
    veth = f"vpsa{uuid.uuid4().hex[:6]}"
    # the veth pair is made inside the client namespace and one end moved into the daemon's
    steps = [
        ["ip", "netns", "exec", client_netns, "ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "s"],
        ["ip", "netns", "exec", client_netns, "ip", "link", "set", veth + "s", "netns", pid],
        ["ip", "netns", "exec", client_netns, "ip", "addr", "add", f"{CLIENT}/30", "dev", veth],
        ["ip", "netns", "exec", client_netns, "ip", "link", "set", veth, "up"],
        ["nsenter", "-t", pid, "-n", "ip", "addr", "add", f"{SERVER}/30", "dev", veth + "s"],
        ["nsenter", "-t", pid, "-n", "ip", "link", "set", veth + "s", "up"],
        ["nsenter", "-t", pid, "-n", "ip", "link", "set", "lo", "up"],
    ]
    for step in steps:
        subprocess.run(step, check=True)
    servers = [
        subprocess.Popen(["nsenter", "-t", pid, "-n", "/usr/bin/python3", "-c", ECHO, port])
        for port in ("8080", "9090")
    ]
    try:
        wait_for(
            lambda: (
                "dpt:8080" in in_netns_of(agent.process.pid, "iptables", "-nL").stdout
                or "--dport 8080" in in_netns_of(agent.process.pid, "iptables", "-S").stdout
            ),
            5,
            "port 8080 open",
        )

        def connect(port: str, timeout: float = 1.0) -> subprocess.Popen[str]:
            return subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    client_netns,
                    "/usr/bin/python3",
                    "-c",
                    CLIENT_SCRIPT,
                    SERVER,
                    port,
                    str(timeout),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )

        def ask(client: subprocess.Popen[str], word: str) -> str:
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write(word + "\n")
            client.stdin.flush()
            return client.stdout.readline().strip()

        def reachable(port: str) -> bool:
            client = connect(port)
            try:
                return ask(client, "ping") == "PING"
            finally:
                client.kill()
                client.wait()

        wait_for(lambda: reachable("8080"), 5, "the allowed port to answer")
        assert not reachable("9090")

        held = connect("8080", 10.0)
        try:
            assert ask(held, "before") == "BEFORE"
            since = agent.mark()
            in_netns_of(agent.process.pid, "iptables", "-F")
            agent.wait_event("drift-reverted", since, 5, control="firewall")
            assert ask(held, "after") == "AFTER"  # conntrack ESTABLISHED kept it across the heal
        finally:
            held.kill()
            held.wait()
        assert not reachable("9090")
    finally:
        for server in servers:
            server.kill()
            server.wait()

"""profile: strict for sshd in the real daemon against a fake root, read back with the real `sshd -T`: the fixed
settings are sshd's effective ones, MaxAuthTries and the algorithm lists follow what the admin's proven login
told of its client (and wait while it told nothing), a planted drop-in is neutralised as for the baseline's
settings, and baseline leaves sshd as it was."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.fakeroot import CONFIG, client_key, key_fingerprint, make_root
from tests.integration.harness import Agent, StartAgent, effective_sshd, wait_for

STRICT = CONFIG + "profile: strict\n"
FIXED = {
    "x11forwarding": ["no"],
    "allowagentforwarding": ["no"],
    "permittunnel": ["no"],
    "gatewayports": ["no"],
    "permituserenvironment": ["no"],
    "logingracetime": ["30"],
    "clientaliveinterval": ["300"],
    "clientalivecountmax": ["2"],
    "tcpkeepalive": ["no"],
    "compression": ["no"],
    "allowtcpforwarding": ["local"],
    "loglevel": ["VERBOSE"],
    "banner": ["/etc/issue.net"],
}
CHACHA = [["cipher", "chacha20-poly1305@openssh.com"], ["kex", "curve25519-sha256"], ["mac", "<implicit>"]]


def proven(root: Path, **facts: Any) -> None:
    """The admin's key login as the daemon keeps it, with what sshd logged of its client."""
    proof = {"user": "admin", "how": "a publickey login", "at": 1.0, "fingerprint": key_fingerprint(client_key())}
    (root / "var/lib/vps-agent/key-logins.json").write_text(json.dumps({"admin": {**proof, **facts}}))


def ssh_row(agent: Agent) -> dict[str, Any]:
    return agent.status()["ssh"]


def test_strict_sshd_with_what_the_admins_login_told(tmp_path: Path, start_agent: StartAgent) -> None:
    root = make_root(tmp_path / "root", config=STRICT)
    proven(root, keys_offered=4, algorithms=CHACHA)
    agent = start_agent(root)
    wait_for(lambda: ssh_row(agent)["status"] in ("compliant", "healed"), 10, "ssh healed")
    effective = effective_sshd(root)
    assert {key: effective[key] for key in FIXED} == FIXED
    assert effective["maxauthtries"] == ["5"]  # four keys offered, one more try
    ciphers = effective["ciphers"][0].split(",")
    assert ciphers[0] == "chacha20-poly1305@openssh.com" and not {"aes128-cbc", "3des-cbc"} & set(ciphers)
    kex = effective["kexalgorithms"][0].split(",")
    assert "curve25519-sha256" in kex and not [k for k in kex if "nistp" in k or "group14" in k or "sha1" in k]
    macs = effective["macs"][0].split(",")
    assert macs and all(mac.endswith("-etm@openssh.com") and "sha1" not in mac and "umac-64" not in mac for mac in macs)
    check = agent.ctl("check", "ssh")
    assert check.returncode == 0, check.stdout + check.stderr
    # a drop-in that would turn a strict setting back is neutralised like one against the baseline's
    planted = root / "etc/ssh/sshd_config.d/50-forwarding.conf"
    planted.write_text("AllowAgentForwarding yes\nX11Forwarding yes\n")
    wait_for(lambda: planted.read_text().count("# [vps-agent") == 2, 10, "the drop-in neutralised")
    assert {key: effective_sshd(root)[key] for key in FIXED} == FIXED


def test_strict_holds_what_depends_on_an_unknown_client_and_says_why(tmp_path: Path, start_agent: StartAgent) -> None:
    root = make_root(tmp_path / "root", config=STRICT)  # proven by a login that told nothing of the client
    stock = effective_sshd(root)
    agent = start_agent(root)
    wait_for(lambda: ssh_row(agent)["status"] == "pending", 10, "ssh pending")
    held = {item["setting"].split()[0]: item for item in ssh_row(agent)["held"]}
    assert set(held) == {"MaxAuthTries", "KexAlgorithms", "Ciphers", "MACs"}
    assert "sshd's default 6 stays" in held["MaxAuthTries"]["reason"]
    assert all(item["needs"] == "proof" for item in held.values())
    effective = effective_sshd(root)
    assert {key: effective[key] for key in FIXED} == FIXED  # what needs no fact of the client applies
    assert effective["maxauthtries"] == ["6"] and effective["ciphers"] == stock["ciphers"]
    assert effective["passwordauthentication"] == ["no"]  # the baseline's proof still stands
    status = agent.ctl("status")
    assert status.returncode == 1 and "MaxAuthTries 3 held:" in status.stdout


def test_an_old_mac_of_the_admins_client_blocks_only_macs(tmp_path: Path, start_agent: StartAgent) -> None:
    root = make_root(tmp_path / "root", config=STRICT)
    old = [["cipher", "aes128-ctr"], ["kex", "curve25519-sha256"], ["mac", "hmac-sha1"]]
    proven(root, keys_offered=1, algorithms=old)
    stock = effective_sshd(root)
    agent = start_agent(root)
    wait_for(lambda: ssh_row(agent)["status"] == "blocked", 10, "ssh blocked")
    [held] = ssh_row(agent)["held"]
    assert held["setting"].startswith("MACs ") and "admin uses hmac-sha1" in held["reason"]
    effective = effective_sshd(root)
    assert effective["macs"] == stock["macs"] and "aes128-ctr" in effective["ciphers"][0]
    assert effective["maxauthtries"] == ["3"]


def test_baseline_leaves_sshd_as_the_guide_has_it(tmp_path: Path, start_agent: StartAgent) -> None:
    root = make_root(tmp_path / "root", config=CONFIG)
    proven(root, keys_offered=1, algorithms=CHACHA)
    stock = effective_sshd(root)
    agent = start_agent(root)
    wait_for(lambda: ssh_row(agent)["status"] in ("compliant", "healed"), 10, "ssh healed")
    effective = effective_sshd(root)
    for key in [*FIXED, "maxauthtries", "ciphers", "kexalgorithms", "macs"]:
        assert effective[key] == stock[key], key
    dropin = (root / "etc/ssh/sshd_config.d/00-vps-agent.conf").read_text()
    assert [line.split()[0] for line in dropin.splitlines() if not line.startswith("#")] == [
        "Port",
        "PermitRootLogin",
        "PasswordAuthentication",
    ]


def test_back_to_baseline_takes_the_strict_settings_out_again(tmp_path: Path, start_agent: StartAgent) -> None:
    root = make_root(tmp_path / "root", config=CONFIG)
    proven(root, keys_offered=1, algorithms=CHACHA)
    stock = effective_sshd(root)
    agent = start_agent(root)
    wait_for(lambda: ssh_row(agent)["status"] in ("compliant", "healed"), 10, "ssh healed")
    baseline = effective_sshd(root)
    (root / "etc/vps-agent/config.yaml").write_text(STRICT)
    assert agent.ctl("reload").returncode == 0
    wait_for(lambda: effective_sshd(root)["maxauthtries"] == ["3"], 10, "strict applied")
    (root / "etc/vps-agent/config.yaml").write_text(CONFIG)
    assert agent.ctl("reload").returncode == 0
    wait_for(lambda: effective_sshd(root)["maxauthtries"] == ["6"], 10, "baseline again")
    again = effective_sshd(root)
    for key in ["maxauthtries", "ciphers", "kexalgorithms", "macs", "logingracetime", "allowagentforwarding"]:
        assert again[key] == stock[key], key
    # as for any keyword the guard keeps (ssh.options too), the line it neutralised stays commented out:
    # Debian's 'X11Forwarding yes' in sshd_config, so sshd's own default (no) is what remains
    assert {k: v for k, v in again.items() if baseline.get(k) != v} == {"x11forwarding": ["no"]}
    neutralised = "neutralised, the agent keeps X11Forwarding no: X11Forwarding yes"
    assert neutralised in (root / "etc/ssh/sshd_config").read_text()

"""A worker for tests/integration/test_properties_sshd.py: the SSH guard's real heal on a fake root, with
the real sshd, many times over in one process.

It enters the daemon's own private mount namespace with the fake root's /etc/ssh bound over /etc/ssh
(agent/system/namespace.py, as `vps-agent run --root` does), then for each line "heal" on stdin runs one
transaction of the SSH guard (agent/engine/transaction.py: backup, write, `sshd -t` and `sshd -T`, commit or
roll back) and answers one JSON line: the outcome, what `sshd -T` then says (globally and for root from an
outside address, which Match blocks apply to), and whether a second look still finds drift.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from agent.config import parse_config
from agent.controls.ssh.sshd_config import parse_effective
from agent.engine import transaction as tx
from agent.events import null_events
from agent.paths import SystemRoot
from agent.system import backups, fs, namespace
from agent.system.run import run
from tests.guards import NO_SSH, ssh_guard

CONFIG = parse_config('ssh: {port: 2222, permit_root_login: "no", password_authentication: false}')
KEYS = ("port", "permitrootlogin", "passwordauthentication")
ROOT_FROM_OUTSIDE = "user=root,host=client.example,addr=203.0.113.9"


def effective(*extra: str) -> dict[str, list[str]] | str:
    result = run(["/usr/sbin/sshd", "-T", "-f", "/etc/ssh/sshd_config", *extra], timeout=15)
    if not result.ok:
        return result.error_text()
    return {key: list(values) for key, values in parse_effective(result.stdout).items() if key in KEYS}


def main() -> int:
    root = SystemRoot.at(Path(sys.argv[1]))
    namespace.isolate_fake_root(root)
    store = Path(tempfile.mkdtemp(prefix="sshd-heal-backups-"))
    for line in sys.stdin:
        if line.strip() != "heal":
            continue
        ctx = tx.TransactionContext(null_events(), backups.BackupStore(store, 50), fs.EchoFilter())
        control = ssh_guard(root)
        outcome = tx.converge(control, CONFIG, ctx, ssh=NO_SSH, reason="property")
        again = tx.converge(ssh_guard(root), CONFIG, ctx, ssh=NO_SSH, reason="property, again", heal=False)
        answer = {
            "status": outcome.status,
            "detail": outcome.detail,
            "effective": effective(),
            "root_from_outside": effective("-C", ROOT_FROM_OUTSIDE),
            "again": again.status,
            "again_detail": again.detail,
        }
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build a fake system root: Debian 12's stock sshd_config, a host key, accounts, a sudo admin with a key,
and this machine's /etc/fail2ban (Debian's stock one) when fail2ban is installed.

Used by the tests and by `make demo`; run as `python3 -m tests.fakeroot DIR [--no-admin]`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

DATA = Path(__file__).parent / "data"
FAIL2BAN_CONFIG = Path("/etc/fail2ban")
_KEY_CACHE = Path(os.environ.get("VPS_AGENT_TEST_CACHE", "/tmp/vps-agent-test-cache"))

PASSWD = """root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
sshd:x:100:65534::/run/sshd:/usr/sbin/nologin
"""
SHADOW = """root:$y$j9T$abcdefghijklmnopqrstuv$0123456789012345678901234567890123456789012:19000:0:99999:7:::
daemon:*:19000:0:99999:7:::
sshd:*:19000:0:99999:7:::
"""
GROUP = """root:x:0:
daemon:x:1:
sudo:x:27:
nogroup:x:65534:
"""
SUDOERS = """Defaults\tenv_reset
root\tALL=(ALL:ALL) ALL
%sudo\tALL=(ALL:ALL) ALL
@includedir /etc/sudoers.d
"""
# the system was installed on day 18000 (2019-04-14): root's password (lastchg 19000) was changed since
INSTALLED_DAY = 18000
CONFIG = """# demo config for a fake root: see config.example.yaml for every key
ssh:
  port: 2222
  permit_root_login: "no"
  password_authentication: false
engine:
  reconcile_interval: 5m
"""


def host_key() -> tuple[bytes, bytes]:
    """One ed25519 host key per machine, reused: ssh-keygen per test would cost more than the test."""
    key = _KEY_CACHE / "ssh_host_ed25519_key"
    if not key.exists():
        _KEY_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key.read_bytes(), key.with_suffix(".pub").read_bytes()


def client_key() -> bytes:
    key = _KEY_CACHE / "admin_ed25519"
    if not key.exists():
        _KEY_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "admin@demo", "-f", str(key)], check=True)
    return key.with_suffix(".pub").read_bytes()


def write(path: Path, text: str | bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    os.chmod(path, mode)
    return path


def key_fingerprint(public_key: bytes) -> str:
    """ "SHA256:..." as sshd logs it for an accepted key (ssh-keygen -lf prints the same)."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def prove_key_login(root: Path, user: str = "admin", public_key: bytes | None = None) -> None:
    """What the daemon keeps once sshd logged a publickey login of user with that key (controls/ssh/keylogins.py)."""
    fingerprint = key_fingerprint(public_key or client_key())
    proof = {user: {"user": user, "how": "a publickey login (fake root)", "at": 1.0, "fingerprint": fingerprint}}
    write(root / "var/lib/vps-agent/key-logins.json", json.dumps(proof) + "\n", 0o600)


# The kernel's tunables as a container sees them, for the sysctl guard under --root: ROOT/proc/sys is the
# real /proc/sys bound read-only, but for net/ (rw: per network namespace), as systemd-nspawn and the
# sandbox VPS have it; refuses to start the command should kernel.* still be writable.
_CONTAINER_PROC_SYS = (
    'set -e; mount --bind /proc/sys "$0/proc/sys"; mount -o remount,bind,ro "$0/proc/sys"; '
    'mount --bind /proc/sys/net "$0/proc/sys/net"; mount -o remount,bind,rw "$0/proc/sys/net"; '
    'if [ -w "$0/proc/sys/kernel/randomize_va_space" ]; then echo "kernel tunables writable" >&2; exit 97; fi; '
    'exec "$@"'
)


def container_proc_sys(root: Path) -> tuple[str, ...]:
    """The command prefix that runs a daemon on root in new network and mount namespaces with the kernel's
    real /proc/sys under root/proc/sys as a container has it: it can change only its namespace's net.* keys."""
    (root / "proc/sys").mkdir(parents=True, exist_ok=True)
    return ("unshare", "--net", "--mount", "--", "sh", "-c", _CONTAINER_PROC_SYS, str(root))


def make_root(
    root: Path,
    *,
    admin: str | None = "admin",
    admin_key: bool = True,
    key_proven: bool = True,
    config: str = CONFIG,
) -> Path:
    """key_proven: the admin has logged in with its key once (what lets the SSH guard turn passwords off)."""
    ssh = root / "etc/ssh"
    (ssh / "sshd_config.d").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DATA / "sshd_config.debian12", ssh / "sshd_config")
    private, public = host_key()
    write(ssh / "ssh_host_ed25519_key", private, 0o600)
    write(ssh / "ssh_host_ed25519_key.pub", public)
    installed = INSTALLED_DAY * 86400 + 43200
    for marker in (write(root / "etc/machine-id", "0123456789abcdef0123456789abcdef\n"), ssh / "ssh_host_ed25519_key"):
        os.utime(marker, (installed, installed))
    passwd, shadow, group = PASSWD, SHADOW, GROUP
    if admin:
        passwd += f"{admin}:x:1000:1000:Admin:/home/{admin}:/bin/bash\n"
        shadow += (
            f"{admin}:$y$j9T$abcdefghijklmnopqrstuv$0123456789012345678901234567890123456789012:19000:0:99999:7:::\n"
        )
        group = group.replace("sudo:x:27:", f"sudo:x:27:{admin}") + f"{admin}:x:1000:\n"
        home = root / "home" / admin
        home.mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o750)
        if admin_key:
            write(home / ".ssh/authorized_keys", client_key(), 0o600)
            os.chmod(home / ".ssh", 0o700)
        if os.geteuid() == 0:  # the admin's own, as useradd and ssh-copy-id leave them
            for path in (home, home / ".ssh", home / ".ssh/authorized_keys"):
                if path.exists():
                    os.chown(path, 1000, 1000)
    write(root / "etc/passwd", passwd)
    write(root / "etc/shadow", shadow, 0o640)
    write(root / "etc/group", group)
    write(root / "etc/sudoers", SUDOERS, 0o440)
    (root / "etc/sudoers.d").mkdir(parents=True, exist_ok=True)
    write(root / "etc/vps-agent/config.yaml", config)
    if FAIL2BAN_CONFIG.is_dir() and not (root / "etc/fail2ban").exists():
        # Debian's own fail2ban configuration, as the package installs it (the fail2ban guard reads it
        # with the real fail2ban-client); the agent's jail file is never part of it
        shutil.copytree(
            FAIL2BAN_CONFIG, root / "etc/fail2ban", symlinks=True, ignore=shutil.ignore_patterns("*vps-agent*")
        )
    for directory in ("run", "var/lib/vps-agent", "var/log/vps-agent"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    if admin and admin_key and key_proven:
        prove_key_login(root, admin)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory")
    parser.add_argument("--no-admin", action="store_true", help="no sudo user: the SSH guard must block")
    args = parser.parse_args()
    root = make_root(Path(args.directory), admin=None if args.no_admin else "admin")
    print(f"fake root ready at {root}")


if __name__ == "__main__":
    main()

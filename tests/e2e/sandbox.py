"""A booted Debian 12 or 13 VPS for end-to-end tests: a thin driver of the `sandbox` script beside this file.

    with Sandbox(tmp_path / "root", "trixie") as vps:  # leaving the block always powers it off
        vps.create(debs=[deb])                   # fresh copy of the cached base, the .deb installed
        vps.boot()                               # systemd is PID 1; returns once it is running/degraded
        vps.exec(["systemctl", "is-active", "vps-agent"])
        vps.ssh("id -un")                        # a real ssh from the client namespace (10.213.0.2)
        vps.power_cycle()

Every sandbox needs a parent directory of its own (the script keeps the client key, the pid file
and the boot log beside the root). All the work is the script's; see tests/e2e/README.md.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

SCRIPT = Path(__file__).resolve().with_name("sandbox")
VPS_ADDR = "10.213.0.1"
# `systemctl restart vps-agent` waits for READY=1, sent after the start-up reconcile: the unit allows it
# 3 minutes (TimeoutStartSec), so a restart on a loaded machine may take longer than a command's 60 s
RESTART_TIMEOUT = 200.0
CLIENT_ADDR = "10.213.0.2"
SUITES = ("bookworm", "trixie")  # Debian 12 (oldstable) and 13 (stable)


class CommandFailed(subprocess.CalledProcessError):
    """A command in the VPS or the client namespace failed; the message carries its output."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}"


class Sandbox:
    """One VPS root directory and the life cycle around it: create, boot, exec, poweroff."""

    def __init__(self, root: Path | str, suite: str = "bookworm") -> None:
        if suite not in SUITES:
            raise ValueError(f"suite {suite!r}: expected one of {', '.join(SUITES)}")
        self.root = Path(os.path.abspath(root))
        self.client_dir = self.root.parent / "client"
        self.suite = suite

    # ---- files the client side uses -------------------------------------------------------------

    @property
    def ssh_config(self) -> Path:
        """`ssh -F <this> vps CMD`: the admin's key, the VPS's pinned host keys, batch mode."""
        return self.client_dir / "ssh_config"

    @property
    def key(self) -> Path:
        return self.client_dir / "id_ed25519"

    @property
    def password(self) -> str:
        """The admin's password (sudo asks for it; sshd accepts it while PasswordAuthentication is on)."""
        return (self.client_dir / "admin.password").read_text().strip()

    @property
    def boot_log(self) -> Path:
        return self.root.parent / "boot.log"

    # ---- life cycle ---------------------------------------------------------------------------

    def create(self, debs: Iterable[Path | str] = (), admin: str = "key", config: Path | None = None) -> None:
        """A fresh copy of the base (built first if not cached: about a minute), each .deb installed.
        admin: "key" (a sudo admin with a password and the client's key), "password" (no ~/.ssh, as
        `adduser` leaves it) or "none" (no admin; root has the client's key). config: a file placed as
        /etc/vps-agent/config.yaml before the .debs are installed (None: none, a first install's)."""
        args = ["create", str(self.root), "--admin", admin]
        if config is not None:
            args += ["--config", str(config)]
        for deb in debs:
            args += ["--deb", str(deb)]
        self._script(args, timeout=900, suite=self.suite)

    def boot(self) -> None:
        """Boot in the background; raises if systemd is not running/degraded within 60 s (it is then off)."""
        self._script(["boot", str(self.root)], timeout=180)

    def poweroff(self) -> None:
        """Power off (SIGKILL after 30 s), tear down its networks; raises if anything is left behind."""
        self._script(["poweroff", str(self.root)], timeout=120)

    def power_cycle(self) -> None:
        self.poweroff()
        self.boot()

    def is_booted(self) -> bool:
        return subprocess.run([str(SCRIPT), "status", str(self.root)], capture_output=True).returncode == 0

    def destroy(self) -> None:
        """Power off if needed, then delete the root and the client files (a root is ~300 MB)."""
        self._script(["destroy", str(self.root)], timeout=180)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # always, booted or not: poweroff also clears what an interrupted boot left
        self.poweroff()

    # ---- running things -----------------------------------------------------------------------

    def exec(
        self, cmd: Sequence[str], check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run cmd inside the VPS as root (its namespaces, its root, a clean environment). On a timeout the
        error carries what systemd was doing and the journal's last lines, for the failure's report."""
        try:
            return self._run([str(SCRIPT), "exec", str(self.root), "--", *cmd], check, timeout, input)
        except subprocess.TimeoutExpired as exc:
            probe = "systemctl list-jobs --no-pager; journalctl -n 60 --no-pager -o short-precise"
            try:
                seen = self._run([str(SCRIPT), "exec", str(self.root), "--", "sh", "-c", probe], False, 20, None)
                exc.add_note(f"inside the VPS when {shlex.join(cmd)} timed out:\n{seen.stdout}{seen.stderr}")
            except subprocess.TimeoutExpired:
                exc.add_note("inside the VPS: systemctl and journalctl did not answer within 20 s either")
            raise

    def client(
        self, cmd: Sequence[str], check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run cmd on the host, in the client's network namespace: the VPS is 10.213.0.1 from there."""
        return self._run([str(SCRIPT), "client", str(self.root), "--", *cmd], check, timeout, input)

    def ssh(
        self,
        command: str | Sequence[str],
        user: str = "admin",
        port: int = 22,
        options: Sequence[str] = (),
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """A real `ssh user@10.213.0.1 command` from the client namespace, with the admin's key."""
        if not isinstance(command, str):
            command = shlex.join(command)
        argv = ["ssh", "-F", str(self.ssh_config), "-p", str(port), *options, f"{user}@vps", command]
        return self.client(argv, check, timeout, input)

    def ssh_with_password(
        self, command: str, user: str = "admin", port: int = 22, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """ssh with the admin's password only (no key offered), answered by client/askpass."""
        options = ["-o", "BatchMode=no", "-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password"]
        argv = ["env", f"SSH_ASKPASS={self.client_dir / 'askpass'}", "SSH_ASKPASS_REQUIRE=force"]
        argv += ["ssh", "-F", str(self.ssh_config), "-p", str(port), *options, f"{user}@vps", command]
        return self.client(argv, check, timeout)

    def ssh_session(self, port: int = 22, user: str = "admin", seconds: int = 300) -> subprocess.Popen[bytes]:
        """A live SSH session in the background (the admin's own, with the key), kept until terminate();
        poweroff ends it too (it runs in the client's network namespace)."""
        argv = [str(SCRIPT), "client", str(self.root), "--", "ssh", "-F", str(self.ssh_config), "-p", str(port)]
        argv += [f"{user}@vps", f"sleep {seconds}"]
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def install_key(self, port: int = 22, user: str = "admin") -> None:
        """What `ssh-copy-id` does: over a password login, the client's public key appended to the admin's
        ~/.ssh/authorized_keys (made 0700/0600 if missing)."""
        key = (self.client_dir / "id_ed25519.pub").read_text().strip()
        script = (
            "umask 077; mkdir -p ~/.ssh && chmod 700 ~/.ssh && "
            f"printf '%s\\n' {shlex.quote(key)} >> ~/.ssh/authorized_keys && chmod 600 ~/.ssh/authorized_keys"
        )
        self.ssh_with_password(script, user=user, port=port)

    # ---- the script ---------------------------------------------------------------------------

    @staticmethod
    def _run(argv: list[str], check: bool, timeout: float, input: str | None) -> subprocess.CompletedProcess[str]:
        stdin = None if input is not None else subprocess.DEVNULL
        result = subprocess.run(argv, timeout=timeout, input=input, stdin=stdin, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise CommandFailed(result.returncode, argv, result.stdout, result.stderr)
        return result

    @staticmethod
    def _script(args: list[str], timeout: float, suite: str | None = None) -> None:
        """Run a life-cycle verb, its output going to ours (pytest shows it when a test fails).

        On a timeout the whole process group gets SIGTERM first: the script's traps power a
        half-booted VPS off and remove what create had put in place.
        """
        env = {**os.environ, "SANDBOX_SUITE": suite} if suite else None  # the base create copies
        process = subprocess.Popen([str(SCRIPT), *args], stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        try:
            code = process.wait(timeout=timeout)
        except BaseException:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            raise
        if code != 0:
            raise subprocess.CalledProcessError(code, [str(SCRIPT), *args])

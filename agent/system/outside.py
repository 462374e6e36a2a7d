"""The door for the few files a guard edits outside vps-agent.service's writable paths.

The unit runs with ProtectSystem=strict: /etc is read-only to the daemon but for the directories listed in
ReadWritePaths=, and a file in /etc itself cannot be replaced by rename from inside (the rename needs the
directory; a bind mount of the file would pin its old inode once dpkg or `sed -i` replaced it). So
`/etc/login.defs`, `/etc/issue` and `/etc/issue.net` (profile: strict) are written by `vps-agent
write-file`, run as a transient unit outside the sandbox, with the same atomic write as every other file
(agent/system/fs.py). Only these paths: the helper refuses any other."""

from __future__ import annotations

import base64
import os
import shutil
import sys
from pathlib import Path

from agent.paths import WRITTEN_OUTSIDE_SANDBOX
from agent.system.run import run

OUTSIDE_SANDBOX = WRITTEN_OUTSIDE_SANDBOX
HELPER = "/usr/bin/vps-agent"
TIMEOUT = 30.0
_HELPING = "VPS_AGENT_WRITE_FILE"


class OutsideWriteError(OSError):
    """The helper could not write the file (it says why)."""


def available(path: Path) -> bool:
    """Whether `path` is one of the door's files and the agent runs as a systemd service that can start one."""
    return (
        str(path) in OUTSIDE_SANDBOX
        and not os.environ.get(_HELPING)  # the helper itself: a read-only /etc there is a real error
        and bool(os.environ.get("INVOCATION_ID"))
        and Path("/run/systemd/system").is_dir()
        and shutil.which("systemd-run") is not None
        and Path(HELPER).is_file()
    )


def write(path: Path, content: bytes, mode: int, owner: tuple[int, int]) -> None:
    """Write `path` through the helper, outside the sandbox; raises OutsideWriteError with its words."""
    argv = ["systemd-run", "--wait", "--pipe", "--quiet", "--collect", "--service-type=exec"]
    argv += [f"--property=RuntimeMaxSec={int(TIMEOUT)}", "--", HELPER, "write-file"]
    argv += ["--mode", f"{mode:o}", "--owner", f"{owner[0]}:{owner[1]}", str(path)]
    result = run(argv, input_text=base64.b64encode(content).decode(), timeout=TIMEOUT + 5)
    if not result.ok:
        raise OutsideWriteError(f"{path}: vps-agent write-file (outside the sandbox): {result.error_text()}")


def write_file_main(path: str, mode: str, owner: str) -> int:
    """`vps-agent write-file PATH`: the file's new content, base64, on stdin; written atomically in place."""
    from agent.system import fs

    if path not in OUTSIDE_SANDBOX:
        known = ", ".join(sorted(OUTSIDE_SANDBOX))
        print(f"vps-agent write-file: {path}: not a file this helper writes ({known})", file=sys.stderr)
        return 2
    os.environ[_HELPING] = "1"
    try:
        content = base64.b64decode(sys.stdin.read(), validate=True)
        uid, gid = (int(part) for part in owner.split(":"))
        fs.atomic_write(Path(path), content, mode=int(mode, 8), owner=(uid, gid))
    except (ValueError, OSError) as exc:
        print(f"vps-agent write-file: {path}: {exc}", file=sys.stderr)
        return 1
    return 0

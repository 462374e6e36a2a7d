"""`vps-agentctl enforce`: the firewall guard from report mode to enforcing, by one value edited in the
config file (agent/config/edit.py keeps every other byte), then the daemon reloaded."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from agent.config import ConfigError, UneditableConfig, load_config, parse_config, set_key
from agent.console.codes import EXIT_DRIFT, EXIT_ERROR, EXIT_OK, EXIT_UNREACHABLE
from agent.controls.firewall.exposure import cut_text, read_would_cut
from agent.ipc import DaemonUnreachable
from agent.paths import SystemRoot
from agent.system import fs


def enforce(root: SystemRoot, yes: bool, reload: Callable[[], Any]) -> int:
    """firewall.mode: enforce in the config file, only that value edited in place, then the daemon reloaded.
    Refuses (exit 1, nothing changed) while enforcing would cut off a listener, unless `yes`."""
    path = root.config_file
    if root.is_host and os.geteuid() != 0:
        print(f"vps-agentctl enforce: needs root (it edits {path} and reloads the daemon)", file=sys.stderr)
        return EXIT_ERROR
    data = fs.read_regular(path, follow_symlinks=True)
    try:
        if data is not None:
            load_config(path)  # a bad file is the admin's to fix first (the loader's file:line errors)
        text = (data or b"").decode("utf-8")
        edited = set_key(text, "firewall", "mode", "enforce")
        config = parse_config(edited, source=str(path))
    except ConfigError as exc:
        print(f"vps-agentctl: {exc}", file=sys.stderr)
        print(f"vps-agentctl enforce: nothing changed; fix {path} first", file=sys.stderr)
        return EXIT_ERROR
    except UneditableConfig as exc:
        print(f"vps-agentctl enforce: {path}: {exc}; nothing changed", file=sys.stderr)
        return EXIT_ERROR
    if config.firewall.mode != "enforce" or not config.firewall.enabled:
        why = "firewall.enabled is false" if not config.firewall.enabled else "the edit did not take"
        print(f"vps-agentctl enforce: {path}: {why}; nothing changed", file=sys.stderr)
        return EXIT_ERROR
    from agent.wiring import SshShared  # the controls load only for the verbs that use them

    cuts = read_would_cut(config.firewall, SshShared.of(root).ports_now(config).ports)
    if cuts and not yes:
        print(
            f"vps-agentctl enforce: enforcing the firewall would cut off {cut_text(cuts)}; nothing changed.\n"
            f"  keep it open: add the port to firewall.allow_tcp (udp: allow_udp) in {path}, then run enforce again\n"
            "  cut it off:   vps-agentctl enforce --yes",
            file=sys.stderr,
        )
        return EXIT_DRIFT
    if edited != text or data is None:
        fs.ensure_dir(path.parent, 0o755)
        fs.atomic_write(path, edited.encode("utf-8"), mode=None if data is not None else 0o644)
        print(f"{path}: firewall.mode: enforce")
    else:
        print(f"{path}: firewall.mode is enforce already")
    if cuts:
        print(f"cutting off {cut_text(cuts)} (--yes)")
    try:
        result = reload()
    except DaemonUnreachable as exc:
        print(f"vps-agentctl: the daemon is unreachable ({exc}): it enforces when it starts", file=sys.stderr)
        return EXIT_UNREACHABLE
    if not result["ok"]:
        print(f"vps-agentctl: config rejected by the daemon, the previous one stays in force: {result['error']}")
        return EXIT_ERROR
    print("config reloaded: the firewall guard enforces")
    return EXIT_OK

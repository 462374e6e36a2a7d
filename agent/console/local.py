"""The verbs that read the system themselves, without the daemon (check, diff): every guard observed and
planned at once, nothing healed, against --config, the system's config file, or the defaults."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from pathlib import Path
from typing import Any

from agent.config import Config, ConfigError, load_config
from agent.console.codes import EXIT_ERROR
from agent.controls.base import Control
from agent.engine import transaction as tx
from agent.engine.runner import DISABLED
from agent.events import null_events
from agent.paths import SystemRoot
from agent.system import namespace
from agent.system.run import concurrently


def local_outcomes(args: argparse.Namespace) -> tuple[Config, list[tx.Outcome]] | int:
    from agent.wiring import SshShared, build_controls, transaction_context

    root = SystemRoot.at(args.root)
    shared = SshShared.of(root)
    every = build_controls(root, shared, lambda: False)  # fail2ban's jail mode: what sshd -T says
    controls = [c for c in every if args.control in (None, c.name)]
    if not controls:
        names = ", ".join(c.name for c in every)
        print(f"vps-agentctl: no control named {args.control!r}; controls: {names}", file=sys.stderr)
        return EXIT_ERROR
    try:
        config = config_or_defaults(Path(args.config) if args.config else None, root)
        namespace.isolate_fake_root(root)
    except (ConfigError, namespace.NamespaceError) as exc:
        print(f"vps-agentctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    ctx = transaction_context(root, config, null_events())
    ssh = shared.ports_now(config)  # one read for every guard this check looks at

    def outcome(control: Control) -> tx.Outcome:
        meta = control.meta(config)
        if not meta.enabled:
            return tx.Outcome(control.name, DISABLED, "disabled in the config")
        result = tx.converge(control, config, ctx, ssh=ssh, reason="check", heal=False)
        # report mode: what the daemon's status says too (for the firewall: what enforcing would cut off)
        note = "" if meta.remediates else control.report_note(result.facts)
        return dataclasses.replace(result, detail=note) if note else result

    # independent, and mostly waiting for their tools (sshd -T, iptables-save, fail2ban-client -d): at once
    return config, concurrently([functools.partial(outcome, control) for control in controls])


def config_or_defaults(given: Path | None, root: SystemRoot) -> Config:
    """--config FILE, or the system's config file; with neither an --config nor that file, the defaults
    (what the daemon runs on without one), said on stderr so that --json stays clean."""
    if given is not None:
        return load_config(given)
    if not os.path.lexists(root.config_file):
        print(f"no {root.config_file}: checking against the defaults", file=sys.stderr)
        return Config(source=str(root.config_file))
    return load_config(root.config_file)


def outcome_row(outcome: tx.Outcome) -> dict[str, Any]:
    return {
        "control": outcome.control,
        "status": outcome.status,
        "why": outcome.detail,  # "" when compliant, but for a report mode's note
        "facts": outcome.facts,
        "drift": [i.describe() for i in outcome.drift.items] if outcome.drift else [],
        "blocked": list(outcome.blocked.reasons) if outcome.blocked else [],
        "held": [
            {"setting": h.setting, "reason": h.reason, "unblock": h.unblock, "needs": h.needs}
            for h in (outcome.held.settings if outcome.held else ())
        ],
        "plan": list(outcome.changes.notes) if outcome.changes else [],
        "duration_ms": outcome.duration_ms,
    }

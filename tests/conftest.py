"""Shared fixtures: fake roots, and the rule that integration tests skip only where they truly cannot run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.fakeroot import make_root


def require_root_and_tools(*tools: str) -> None:
    """Integration and timeline tests need root and real tools; in CI their absence is a failure."""
    missing = [t for t in tools if shutil.which(t, path="/usr/sbin:/usr/bin:/sbin:/bin") is None]
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root")
    if missing:
        problems.append(f"missing tools: {', '.join(missing)}")
    if problems:
        message = f"NOT TESTED: {'; '.join(problems)} (CI installs them and runs as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    """A fake system root: Debian 12's stock sshd_config, a host key, a sudo admin with a key."""
    return make_root(tmp_path / "root")

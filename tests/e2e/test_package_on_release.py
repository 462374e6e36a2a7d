"""The .deb against each release's own lintian: `make deb` runs the build machine's lintian (Debian 12's on a
Debian 12 host), so Debian 13's newer checks run here, in a copy of the release's sandbox base (see the
`sandbox lintian` verb). That the package installs on the release and its unit verifies is the booted
modules' part (test_agent_on_vps)."""

from __future__ import annotations

import os
import subprocess

from tests.conftest import require_root_and_tools
from tests.debs import BUILD_TOOLS, built_deb
from tests.e2e.sandbox import SCRIPT


def test_the_releases_own_lintian_finds_no_error_or_warning(release: str) -> None:
    require_root_and_tools("debootstrap", "unshare", *BUILD_TOOLS)
    deb = built_deb()
    result = subprocess.run(
        [str(SCRIPT), "lintian", str(deb)],
        env={**os.environ, "SANDBOX_SUITE": release},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"{release}'s lintian on {deb.name}:\n{result.stdout}\n{result.stderr[-4000:]}"
    ran = [line for line in result.stderr.splitlines() if line.startswith("sandbox: lintian ")]
    print(f"\n[e2e] {ran[0] if ran else result.stderr[-500:]}\n{result.stdout.strip()}")

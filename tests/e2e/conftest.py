"""Every e2e module runs once per Debian release: one booted VPS per module and release.

VPS_RELEASES picks them; a test's id names its release, e.g. `test_x[trixie]`. The default is bookworm
(Debian 12) until a whole trixie run has passed after issue 16's fixes (fail2ban 1.1's reload that renames
the ban action, the unit under /lib on a merged-/usr system): `VPS_RELEASES="bookworm trixie"` runs both.
"""

from __future__ import annotations

import os

import pytest

from tests.e2e.sandbox import SUITES


def releases() -> list[str]:
    wanted = os.environ.get("VPS_RELEASES", "bookworm").split()
    unknown = [r for r in wanted if r not in SUITES]
    if unknown or not wanted:
        raise pytest.UsageError(f"VPS_RELEASES={os.environ.get('VPS_RELEASES')!r}: expected some of {' '.join(SUITES)}")
    return wanted


@pytest.fixture(scope="module", params=releases())
def release(request: pytest.FixtureRequest) -> str:
    """The Debian release of this module's VPS."""
    suite: str = request.param
    return suite

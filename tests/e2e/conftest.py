"""Every e2e module runs once per Debian release: one booted VPS per module and release.

VPS_RELEASES picks them; a test's id names its release, e.g. `test_x[trixie]`. The default is both
releases our users run, Debian 12 (bookworm) and Debian 13 (trixie, the current stable): CI boots both.
`VPS_RELEASES=trixie make test` runs one, for a quicker look.
"""

from __future__ import annotations

import os

import pytest

from tests.e2e.sandbox import SUITES


def releases() -> list[str]:
    wanted = os.environ.get("VPS_RELEASES", " ".join(SUITES)).split()
    unknown = [r for r in wanted if r not in SUITES]
    if unknown or not wanted:
        raise pytest.UsageError(f"VPS_RELEASES={os.environ.get('VPS_RELEASES')!r}: expected some of {' '.join(SUITES)}")
    return wanted


@pytest.fixture(scope="module", params=releases())
def release(request: pytest.FixtureRequest) -> str:
    """The Debian release of this module's VPS."""
    suite: str = request.param
    return suite

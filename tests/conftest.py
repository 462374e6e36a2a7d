"""Shared fixtures: fake roots, and the rule that integration tests skip only where they truly cannot run."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

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


# --- property tests (hypothesis) --------------------------------------------------------------------------------
# Two profiles, chosen by CI=true: "ci" draws a bounded, derandomized set of examples (the same ones on every
# run, so a failure in CI fails again on a laptop with CI=true), "dev" draws fresh ones from a seed printed in
# the summary line (repeat them with --hypothesis-seed N). HYPOTHESIS_PROFILE=ci|dev chooses one by name
# (the .deb build's unit tests use ci: a package build draws the same examples every time). A test may lower
# max_examples (the real-sshd one does).
PROPERTY_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") == "true" else "dev")

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - the property modules then fail at import, naming the package
    settings = None  # type: ignore[assignment,misc]
else:
    settings.register_profile(
        "ci",
        max_examples=200,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile("dev", max_examples=100, deadline=None, print_blob=True)
    settings.load_profile(PROPERTY_PROFILE)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Outside CI, a random seed unless one was given, set before hypothesis's own plugin reads it."""
    if settings is None or PROPERTY_PROFILE == "ci" or not hasattr(config.option, "hypothesis_seed"):
        return
    if config.option.hypothesis_seed is None:
        config.option.hypothesis_seed = str(random.SystemRandom().randrange(2**32))


def property_summary(config: pytest.Config) -> str:
    if PROPERTY_PROFILE == "ci":
        return (
            "hypothesis: profile ci: max_examples=200, derandomized (each test's examples come from"
            " its own name: a failure repeats with CI=true)"
        )
    seed = getattr(config.option, "hypothesis_seed", None)
    return f"hypothesis: profile dev: max_examples=100, seed {seed} (repeat with --hypothesis-seed {seed})"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    config.stash[_PROPERTIES_RAN] = any(item.get_closest_marker("hypothesis") for item in items)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The profile and the seed, also under -q (the report header is not shown there)."""
    if settings is not None and config.stash.get(_PROPERTIES_RAN, False):
        terminalreporter.write_line(property_summary(config))


_PROPERTIES_RAN = pytest.StashKey[bool]()

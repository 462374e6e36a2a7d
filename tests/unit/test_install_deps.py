"""tools/install-deps, the install step of `make sandbox`, `make test` and .ci/run, with fake dpkg-query,
apt-get, apt-cache and id first on PATH: nothing here installs anything or needs root."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "install-deps"
POLICY = Path("/usr/sbin/policy-rc.d")

FAKE_DPKG_QUERY = """#!/bin/sh
# dpkg-query -W -f=FORMAT NAME...: "installed NAME" for the names in $FAKE_INSTALLED, as dpkg does
echo called >> "$FAKE_LOG.dpkg-query"  # one line a call (the format holds a newline)
shift 2
rc=0
for name in "$@"; do
  if grep -qx "$name" "$FAKE_INSTALLED"; then echo "installed $name"
  else echo "dpkg-query: no packages found matching $name" >&2; rc=1; fi
done
exit $rc
"""
FAKE_APT = """#!/bin/sh
echo "$(basename "$0") $*" >> "$FAKE_LOG.apt"
exit 100
"""
FAKE_ID = """#!/bin/sh
[ "$1" = -u ] && echo "$FAKE_UID"
"""


def listed(purpose: str) -> list[str]:
    done = subprocess.run([SCRIPT, "--list", purpose], capture_output=True, text=True, check=True, timeout=30)
    return done.stdout.split()


def run(tmp_path: Path, installed: list[str], *, uid: int, purpose: str = "test") -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (
        ("dpkg-query", FAKE_DPKG_QUERY),
        ("apt-get", FAKE_APT),
        ("apt-cache", FAKE_APT),
        ("id", FAKE_ID),
    ):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "installed").write_text("".join(f"{name}\n" for name in installed))
    env = {
        "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C",
        "FAKE_INSTALLED": str(tmp_path / "installed"),
        "FAKE_LOG": str(tmp_path / "log"),
        "FAKE_UID": str(uid),
    }
    return subprocess.run([SCRIPT, purpose], capture_output=True, text=True, env=env, timeout=30)


def apt_calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "log.apt"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("uid", [0, 1000])
@pytest.mark.parametrize("purpose", ["sandbox", "test"])
def test_everything_installed_runs_no_apt_and_says_nothing(tmp_path: Path, uid: int, purpose: str) -> None:
    started = time.monotonic()
    done = run(tmp_path, listed(purpose), uid=uid, purpose=purpose)
    elapsed = time.monotonic() - started

    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert apt_calls(tmp_path) == []
    assert len((tmp_path / "log.dpkg-query").read_text().splitlines()) == 1  # one query for all packages
    assert elapsed < 2, f"{elapsed:.2f} s for a check that runs no apt"


def test_not_root_with_packages_missing_names_them_and_the_command_and_fails(tmp_path: Path) -> None:
    wanted = listed("test")
    gone = ["rsyslog-openssl", "prometheus", "debootstrap"]
    done = run(tmp_path, [name for name in wanted if name not in gone], uid=1000)

    assert done.returncode == 1
    assert done.stdout == ""
    first = done.stderr.splitlines()[0]
    assert first == (
        "install-deps: make test needs Debian packages that are not installed: debootstrap rsyslog-openssl prometheus"
    )
    assert re.search(r"^install-deps: +(sudo make deps|su -c 'make deps')$", done.stderr, re.M), done.stderr
    assert apt_calls(tmp_path) == []


def test_as_root_offline_says_so_and_installs_nothing(tmp_path: Path) -> None:
    policy_before = POLICY.exists()
    done = run(
        tmp_path,
        [name for name in listed("sandbox") if name != "lintian"],
        uid=0,
        purpose="sandbox",
    )

    assert done.returncode == 3
    assert "apt-get update failed (exit 100): no network" in done.stderr
    assert "Still missing: lintian" in done.stderr
    assert apt_calls(tmp_path) == ["apt-get update -q"]  # no install, and policy-rc.d was never needed
    assert POLICY.exists() == policy_before


def test_the_sandbox_list_is_part_of_the_test_list_and_holds_the_build_depends() -> None:
    sandbox, test = listed("sandbox"), listed("test")
    assert set(sandbox) <= set(test)
    assert len(test) == len(set(test))

    control = (REPO / "packaging" / "debian" / "control").read_text()
    field = re.search(r"^Build-Depends:\n((?: .*\n)+)", control, re.M)
    assert field is not None
    names = {re.split(r"[ :(<]", line.strip().rstrip(","))[0] for line in field.group(1).splitlines()}
    names = {"debhelper" if name == "debhelper-compat" else name for name in names}
    assert names - set(sandbox) == set()


def test_ci_and_make_use_the_install_step_and_no_list_of_their_own() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "tools/install-deps test\n" in ci
    assert "apt-get" not in ci
    assert ci.rstrip().endswith("make test")

    makefile = (REPO / "Makefile").read_text()

    def recipe(target: str) -> list[str]:
        rule = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, re.M)
        assert rule is not None, target
        return [line.strip() for line in rule.group(1).splitlines()]

    assert recipe("test")[0] == "tools/install-deps test"
    assert recipe("sandbox")[:2] == ["tools/install-deps sandbox", "$(MAKE) --no-print-directory deb"]
    assert recipe("deps") == ["tools/install-deps test"]


def test_lint_needs_only_python3_venv_which_the_test_list_holds() -> None:
    assert listed("lint") == ["python3", "python3-venv"]
    assert set(listed("lint")) <= set(listed("test"))  # `sudo make deps` is enough for `make lint`


def test_ci_lints_with_the_pinned_tools_before_it_tests() -> None:
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert ci.index("tools/install-deps lint") > ci.index("tools/install-deps test")
    assert ci.index("make lint") < ci.index("make test") == len(ci) - 1
    pins = [line for line in (REPO / "tools" / "lint-requirements.txt").read_text().splitlines() if line[:1] != "#"]
    assert [re.fullmatch(r"(ruff|mypy)==[0-9.]+", pin) is not None for pin in pins] == [True, True]
    makefile = (REPO / "Makefile").read_text()
    ruff = "$(LINT_VENV)/bin/ruff check agent tests bench packaging/ansible/plugins"
    lint = f"\tLINT_VENV=$(LINT_VENV) tools/install-deps lint\n\t{ruff}\n"
    assert lint in makefile

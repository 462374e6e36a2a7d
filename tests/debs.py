"""Build (or reuse) the .deb with `make deb`, for the package tests and the e2e tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD_TOOLS = ("make", "git", "tar", "dpkg-buildpackage", "dpkg-parsechangelog", "dpkg-deb", "lintian")


def run(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def make_env() -> dict[str, str]:
    """The environment for `make deb`: no variables inherited from an outer make (`make test`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VERSION")}
    env["LC_ALL"] = "C.UTF-8"
    return env


def make_deb(*variables: str) -> None:
    done = run("make", "deb", *variables, env=make_env())
    if done.returncode != 0:
        pytest.fail(f"make deb {' '.join(variables)} failed ({done.returncode}):\n{done.stdout[-6000:]}\n{done.stderr}")


def changelog_version() -> str:
    return run("dpkg-parsechangelog", "-l", "packaging/debian/changelog", "-S", "Version").stdout.strip()


def tracked_files() -> list[Path]:
    names = run("git", "ls-files", "-z").stdout.split("\0")
    return [REPO / n for n in names if n and os.path.lexists(REPO / n)]


def is_fresh(deb: Path) -> bool:
    """Built after the last change to any tracked file (what `make deb` copies into the package)."""
    if not deb.exists():
        return False
    newest = max(p.lstat().st_mtime for p in tracked_files())
    return deb.stat().st_mtime > newest


def built_deb(version: str | None = None) -> Path:
    """The package of this tree, as the changelog's version or as `version` (e.g. an older one)."""
    wanted = version or changelog_version()
    assert wanted, "packaging/debian/changelog has no version"
    path = REPO / "build" / f"vps-agent_{wanted}_all.deb"
    if not is_fresh(path):
        make_deb(*([f"VERSION={version}"] if version else []))
    assert path.is_file(), f"make deb did not leave {path}"
    return path


# The packages users have installed, by version: the commit each was built from. 0.1.0 shipped
# /etc/vps-agent/config.yaml as a conffile (the upgrade away from that is tested on a VPS).
RELEASED = {"0.1.0": "17081d692417146986d17e5f144a0348fe81f752"}


def released_deb(version: str) -> Path:
    """The .deb of a released version, built once from its commit into build/released-VERSION/ (a copy of
    that tree made its own git repository, so `make deb`'s git ls-files sees exactly that tree)."""
    tree = REPO / "build" / f"released-{version}"
    deb = tree / "build" / f"vps-agent_{version}_all.deb"
    if deb.is_file():
        return deb
    if tree.exists():
        subprocess.run(["rm", "-rf", str(tree)], check=True)
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", RELEASED[version]], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    commit = ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", version]
    for argv in (["init", "-q"], ["add", "-A"], commit):
        done = run("git", *argv, cwd=tree)
        assert done.returncode == 0, done.stderr
    env = {**make_env(), "DEB_BUILD_OPTIONS": "nocheck"}  # its unit tests passed when it was released
    done = run("make", "deb", cwd=tree, env=env)
    if done.returncode != 0:
        pytest.fail(f"make deb of {version} failed ({done.returncode}):\n{done.stdout[-6000:]}\n{done.stderr}")
    assert deb.is_file(), f"make deb did not leave {deb}"
    return deb

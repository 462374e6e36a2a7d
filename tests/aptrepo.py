"""A local apt repository the tests build: dummy packages made with dpkg-deb, indexed by
dpkg-scanpackages, served to apt as a flat `file:` source. Real packages, real apt, no network."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

SOURCE_LINE = "deb [trusted=yes] file:{path} ./\n"


@dataclass(frozen=True)
class Dummy:
    name: str
    version: str
    files: tuple[tuple[str, str], ...] = ()  # (absolute path, content)
    conffiles: tuple[str, ...] = ()  # paths among files that are conffiles
    postinst: str | None = None  # shell script body


def build(package: Dummy, out_dir: Path) -> Path:
    """package_version_all.deb in out_dir, built by dpkg-deb."""
    tree = out_dir / f".build-{package.name}-{package.version}"
    (tree / "DEBIAN").mkdir(parents=True)
    control = (
        f"Package: {package.name}\nVersion: {package.version}\nArchitecture: all\n"
        "Maintainer: vps-agent tests <tests@localhost>\nPriority: optional\nSection: misc\n"
        f"Description: vps-agent test package {package.name} {package.version}\n"
    )
    (tree / "DEBIAN/control").write_text(control)
    if package.conffiles:
        (tree / "DEBIAN/conffiles").write_text("".join(f"{path}\n" for path in package.conffiles))
    if package.postinst is not None:
        script = tree / "DEBIAN/postinst"
        script.write_text("#!/bin/sh\nset -e\n" + package.postinst + "\n")
        script.chmod(0o755)
    for path, content in package.files:
        target = tree / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    deb = out_dir / f"{package.name}_{package.version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)], check=True, capture_output=True)
    subprocess.run(["rm", "-rf", str(tree)], check=True)
    return deb


def publish(repo: Path, packages: list[Dummy]) -> None:
    """Add the packages to the flat repository at repo and (re)write its Packages index."""
    repo.mkdir(parents=True, exist_ok=True)
    for package in packages:
        build(package, repo)
    index = subprocess.run(
        ["dpkg-scanpackages", "--multiversion", ".", "/dev/null"],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    (repo / "Packages").write_text(index)

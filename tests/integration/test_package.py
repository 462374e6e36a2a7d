"""The Debian package: `make deb` builds it (or a fresh enough build is reused), and these tests read it.

Nothing here installs the package: it is listed with `dpkg-deb -c`, its control files are read with
`dpkg-deb -f`/`-e`, its tree is unpacked with `dpkg-deb -x` into a temporary directory, and the
launchers run from there with their private directory pointed at the unpacked copy.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root_and_tools
from tests.debs import BUILD_TOOLS, built_deb, changelog_version, make_deb, make_env, run, tracked_files

REPO = Path(__file__).resolve().parents[2]
TOOLS = BUILD_TOOLS
PRIVATE_DIR = "/usr/share/vps-agent"
DEBIAN_PYTHON = "/usr/bin/python3"
RUNTIME_DEPENDS = ("python3-yaml", "python3-structlog", "python3-watchdog", "python3-psutil")


@pytest.fixture(scope="module")
def deb() -> Path:
    require_root_and_tools(*TOOLS)
    return built_deb()


@pytest.fixture(scope="module")
def contents(deb: Path) -> dict[str, tuple[str, str]]:
    """Path in the package (absolute, directories with a trailing /) -> (mode string, owner/group)."""
    listing = run("dpkg-deb", "-c", str(deb))
    assert listing.returncode == 0, listing.stderr
    entries = {}
    for line in listing.stdout.splitlines():
        fields = line.split(None, 5)
        mode, owner, name = fields[0], fields[1], fields[5]
        name = name.split(" -> ")[0]
        entries[name[1:] if name.startswith("./") else name] = (mode, owner)
    return entries


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("unpacked")
    done = run("dpkg-deb", "-x", str(deb), str(tree))
    assert done.returncode == 0, done.stderr
    return tree


@pytest.fixture(scope="module")
def control_dir(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    control = tmp_path_factory.mktemp("control") / "DEBIAN"
    done = run("dpkg-deb", "-e", str(deb), str(control))
    assert done.returncode == 0, done.stderr
    return control


def field(deb: Path, name: str) -> str:
    done = run("dpkg-deb", "-f", str(deb), name)
    assert done.returncode == 0, done.stderr
    return " ".join(done.stdout.split())


# --- what the package holds -----------------------------------------------------------------------


def test_version_is_the_programs_version(deb: Path) -> None:
    init = (REPO / "agent/__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"$', init, re.MULTILINE)
    assert match, "agent/__init__.py has no __version__"
    assert field(deb, "Version") == changelog_version() == match.group(1)


def test_launchers_and_private_modules(contents: dict[str, tuple[str, str]]) -> None:
    for launcher in ("/usr/bin/vps-agent", "/usr/bin/vps-agentctl"):
        assert launcher in contents, f"{launcher} missing"
        assert contents[launcher] == ("-rwxr-xr-x", "root/root")
    tracked = {p.relative_to(REPO).as_posix() for p in tracked_files() if p.suffix == ".py"}
    sources = {name for name in tracked if name.startswith("agent/")}
    assert sources, "no tracked agent/*.py?"
    shipped = {name[len(PRIVATE_DIR) + 1 :] for name in contents if name.startswith(PRIVATE_DIR + "/agent/")}
    shipped_py = {name for name in shipped if name.endswith(".py")}
    assert shipped_py == sources, f"missing: {sorted(sources - shipped_py)}, extra: {sorted(shipped_py - sources)}"
    # byte-compiled at install time by py3compile (postinst), never shipped
    assert not [n for n in contents if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]


def test_no_public_module_and_nothing_that_does_not_belong(contents: dict[str, tuple[str, str]]) -> None:
    names = list(contents)
    assert not [n for n in names if "dist-packages" in n or "site-packages" in n or "/python3.11/" in n]
    assert not [n for n in names if re.search(r"/(tests|bench|\.ci|\.git|debian|packaging)/", n)]
    assert not [n for n in names if n.startswith("/etc/ssh")], "the package must never ship ssh configuration"
    # nothing in /lib: Debian 13 is merged-/usr, where /lib is an alias and dpkg warns on purge
    assert {n.split("/")[1] for n in names if n != "/"} <= {"etc", "usr"}
    assert {owner for _, owner in contents.values()} == {"root/root"}


def test_unit_example_config_manpages_logrotate_completion(contents: dict[str, tuple[str, str]]) -> None:
    assert "/usr/lib/systemd/system/vps-agent.service" in contents
    # the config is the admin's (the postinst writes it on a first install): the package ships only the example
    assert "/etc/vps-agent/config.yaml" not in contents
    for path in (
        "/usr/share/vps-agent/config.example.yaml",
        "/etc/logrotate.d/vps-agent",
        "/usr/share/man/man8/vps-agent.8.gz",
        "/usr/share/man/man8/vps-agentctl.8.gz",
        "/usr/share/man/man5/vps-agent.yaml.5.gz",
        "/usr/share/bash-completion/completions/vps-agentctl",
        "/usr/share/doc/vps-agent/copyright",
        "/usr/share/doc/vps-agent/changelog.gz",
    ):
        assert path in contents, f"{path} missing"
        assert contents[path][0] == "-rw-r--r--", f"{path}: {contents[path][0]}"


def test_shipped_files_are_the_sources(unpacked: Path, contents: dict[str, tuple[str, str]]) -> None:
    example = unpacked / "usr/share/vps-agent/config.example.yaml"
    assert example.read_bytes() == (REPO / "config.example.yaml").read_bytes()
    unit_path = next(n for n in contents if n.endswith("/systemd/system/vps-agent.service"))
    unit = (unpacked / unit_path.lstrip("/")).read_text()
    assert unit == (REPO / "systemd/vps-agent.service").read_text()
    exec_start = re.search(r"^ExecStart=(\S+) run$", unit, re.MULTILINE)
    assert exec_start and exec_start.group(1) == "/usr/bin/vps-agent", "ExecStart must run the packaged launcher"
    completion = unpacked / "usr/share/bash-completion/completions/vps-agentctl"
    assert completion.read_bytes() == (REPO / "packaging/bash-completion/vps-agentctl").read_bytes()
    # the collector snippets (rsyslog, Vector, Filebeat, Alloy, Prometheus alerts), as in packaging/collectors
    shipped = unpacked / "usr/share/vps-agent/collectors"
    sources = sorted(p.name for p in (REPO / "packaging/collectors").iterdir())
    assert sorted(p.name for p in shipped.iterdir()) == sources and len(sources) == 5
    for name in sources:
        assert (shipped / name).read_bytes() == (REPO / "packaging/collectors" / name).read_bytes()
        assert contents[f"/usr/share/vps-agent/collectors/{name}"][0] == "-rw-r--r--"


# --- control data ---------------------------------------------------------------------------------


def test_control_fields(deb: Path) -> None:
    assert field(deb, "Package") == "vps-agent"
    assert field(deb, "Architecture") == "all"
    depends = [d.strip() for d in field(deb, "Depends").split(",")]
    for package in RUNTIME_DEPENDS:
        assert package in depends, f"Depends lacks {package}: {depends}"
    assert "python3 (>= 3.11)" in depends
    assert "iptables | nftables" in depends  # the firewall guard: iptables (nft or legacy) or native nftables
    assert not [d for d in depends if re.search(r"pip|virtualenv|venv", d)], depends
    recommends = [r.strip() for r in field(deb, "Recommends").split(",")]
    # fail2ban's `backend = systemd` (the agent's jail on a journal-only Debian 12) needs python3-systemd,
    # which fail2ban itself only recommends
    assert "python3-systemd" in depends
    for package in ("openssh-server", "fail2ban"):
        assert package in recommends, f"Recommends lacks {package}: {recommends}"


def test_conffiles(control_dir: Path) -> None:
    conffiles = (control_dir / "conffiles").read_text().split()
    # not a conffile: a config placed before the install is the admin's, and dpkg asks nothing about it
    assert "/etc/vps-agent/config.yaml" not in conffiles
    assert "/etc/logrotate.d/vps-agent" in conffiles


def test_maintainer_scripts(control_dir: Path) -> None:
    for script in ("postinst", "prerm", "postrm"):
        path = control_dir / script
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
        check = run("sh", "-n", str(path))
        assert check.returncode == 0, f"{script}: {check.stderr}"
    postinst = (control_dir / "postinst").read_text()
    assert "py3compile -p vps-agent /usr/share/vps-agent" in postinst
    assert "deb-systemd-helper enable 'vps-agent.service'" in postinst
    # started on install, restarted (not stopped and started) on upgrade
    assert "_dh_action=restart" in postinst and "deb-systemd-invoke $_dh_action 'vps-agent.service'" in postinst
    prerm = (control_dir / "prerm").read_text()
    assert re.search(r'"\$1" = remove \] && .*\n\s*deb-systemd-invoke stop .vps-agent\.service.', prerm)
    assert "py3clean -p vps-agent" in prerm
    postrm = (control_dir / "postrm").read_text()
    code = "\n".join(line for line in postrm.splitlines() if not line.lstrip().startswith("#"))
    purge = re.search(r"^\s*purge\)\n(.*?)^\s*;;", code, re.MULTILINE | re.DOTALL)
    assert purge, "postrm has no purge branch"
    assert "rm -rf /var/lib/vps-agent /var/log/vps-agent" in purge.group(1)
    assert 'rm -f "$DPKG_ROOT/etc/vps-agent/config.yaml"' in purge.group(1)  # the postinst's file, not dpkg's
    assert "write_first_config" in postinst and "/usr/share/vps-agent/config.example.yaml" in postinst
    # purge never undoes the hardening: no command in any script touches /etc/ssh
    for script in ("postinst", "prerm", "postrm"):
        text = (control_dir / script).read_text()
        commands = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        assert not [line for line in commands if "/etc/ssh" in line], script


def test_lintian_clean(deb: Path) -> None:
    done = run("lintian", "--fail-on", "error,warning", str(deb))
    assert done.returncode == 0, f"lintian:\n{done.stdout}\n{done.stderr}"


# --- the launchers and the code run from the unpacked package -------------------------------------


@pytest.fixture
def decoy(tmp_path: Path) -> Path:
    """A directory with another module named agent: the launchers must never import it."""
    package = tmp_path / "decoy" / "agent"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise ImportError("imported the decoy agent, not the private one")\n')
    return package.parent


def launcher(unpacked: Path, name: str, tmp_path: Path) -> Path:
    """The packaged launcher with its private directory moved to the unpacked tree, and nothing else changed."""
    text = (unpacked / "usr/bin" / name).read_text()
    assert text.startswith("#!/usr/bin/python3\n"), "launchers run Debian's python3"
    literal = f'PRIVATE_DIR = "{PRIVATE_DIR}"'
    assert text.count(literal) == 1, f"{name} must name {PRIVATE_DIR} once"
    relocated = tmp_path / name
    relocated.write_text(text.replace(literal, f'PRIVATE_DIR = "{unpacked}{PRIVATE_DIR}"'))
    return relocated


def run_launcher(path: Path, *args: str, decoy: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "PYTHONPATH": str(decoy)}
    return run(DEBIAN_PYTHON, str(path), *args, cwd=decoy, env=env)


def test_private_modules_import_from_the_unpacked_tree(unpacked: Path, tmp_path: Path) -> None:
    private = unpacked / PRIVATE_DIR.lstrip("/")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import agent.cli, agent.daemon;"
        "print(agent.cli.__file__); print(agent.daemon.__file__)"
    )
    done = run(DEBIAN_PYTHON, "-c", code, str(private), cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert all(line.startswith(str(private) + "/agent/") for line in done.stdout.splitlines()), done.stdout


def test_launchers_run_the_private_modules(unpacked: Path, tmp_path: Path, decoy: Path, deb: Path) -> None:
    daemon = launcher(unpacked, "vps-agent", tmp_path)
    ctl = launcher(unpacked, "vps-agentctl", tmp_path)
    version = run_launcher(daemon, "--version", decoy=decoy)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"vps-agent {field(deb, 'Version')}"
    helped = run_launcher(ctl, "--help", decoy=decoy)
    assert helped.returncode == 0 and "validate-config" in helped.stdout, helped.stderr
    # the shipped example is valid for the shipped code
    example = unpacked / "usr/share/vps-agent/config.example.yaml"
    valid = run_launcher(ctl, "validate-config", str(example), decoy=decoy)
    assert valid.returncode == 0, valid.stdout + valid.stderr
    # the exit code of main() is the launcher's: 3 = daemon unreachable
    unreachable = run_launcher(ctl, "--socket", str(tmp_path / "no.sock"), "status", decoy=decoy)
    assert unreachable.returncode == 3, unreachable.stdout + unreachable.stderr


# --- logrotate --------------------------------------------------------------------------------------


def test_logrotate_rotates_and_its_postrotate_fails_quietly(unpacked: Path, tmp_path: Path) -> None:
    require_root_and_tools("logrotate")
    policy = (unpacked / "etc/logrotate.d/vps-agent").read_text()
    assert "/var/log/vps-agent/events.jsonl {" in policy
    assert "systemctl --no-block reload vps-agent.service" in policy
    logs = tmp_path / "log"
    logs.mkdir(mode=0o750)
    events = logs / "events.jsonl"
    events.write_text('{"event": {"action": "agent-started"}}\n')
    # same policy on a scratch file; a unit name that exists nowhere, so no running agent is ever signalled
    config = tmp_path / "logrotate.conf"
    config.write_text(
        policy.replace("/var/log/vps-agent/events.jsonl", str(events)).replace(
            "vps-agent.service", "vps-agent-package-test-nonexistent.service"
        )
    )
    done = run("logrotate", "--state", str(tmp_path / "state"), "--force", "--verbose", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (logs / "events.jsonl.1").read_text().startswith('{"event"')
    assert events.exists() and events.stat().st_size == 0
    assert stat.S_IMODE(events.stat().st_mode) == 0o640


# --- make deb VERSION=... -------------------------------------------------------------------------


def test_version_comes_only_from_the_command_line(deb: Path) -> None:
    env = make_env() | {"VERSION": "9.9.9"}
    dry = run("make", "-n", "deb", env=env)
    assert dry.returncode == 0, dry.stderr
    assert f"build/vps-agent-{changelog_version()}" in dry.stdout and "9.9.9" not in dry.stdout


@pytest.fixture
def other_version() -> Iterator[str]:
    version = f"{changelog_version()}~pkgtest1"
    yield version
    shutil.rmtree(REPO / "build" / f"vps-agent-{version}", ignore_errors=True)
    (REPO / "build" / f"vps-agent-{version}.files").unlink(missing_ok=True)
    for artifact in (REPO / "build").glob(f"vps-agent_{version}_*"):
        artifact.unlink()


def test_make_deb_version_builds_the_same_tree_as_another_version(
    deb: Path, other_version: str, tmp_path: Path
) -> None:
    before = run("git", "status", "--porcelain", "--", "packaging/debian/changelog", "agent/__init__.py").stdout
    make_deb(f"VERSION={other_version}")
    other = REPO / "build" / f"vps-agent_{other_version}_all.deb"
    assert field(other, "Version") == other_version
    assert run("git", "status", "--porcelain", "--", "packaging/debian/changelog", "agent/__init__.py").stdout == before
    run("dpkg-deb", "-x", str(other), str(tmp_path))
    init = (tmp_path / "usr/share/vps-agent/agent/__init__.py").read_text()
    assert f'__version__ = "{other_version}"' in init
    changelog = run("sh", "-c", f"zcat {tmp_path}/usr/share/doc/vps-agent/changelog.gz").stdout
    assert changelog.startswith(f"vps-agent ({other_version}) ")
    listing = {line.split(None, 5)[5] for line in run("dpkg-deb", "-c", str(other)).stdout.splitlines()}
    ours = {line.split(None, 5)[5] for line in run("dpkg-deb", "-c", str(deb)).stdout.splitlines()}
    assert listing == ours

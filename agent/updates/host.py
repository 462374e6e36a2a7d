"""What the host says about an upgrade: the security-only sources apt is given, whether a reboot is
required, who is logged in."""

from __future__ import annotations

from agent.paths import SystemRoot
from agent.system import apt, fs


def reboot_required(root: SystemRoot) -> tuple[bool, list[str]]:
    """Debian's flag (/run/reboot-required) and the packages that set it (.pkgs)."""
    flag = root.reboot_required
    if not flag.exists():
        return False, []
    text = fs.read_text(flag.with_name(flag.name + ".pkgs")) or ""
    return True, sorted(set(text.split()))


def security_sources(root: SystemRoot) -> apt.SecuritySources:
    """Write the security-only sources list (from /etc/apt's own) into the state directory."""
    files = []
    etc = root.apt_etc
    candidates = [etc / "sources.list"] + sorted((etc / "sources.list.d").glob("*"))
    for path in candidates:
        if path.name.endswith((".list", ".sources")):
            text = fs.read_text(path)
            if text is not None:
                files.append((path.name, text))
    lines = apt.security_lines(files)
    directory = root.state_dir / "apt-security"
    parts = directory / "sources.list.d"
    fs.ensure_dir(parts, 0o755)
    header = "# written by vps-agent for updates.mode: security-only, from /etc/apt's sources\n"
    fs.atomic_write(directory / "sources.list", (header + "".join(f"{x}\n" for x in lines)).encode(), mode=0o644)
    return apt.SecuritySources(root.system_name(directory / "sources.list"), root.system_name(parts))


def logged_in_users() -> int:
    # imported here, when a reboot is decided: psutil costs the resident daemon ~2.8 MiB of RSS
    import psutil

    return len(psutil.users())

"""The strict guard (profile: strict): core dumps off and unused modules blacklisted, in files it owns whole; a
module loaded now is held back with the reason; off under baseline."""

from __future__ import annotations

from pathlib import Path

from agent.config import parse_config
from agent.controls.base import NEEDS_CHANGE, Drift
from agent.controls.strict import MODULES, StrictControl, blacklist_text
from agent.paths import SystemRoot
from tests.guards import NO_SSH

STRICT = parse_config("profile: strict\n")


def guard(tmp_path: Path, modules: str | None = "ext4 1 2 - Live 0x0\n") -> StrictControl:
    root = SystemRoot.at(tmp_path / "r")
    if modules is not None:
        root.proc_modules.parent.mkdir(parents=True)
        root.proc_modules.write_text(modules)
    return StrictControl(root)


def drift_now(control: StrictControl) -> Drift | None:
    desired = control.desired(STRICT, NO_SSH)
    return control.diff(control.observe(desired), desired)


def converge(control: StrictControl) -> None:
    """What the transaction does with the plan: write each file (the guard's own doors are the transaction's)."""
    desired = control.desired(STRICT, NO_SSH)
    observed = control.observe(desired)
    held = control.preconditions(observed, desired)
    if held is not None:
        desired = held.desired
    drift = control.diff(observed, desired)
    assert drift is not None
    for change in control.plan(observed, desired, drift).files:
        assert change.content is not None and change.mode in (0o644, None)  # None: login.defs keeps its own
        change.path.parent.mkdir(parents=True, exist_ok=True)
        change.path.write_bytes(change.content)


def test_only_strict_enables_it(tmp_path: Path) -> None:
    control = guard(tmp_path)
    assert control.meta(STRICT).enabled and not control.meta(parse_config("")).enabled


def test_a_fresh_host_gets_the_three_files_and_is_then_compliant(tmp_path: Path) -> None:
    control = guard(tmp_path)
    drift = drift_now(control)
    assert drift is not None and [item.actual for item in drift.items] == ["missing"] * 5
    assert [item.what for item in drift.items][3:] == ["issue", "issue.net"]
    converge(control)
    root = control.root
    assert "[Coredump]\nStorage=none\nProcessSizeMax=0\n" in root.coredump_dropin.read_text()
    assert root.core_limits.read_text().endswith("\n* hard core 0\n")
    blacklist = root.modprobe_blacklist.read_text()
    for name in ("dccp", "sctp", "rds", "tipc", "usb-storage", "firewire-core"):
        assert f"\nblacklist {name}\ninstall {name} /bin/false\n" in blacklist
    assert "squashfs" not in blacklist and "vfat" not in blacklist
    assert drift_now(control) is None


def test_an_edit_is_drift_the_plan_reverts(tmp_path: Path) -> None:
    control = guard(tmp_path)
    converge(control)
    control.root.core_limits.write_text("* hard core unlimited\n")
    drift = drift_now(control)
    assert drift is not None and [(i.what, i.actual) for i in drift.items] == [("limits", "modified")]
    assert "-* hard core unlimited" in drift.diff
    converge(control)
    assert drift_now(control) is None


def test_a_symlink_planted_at_a_path_is_replaced_not_followed(tmp_path: Path) -> None:
    control = guard(tmp_path)
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    control.root.coredump_dropin.parent.mkdir(parents=True)
    control.root.coredump_dropin.symlink_to(target)
    drift = drift_now(control)
    assert drift is not None and "symlink" in drift.items[0].actual
    assert target.read_text() == "precious\n"


def test_a_loaded_module_is_held_back_with_the_reason_and_the_rest_applies(tmp_path: Path) -> None:
    control = guard(tmp_path, "sctp 409600 4 - Live 0x0\nusb_storage 77824 1 uas, Live 0x0\next4 1 2 - Live 0x0\n")
    desired = control.desired(STRICT, NO_SSH)
    observed = control.observe(desired)
    held = control.preconditions(observed, desired)
    assert held is not None and held.blocked
    assert [item.setting for item in held.settings] == ["install sctp /bin/false", "install usb-storage /bin/false"]
    assert all(item.needs == NEEDS_CHANGE and "is loaded now" in item.reason for item in held.settings)
    assert "modprobe -r sctp" in held.settings[0].unblock
    assert held.desired.modules == ("dccp", "rds", "tipc", "firewire-core")
    converge(control)
    blacklist = control.root.modprobe_blacklist.read_text()
    assert "sctp" not in blacklist and "usb-storage" not in blacklist and "install dccp /bin/false" in blacklist


def test_without_a_module_list_nothing_can_be_loaded_to_break(tmp_path: Path) -> None:
    control = guard(tmp_path, modules=None)
    desired = control.desired(STRICT, NO_SSH)
    observed = control.observe(desired)
    assert observed.loaded is None and control.preconditions(observed, desired) is None
    assert control.facts(observed, desired) == {"modules": "this kernel lists none (/proc/modules absent)"}


def test_the_blacklist_never_names_what_a_vps_boots_or_updates_from() -> None:
    assert not {"squashfs", "vfat"} & set(MODULES)
    assert blacklist_text(MODULES).count("install ") == len(MODULES)


DEBIAN_LOGIN_DEFS = (Path(__file__).parent.parent / "data/login.defs.debian12").read_bytes()


def test_login_defs_gets_umask_027_and_the_hashing_rounds_every_other_line_byte_for_byte(tmp_path: Path) -> None:
    control = guard(tmp_path)
    converge(control)  # the owned files and the banners first: this test is about login.defs
    defs = control.root.login_defs
    defs.write_bytes(DEBIAN_LOGIN_DEFS)
    drift = drift_now(control)
    assert drift is not None
    umask_line = DEBIAN_LOGIN_DEFS.decode().splitlines().index("UMASK\t\t022") + 1
    assert [(i.what, i.actual, i.line) for i in drift.items] == [
        ("UMASK", "022", umask_line),
        ("SHA_CRYPT_MIN_ROUNDS", "unset", None),
        ("SHA_CRYPT_MAX_ROUNDS", "unset", None),
    ]
    assert all(i.where == "/etc/login.defs" for i in drift.items)
    converge(control)
    after = defs.read_text().splitlines()
    before = DEBIAN_LOGIN_DEFS.decode().splitlines()
    assert after[umask_line - 1].startswith("# [vps-agent ") and after[umask_line - 1].endswith(
        "neutralised, the agent keeps UMASK 027: UMASK\t\t022"
    )
    assert [line for n, line in enumerate(after[: len(before)]) if n != umask_line - 1] == [
        line for n, line in enumerate(before) if n != umask_line - 1
    ]
    assert after[len(before) + 1 :] == ["UMASK\t027", "SHA_CRYPT_MIN_ROUNDS\t65536", "SHA_CRYPT_MAX_ROUNDS\t65536"]
    assert drift_now(control) is None
    # an admin who sets it again, or twice, is drift; the agent's block is not written twice
    defs.write_text(defs.read_text() + "UMASK 022\n")
    drift = drift_now(control)
    assert drift is not None and [(i.what, i.actual) for i in drift.items] == [("UMASK", "022")]
    converge(control)
    assert drift_now(control) is None and defs.read_text().count("profile: strict keeps these") == 1


def test_no_login_defs_is_nothing_to_edit(tmp_path: Path) -> None:
    control = guard(tmp_path)
    converge(control)
    assert not control.root.login_defs.exists() and drift_now(control) is None


def test_debians_stock_banner_becomes_a_legal_one_and_an_admins_own_warning_is_kept(tmp_path: Path) -> None:
    control = guard(tmp_path)
    converge(control)
    root = control.root
    root.issue.write_text("Debian GNU/Linux 12 \\n \\l\n\n")
    root.issue_net.write_text("Authorized users only. Disconnect now if you are not one.\n")
    drift = drift_now(control)
    assert drift is not None and [(i.what, i.expected) for i in drift.items] == [("issue", "a legal banner")]
    converge(control)
    assert "monitored and logged" in root.issue.read_text() and "prohibited" in root.issue.read_text()
    assert root.issue_net.read_text().startswith("Authorized users only.")  # the admin's words stay
    assert drift_now(control) is None

"""Property: any text given as config.yaml gives a Config or a ConfigError naming the file, the line and
(for a value the schema refuses) the dotted key; never another exception.

Three sources of text: anything at all; configs built from the schema (every section and key, values of
every YAML type, near-valid values, unknown keys, block and flow style); and the shipped
config.example.yaml with lines deleted, duplicated, re-indented or cut.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from agent.config import Config, ConfigError, parse_config, schema
from agent.config.loader import SECTIONS
from tests.unit.conftest import DeclaredCommands

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yaml"
SOURCE = "/etc/vps-agent/config.yaml"
SECTION_CLASSES = {
    "ssh": schema.SshConfig,
    "firewall": schema.FirewallConfig,
    "fail2ban": schema.Fail2banConfig,
    "updates": schema.UpdatesConfig,
    "accounts": schema.AccountsConfig,
    "sysctl": schema.SysctlConfig,
    "engine": schema.EngineConfig,
    "events": schema.EventsConfig,
    "backups": schema.BackupsConfig,
}
# keys inside the values: a port rule's, syslog's
INNER_KEYS = ("port", "from", "target", "tls", "ca_file", "buffer", "facility")


@pytest.fixture(autouse=True)
def _calendar_answers(commands: DeclaredCommands) -> None:
    """updates.schedule asks systemd-analyze; a fixed answer keeps each example in-process and fast."""
    commands.expect(["systemd-analyze", "calendar"], returncode=1, stderr="Failed to parse calendar specification")


def check(text: str) -> Config | ConfigError:
    """The property itself: parse_config returns a Config or raises a ConfigError that says where."""
    try:
        return parse_config(text, source=SOURCE)
    except ConfigError as whole:
        assert str(whole).startswith(SOURCE)
        assert len(str(whole).splitlines()) == len(whole.errors), "one line per error"
        for err in whole.errors:  # every error of the file at once (ConfigErrors), each one line naming where
            assert err.file == SOURCE
            assert "\n" not in str(err), "an error is one line"
            if len(text) <= 1024 * 1024:
                assert err.line is not None, f"no line in {err}"
                assert 1 <= err.line <= text.count("\n") + 1, f"{err} (the text has {text.count(chr(10)) + 1} lines)"
                assert str(err).startswith(f"{SOURCE}:{err.line}:")
            if err.problem is None and err.key:
                assert err.key.split(".")[0].split("[")[0] in {*SECTIONS, *_named_in(text)}, err
        return whole


def _named_in(text: str) -> set[str]:
    """Anything that could be a top-level key of the text (for unknown sections named in the error)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return set()
    if not isinstance(node, yaml.MappingNode):
        return set()
    return {str(k.value) for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


# --- any text --------------------------------------------------------------------------------------------------


@given(st.text())
@example("ssh:\n  port: 70000\n")
@example("\x00")
@example("ssh: [\n")
@example("- a\n- b\n")
@example("&a [*a]")
@example("ssh: !!python/object:os.system ls\n")
def test_any_text_gives_a_config_or_an_error_naming_where(text: str) -> None:
    check(text)


# --- configs built from the schema --------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-2, max_value=70000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "yes",
            "no",
            "prohibit-password",
            "without-password",
            "forced-commands-only",
            "auto",
            "enforce",
            "report",
            "5m",
            "1h",
            "-1",
            "0",
            "10s",
            "1d 2h",
            "daily 03:30",
            "weekly sun 04:00",
            "03:00-05:00",
            "udp://logs.example:514",
            "tcp://[2001:db8::1]:6514",
            "10.0.0.0/8",
            "2001:db8::/32",
            "1000-2000",
            "/var/log/x.jsonl",
            "/var/lib/prometheus/node-exporter/x.prom",
            "admin",
            "root",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample admin@laptop",
            "0x1f",
            "1_000",
            "10:00",
            "~",
            "",
            "PermitRootLogin",
            "AllowUsers admin",
            "line\nbreak",
            "tab\there",
            "\x7f",
        ]
    ),  # fmt: skip
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(INNER_KEYS), st.text(max_size=8)), inner, max_size=4),
    ),
    max_leaves=12,
)


@st.composite
def structured_configs(draw: st.DrawFn) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from([*SECTION_CLASSES, "sshd", "Firewall"]), max_size=5, unique=True)):
        cls = SECTION_CLASSES.get(name)
        if cls is None or draw(st.integers(0, 9)) == 0:  # an unknown section, or a section that is not a mapping
            config[name] = draw(values)
            continue
        keys = [f.name for f in dataclasses.fields(cls)]
        chosen = draw(st.lists(st.sampled_from([*keys, "typo_key"]), max_size=len(keys), unique=True))
        config[name] = {key: draw(values) for key in chosen} or None
    return config


@given(structured_configs(), st.sampled_from([False, True, None]), st.booleans())
def test_schema_shaped_configs_give_a_config_or_an_error_naming_the_key(
    config: dict[str, Any], flow: bool | None, comments: bool
) -> None:
    text = yaml.safe_dump(config, default_flow_style=flow, allow_unicode=True, sort_keys=False)
    if comments:
        text = "# written by an admin\n" + text.replace("\n", "  # note\n", 1)
    result = check(text)
    if isinstance(result, ConfigError) and result.problem is None and config:
        assert result.key, f"a schema error without a key: {result}"


# --- the shipped example, damaged ----------------------------------------------------------------------------------

EXAMPLE_LINES = EXAMPLE.read_text().splitlines(keepends=True)
edits = st.tuples(
    st.sampled_from(["delete", "duplicate", "indent", "dedent", "cut", "uncomment", "tab"]),
    st.integers(0, len(EXAMPLE_LINES) - 1),
    st.integers(0, 40),
)


@given(st.lists(edits, max_size=6))
def test_the_example_damaged_anywhere_gives_a_config_or_an_error_naming_where(
    changes: list[tuple[str, int, int]],
) -> None:
    lines = list(EXAMPLE_LINES)
    for what, index, amount in changes:
        index %= len(lines) or 1
        if not lines:
            break
        line = lines[index]
        if what == "delete":
            del lines[index]
        elif what == "duplicate":
            lines.insert(index, line)
        elif what == "indent":
            lines[index] = " " * (amount % 5 + 1) + line
        elif what == "dedent":
            lines[index] = line.lstrip(" ")
        elif what == "cut":
            lines[index] = line[: amount % (len(line) + 1)]
        elif what == "uncomment":
            lines[index] = line.replace("# ", "", 1).replace("#", "", 1)
        else:
            lines[index] = line.replace("  ", "\t", 1)
    check("".join(lines))


def test_the_example_itself_is_a_config() -> None:
    assert isinstance(check(EXAMPLE.read_text()), Config)

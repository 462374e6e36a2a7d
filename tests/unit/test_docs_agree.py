"""The docs say what the program does: the controls, the vps-agentctl verbs and their options, and the config
keys listed in vps-agentctl(8), vps-agent(8), vps-agent.yaml(5), the bash completion and --help are the same
sets as the daemon's, the parser's and the schema's. (README is checked only loosely, for the controls.) README and
docs/: the README opens with its two commands, is short and links every docs file; their links resolve and the
config keys they name exist."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from agent.cli import build_parser
from agent.config.schema import Config
from agent.paths import SystemRoot
from agent.wiring import SshShared, build_controls

REPO = Path(__file__).resolve().parents[2]
MAN = REPO / "packaging/man"
COMPLETION = (REPO / "packaging/bash-completion/vps-agentctl").read_text()


def roff(name: str) -> str:
    """A man page's source with the escapes that matter here undone: \\- is -, font changes go."""
    text = (MAN / name).read_text()
    return re.sub(r"\\f[BIRP]", "", text.replace("\\-", "-"))


def the_verbs() -> dict[str, argparse.ArgumentParser]:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(commands.choices)


def options_of(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")}


@pytest.fixture(scope="module")
def controls(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = SystemRoot.at(tmp_path_factory.mktemp("root"))
    return [c.name for c in build_controls(root, SshShared.of(root), lambda: False)]


def bold_words(text: str) -> list[str]:
    """The words set in bold (.B word, .BR word ,) in a run of roff lines."""
    return re.findall(r"^\.BR? (\w+)", text, re.M)


# --- controls ---------------------------------------------------------------------------------------


def test_the_controls_are_the_same_everywhere(controls: list[str]) -> None:
    assert controls == ["ssh", "firewall", "fail2ban", "accounts", "sysctl", "strict"]  # the daemon's, in its order
    ctl = roff("vps-agentctl.8")
    listed = ctl[ctl.index("in this release are") :].split(".\nA command", 1)[0]
    assert bold_words(listed) == controls
    agent = roff("vps-agent.8")
    listed = agent[agent.index("This release has six controls:") :].split("described under", 1)[0]
    assert bold_words(listed) == controls
    assert re.search(r'local controls="([^"]*)"', COMPLETION)[1].split() == controls  # type: ignore[index]
    for verb in ("check", "diff", "pause", "resume", "converge"):
        help_text = next(a.help for a in the_verbs()[verb]._actions if a.dest == "control")
        assert re.findall(r"\b[a-z0-9]+\b", str(help_text).split(":", 1)[1]) == [*controls[:-1], "or", controls[-1]] + (
            [] if verb in ("check", "diff") else ["default", "all"]
        ), help_text


def test_readme_names_every_control(controls: list[str]) -> None:
    for name in controls:
        readme = (REPO / "README.md").read_text()
        # what each guard does to a new host
        assert re.search(rf"\*\*{name}\*\*|`{name}`|\b{name}\b guard", readme, re.I), name


# --- verbs and their options ------------------------------------------------------------------------


def man_synopsis() -> dict[str, set[str]]:
    """verb -> the options vps-agentctl(8)'s SYNOPSIS gives it."""
    text = roff("vps-agentctl.8")
    synopsis = text[text.index(".SH SYNOPSIS") : text.index(".SH DESCRIPTION")]
    verbs: dict[str, set[str]] = {}
    for block in synopsis.split(".br\n"):
        found = [m for m in re.finditer(r"^\.B ([a-z][a-z-]*)$", block, re.M) if m[1] != "vps-agentctl"]
        if found:
            verbs[found[0][1]] = set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", block[found[0].end() :]))
    return verbs


def man_commands() -> list[str]:
    text = roff("vps-agentctl.8")
    commands = text[text.index(".SH COMMANDS") : text.index(".SH STATUS WORDS")]
    return re.findall(r"^\.TP\n\.B ([a-z][a-z-]*)", commands, re.M)


def completion_options() -> dict[str, set[str]]:
    block = COMPLETION[COMPLETION.index("case $command in") :]
    block = block[: block.index("    esac")]
    verbs: dict[str, set[str]] = {}
    for labels, body in re.findall(r"^ {8}([a-z| -]+)\)(.*?)(?=^ {8}[a-z*][a-z| -]*\)|\Z)", block, re.M | re.S):
        opts = re.search(r'opts="([^"]*)"', body)
        for label in labels.split("|"):
            verbs[label.strip()] = set(opts[1].split()) if opts else set()
    return verbs


def test_the_verbs_are_the_same_in_the_parser_the_man_page_and_the_completion() -> None:
    verbs = list(the_verbs())
    assert list(man_synopsis()) == verbs  # in --help's order
    assert re.search(r'local commands="([^"]*)"', COMPLETION)[1].split() == verbs  # type: ignore[index]
    assert sorted(man_commands()) == sorted(verbs)  # each described once, in the man page's order
    assert sorted(completion_options()) == sorted(verbs)


def test_each_verb_has_the_same_options_in_the_parser_the_man_page_and_the_completion() -> None:
    synopsis, completion = man_synopsis(), completion_options()
    for verb, parser in the_verbs().items():
        assert synopsis[verb] == options_of(parser), f"vps-agentctl(8) SYNOPSIS of {verb}"
        assert completion[verb] == options_of(parser), f"the completion of {verb}"


def test_each_verbs_help_says_what_it_does_who_may_run_it_and_its_exit_codes() -> None:
    for verb, parser in the_verbs().items():
        text = parser.format_help()
        assert parser.description, verb
        assert "Who: " in text and "Exit codes:" in text, verb
        codes = re.findall(r"^  ([0-3])  ", text, re.M)
        assert codes == sorted(codes) and codes[0] == "0" and len(codes) >= 2, (verb, codes)


def test_every_verb_the_daemons_man_page_mentions_exists() -> None:
    mentioned = set(re.findall(r"vps-agentctl (?:\\ )?([a-z][a-z-]+)", roff("vps-agent.8")))
    assert mentioned and mentioned <= set(the_verbs()), mentioned - set(the_verbs())


# --- config keys ------------------------------------------------------------------------------------


def schema_keys() -> set[str]:
    keys = set()
    for section, kind in typing.get_type_hints(Config).items():
        if dataclasses.is_dataclass(kind):
            keys |= {f"{section}.{f.name}" for f in dataclasses.fields(kind)}
    return keys


def test_vps_agent_yaml_5_documents_every_key_of_the_schema_and_no_other() -> None:
    documented = set(re.findall(r"^\.TP\n\.B ([a-z0-9_]+\.[a-z0-9_]+)$", roff("vps-agent.yaml.5"), re.M))
    assert documented == schema_keys()


@pytest.mark.parametrize("page", ["vps-agent.8", "vps-agentctl.8", "vps-agent.yaml.5"])
def test_every_key_a_man_page_names_exists(page: str) -> None:
    sections = "|".join(f.name for f in dataclasses.fields(Config) if f.name != "source")
    files = r"(?!(?:service|socket|json|jsonl|conf|local|d)\b)"  # ssh.service, events.jsonl, sysctl.d: not keys
    named = set(re.findall(rf"(?<![\w/.-])((?:{sections})\.{files}[a-z_]+)(?![\w-]|\.[a-z])", roff(page)))
    assert named and named <= schema_keys(), named - schema_keys()


# --- README and docs/ -------------------------------------------------------------------------------

DOCS = REPO / "docs"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation (backticks too) dropped, spaces as -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_the_readme_starts_with_the_two_commands_and_is_short() -> None:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block and text.index(block[0]) < text.index("\n## ")  # before any section
    assert [line.split("#")[0].strip() for line in block[1].splitlines()] == ["sudo make demo", "sudo make test"]
    assert len(text.splitlines()) < 150


def test_the_readme_links_every_docs_file() -> None:
    linked = set(LINK.findall((REPO / "README.md").read_text()))
    assert sorted(p.name for p in DOCS.glob("*.md") if f"docs/{p.name}" not in linked) == []


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")) + ["README.md"])
def test_every_relative_link_resolves(page: str) -> None:
    path = DOCS / page if page != "README.md" else REPO / page
    broken = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists() or (anchor and anchor not in anchors(dest)):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")) + ["README.md"])
def test_every_key_the_readme_and_docs_name_exists(page: str) -> None:
    path = DOCS / page if page != "README.md" else REPO / page
    sections = "|".join(f.name for f in dataclasses.fields(Config) if f.name != "source")
    files = r"(?!(?:service|socket|json|jsonl|conf|local|d|py)\b)"  # ssh.service, events.jsonl, sysctl.d: not keys
    named = set(re.findall(rf"(?<![\w/.-])((?:{sections})\.{files}[a-z_]+)(?![\w-]|\.[a-z])", path.read_text()))
    assert named <= schema_keys(), named - schema_keys()

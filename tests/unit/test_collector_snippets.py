"""packaging/collectors/: the snippets for the collectors admins run parse, and point at what the agent
writes. (rsyslogd -N1 and promtool check the rsyslog and Prometheus ones for real: tests/integration.)"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from agent.config import DEFAULT_PROMETHEUS_TEXTFILE, EventsConfig

REPO = Path(__file__).resolve().parents[2]
COLLECTORS = REPO / "packaging/collectors"
EVENTS_FILE = EventsConfig().file
TEXTFILE_DIR = DEFAULT_PROMETHEUS_TEXTFILE.rsplit("/", 1)[0]


def test_every_snippet_is_named_in_the_operations_doc() -> None:
    # the Collectors section moved from README.md to docs/operations.md (issue 19); it links each file
    doc = (REPO / "docs/operations.md").read_text()
    names = sorted(p.name for p in COLLECTORS.iterdir())
    assert names == [
        "filebeat-vps-agent.yml",
        "prometheus-alerts.yml",
        "rsyslog-vps-agent.conf",
        "vector.yaml",
        "vps-agent.alloy",
    ]
    assert [n for n in names if f"](../packaging/collectors/{n})" not in doc] == []


def test_vector_reads_the_events_file_and_decodes_json() -> None:
    config = yaml.safe_load((COLLECTORS / "vector.yaml").read_text())
    source = config["sources"]["vps_agent_events"]
    assert source["type"] == "file" and source["include"] == [EVENTS_FILE]
    transform = config["transforms"]["vps_agent_ecs"]
    assert transform["inputs"] == ["vps_agent_events"] and "parse_json!" in transform["source"]
    for sink in config["sinks"].values():
        assert set(sink["inputs"]) <= set(config["transforms"])


def test_filebeat_input_decodes_ecs_onto_the_root() -> None:
    [entry] = yaml.safe_load((COLLECTORS / "filebeat-vps-agent.yml").read_text())
    assert entry["type"] == "filestream" and entry["paths"] == [EVENTS_FILE] and entry["id"]
    [parser] = entry["parsers"]
    assert parser["ndjson"]["target"] == "" and parser["ndjson"]["overwrite_keys"] is True


def test_prometheus_rules_use_only_series_the_agent_exports() -> None:
    rules = yaml.safe_load((COLLECTORS / "prometheus-alerts.yml").read_text())
    exported = set(re.findall(r'"(vps_agent_[a-z_]+)"', (REPO / "agent/sinks/textfile.py").read_text()))
    for rule in rules["groups"][0]["rules"]:
        used = set(re.findall(r"\bvps_agent_[a-z_]+", rule["expr"])) - {"vps_agent_prom"}
        assert used <= exported, f"{rule['alert']}: {used - exported}"


def test_alloy_config_is_balanced_and_reads_what_the_agent_writes() -> None:
    text = (COLLECTORS / "vps-agent.alloy").read_text()
    code = "\n".join(re.sub(r'"(?:[^"\\]|\\.)*"', '""', line.split("//")[0]) for line in text.splitlines())
    assert code.count("{") == code.count("}") and code.count("[") == code.count("]")
    assert text.count('"') % 2 == 0
    blocks = re.findall(r"^([a-z_.]+) \"([a-z_]+)\" \{", text, re.M)
    names = {f"{kind}.{label}" for kind, label in blocks}
    # every component referenced is defined
    for ref in re.findall(r"((?:loki|prometheus|local)\.[a-z_.]+?\.[a-z_]+)\.(?:receiver|targets)", code):
        assert ref in names, ref
    assert f'"{EVENTS_FILE}"' in text and f'"{TEXTFILE_DIR}"' in text

"""Prometheus for a fleet (packaging/prometheus/): promtool checks the config and its rule files, unit-tests
the fleet alerts on synthetic series, and checks every Grafana panel's expression (as a recording rule in
a generated rules file: promtool has no offline query check), so a broken expression fails here."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from tests.conftest import require_root_and_tools

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "packaging" / "prometheus"
DASHBOARD = PROMETHEUS / "grafana-vps-agent-fleet.json"
FLEET_RULES = PROMETHEUS / "vps-agent-fleet-alerts.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def panel_expressions() -> list[tuple[str, str]]:
    """(panel title, expression) for every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def check_as_recording_rules(expressions: list[tuple[str, str]], path: Path) -> subprocess.CompletedProcess[str]:
    rules = [{"record": f"dashboard:panel_{i}", "expr": expr} for i, (_, expr) in enumerate(expressions)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return promtool("check", "rules", str(path))


def test_the_config_and_both_rule_files_are_valid() -> None:
    require_root_and_tools("promtool")
    check = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert check.returncode == 0 and "SUCCESS: 2 rule files found" in check.stdout, check.stdout + check.stderr
    rules = promtool("check", "rules", str(FLEET_RULES))
    assert rules.returncode == 0 and "SUCCESS: 4 rules found" in rules.stdout, rules.stdout + rules.stderr


def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    require_root_and_tools("promtool")
    expressions = panel_expressions()
    assert len(expressions) >= 10
    check = check_as_recording_rules(expressions, tmp_path / "dashboard.rules.yml")
    assert check.returncode == 0 and f"SUCCESS: {len(expressions)} rules found" in check.stdout, check.stdout


def test_a_broken_dashboard_expression_is_caught(tmp_path: Path) -> None:
    require_root_and_tools("promtool")
    broken = [*panel_expressions(), ("broken", "sum by (control) (increase(vps_agent_heals_total[1h])")]
    check = check_as_recording_rules(broken, tmp_path / "dashboard.rules.yml")
    assert check.returncode != 0, check.stdout


def test_dashboard_and_fleet_alerts_use_only_series_the_agent_exports() -> None:
    exported = set(re.findall(r'"(vps_agent_[a-z_]+)"', (REPO / "agent/sinks/textfile.py").read_text()))
    used = {name for _, expr in panel_expressions() for name in re.findall(r"\bvps_agent_[a-z_]+", expr)}
    for rule in yaml.safe_load(FLEET_RULES.read_text())["groups"][0]["rules"]:
        used |= set(re.findall(r"\bvps_agent_[a-z_]+", rule["expr"]))
    assert used and used <= exported, used - exported
    # and the scrape job the fleet alerts and the dashboard select is the one prometheus.yml defines
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert [job["job_name"] for job in config["scrape_configs"]] == ["vps-agent"]


FLEET_RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{{job="vps-agent", instance="vps1"}}'
        values: '1x3 0x20'
      - series: 'up{{job="vps-agent", instance="vps2"}}'
        values: '1x30'
      - series: 'up{{job="vps-agent", instance="vps3"}}'
        values: '1x30'
      - series: 'vps_agent_build_info{{job="vps-agent", instance="vps1", version="0.1.0", python="3.11.2"}}'
        values: '1x3'
      - series: 'vps_agent_build_info{{job="vps-agent", instance="vps2", version="0.1.0", python="3.11.2"}}'
        values: '1x30'
      # vps3: node_exporter up, no agent metrics. vps2's ssh guard healed 12 times in 6 minutes
      - series: 'vps_agent_heals_total{{job="vps-agent", instance="vps2", control="ssh"}}'
        values: '0x10 2 4 6 8 10 12x20'
      - series: 'vps_agent_heals_total{{job="vps-agent", instance="vps2", control="firewall"}}'
        values: '0x10 1x20'
    alert_rule_test:
      - {{eval_time: 7m, alertname: VpsAgentHostDown, exp_alerts: []}}
      - eval_time: 10m
        alertname: VpsAgentHostDown
        exp_alerts:
          - exp_labels: {{job: vps-agent, instance: vps1, severity: critical}}
            exp_annotations:
              summary: "vps1: node_exporter has not answered for 5 minutes (host down or unreachable)"
      - {{eval_time: 9m, alertname: VpsAgentNotExporting, exp_alerts: []}}
      - eval_time: 11m
        alertname: VpsAgentNotExporting
        exp_alerts:
          - exp_labels: {{job: vps-agent, instance: vps3, severity: critical}}
            exp_annotations:
              summary: "vps3: node_exporter serves no vps-agent metrics (is the agent installed and running?)"
      - {{eval_time: 14m, alertname: VpsAgentHealingOften, exp_alerts: []}}
      - eval_time: 20m
        alertname: VpsAgentHealingOften
        exp_alerts:
          - exp_labels: {{job: vps-agent, instance: vps2, control: ssh, severity: warning}}
            exp_annotations:
              summary: "vps2: vps-agent healed its ssh guard 12 times in the last hour"
              description: "`vps-agentctl events` on the host shows each drift's diff: find what keeps making it."
  - interval: 10m
    input_series:
      - series: 'vps_agent_reboot_required{{instance="vps1"}}'
        values: '1x200'
      - series: 'vps_agent_reboot_required_since_timestamp_seconds{{instance="vps1"}}'
        values: '0x200'
    alert_rule_test:
      - {{eval_time: 23h, alertname: VpsAgentRebootRequiredForADay, exp_alerts: []}}
      - eval_time: 25h
        alertname: VpsAgentRebootRequiredForADay
        exp_alerts:
          - exp_labels: {{instance: vps1, severity: info}}
            exp_annotations:
              summary: "vps1: a reboot has been required for more than a day"
              description: "Set updates.reboot_window (vps_agent_config_extra) to let the agent reboot in a window,
                or reboot by hand."
"""


def test_each_fleet_alert_fires_when_it_should_and_not_before(tmp_path: Path) -> None:
    require_root_and_tools("promtool")
    tests = tmp_path / "fleet-alerts.test.yml"
    tests.write_text(FLEET_RULE_TESTS.format(rules=FLEET_RULES))
    run = promtool("test", "rules", str(tests))
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr

"""The shipped collector snippets, checked by the collectors' own tools: rsyslogd -N1 on the rsyslog
snippet, promtool on the alert rules (and promtool's rule unit tests: each alert fires when it should)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import require_root_and_tools

REPO = Path(__file__).resolve().parents[2]
COLLECTORS = REPO / "packaging/collectors"
RULES = COLLECTORS / "prometheus-alerts.yml"


def test_rsyslog_snippet_is_valid_for_rsyslogd(tmp_path: Path) -> None:
    require_root_and_tools("rsyslogd")
    main = tmp_path / "rsyslog.conf"
    main.write_text(f'global(workDirectory="{tmp_path}")\ninclude(file="{COLLECTORS / "rsyslog-vps-agent.conf"}")\n')
    check = subprocess.run(["rsyslogd", "-N1", "-f", str(main)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "error" not in (check.stdout + check.stderr).lower()


def test_alert_rules_are_valid_for_promtool() -> None:
    require_root_and_tools("promtool")
    check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "SUCCESS: 7 rules found" in check.stdout, check.stdout + check.stderr


RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'vps_agent_control_compliant{{instance="vps1", control="ssh"}}'
        values: '1 0x30'
      - series: 'vps_agent_control_compliant{{instance="vps1", control="firewall"}}'
        values: '1x30'
      - series: 'vps_agent_last_upgrade_success{{instance="vps1"}}'
        values: '1x3 0x30'
      - series: 'vps_agent_config_rejected{{instance="vps1"}}'
        values: '0x5 1x40'
      - series: 'vps_agent_syslog_dropped_total{{instance="vps1", target="tcp://logs:514"}}'
        values: '0x5 7x30'
      - series: 'node_textfile_mtime_seconds{{instance="vps1", file="/srv/textfile/vps_agent.prom"}}'
        values: '0x30'
    alert_rule_test:
      - {{eval_time: 10m, alertname: VpsAgentControlNonCompliant, exp_alerts: []}}
      - eval_time: 20m
        alertname: VpsAgentControlNonCompliant
        exp_alerts:
          - exp_labels: {{instance: vps1, control: ssh, severity: warning}}
            exp_annotations:
              summary: "vps1: vps-agent's ssh guard has not been compliant for 15 minutes"
              description: "Run `sudo vps-agentctl status` on the host: it says why
                (blocked, failed, flapping, paused...)."
      - {{eval_time: 5m, alertname: VpsAgentUpgradeFailed, exp_alerts: []}}
      - eval_time: 10m
        alertname: VpsAgentUpgradeFailed
        exp_alerts:
          - exp_labels: {{instance: vps1, severity: warning}}
            exp_annotations:
              summary: "vps1: the last package upgrade failed"
              description: "`vps-agentctl events` and `journalctl -u vps-agent` on the host show the upgrade's outcome."
      - {{eval_time: 20m, alertname: VpsAgentConfigRejected, exp_alerts: []}}
      - eval_time: 40m
        alertname: VpsAgentConfigRejected
        exp_alerts:
          - exp_labels: {{instance: vps1, severity: warning}}
            exp_annotations:
              summary: "vps1: vps-agent rejected its config file; the previous config is still in force"
              description: "`sudo vps-agentctl validate-config` on the host names the file, line and key."
      - {{eval_time: 4m, alertname: VpsAgentSyslogDropping, exp_alerts: []}}
      - eval_time: 8m
        alertname: VpsAgentSyslogDropping
        exp_alerts:
          - exp_labels: {{instance: vps1, target: "tcp://logs:514", severity: warning}}
            exp_annotations:
              summary: "vps1: vps-agent dropped events for tcp://logs:514"
      - {{eval_time: 9m, alertname: VpsAgentMetricsStale, exp_alerts: []}}
      - eval_time: 11m
        alertname: VpsAgentMetricsStale
        exp_alerts:
          - exp_labels: {{instance: vps1, file: /srv/textfile/vps_agent.prom, severity: critical}}
            exp_annotations:
              summary: "vps1: vps-agent has not updated its metrics for 10 minutes (is it running?)"
  - interval: 5m
    input_series:
      - series: 'vps_agent_reboot_required{{instance="vps1"}}'
        values: '1x2400'
      - series: 'vps_agent_reboot_required_since_timestamp_seconds{{instance="vps1"}}'
        values: '0x2400'
      - series: 'vps_agent_last_upgrade_timestamp_seconds{{instance="vps1"}}'
        values: '0x2400'
    alert_rule_test:
      - {{eval_time: 100h, alertname: VpsAgentRebootRequired, exp_alerts: []}}
      - eval_time: 170h
        alertname: VpsAgentRebootRequired
        exp_alerts:
          - exp_labels: {{instance: vps1, severity: info}}
            exp_annotations:
              summary: "vps1: a reboot has been required for more than 7 days"
      - {{eval_time: 70h, alertname: VpsAgentUpgradesStale, exp_alerts: []}}
      - eval_time: 80h
        alertname: VpsAgentUpgradesStale
        exp_alerts:
          - exp_labels: {{instance: vps1, severity: warning}}
            exp_annotations:
              summary: "vps1: no package upgrade has finished for 3d 8h 0m 0s"
"""


def test_each_alert_fires_when_it_should_and_not_before(tmp_path: Path) -> None:
    require_root_and_tools("promtool")
    tests = tmp_path / "alerts.test.yml"
    tests.write_text(RULE_TESTS.format(rules=RULES))
    run = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr

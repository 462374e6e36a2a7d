"""vps-agentctl's exit codes, the Nagios plugins' convention: 0 compliant, 1 drift or not yet compliant,
2 blocked or an error, 3 the daemon unreachable."""

EXIT_OK, EXIT_DRIFT, EXIT_ERROR, EXIT_UNREACHABLE = 0, 1, 2, 3

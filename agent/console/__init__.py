"""How vps-agentctl shows things to a person: colour on a terminal only, lines trimmed to its width, times
as a clock reads them (text.py); the status and check tables with their verdict line (status.py); one line
per event (events.py); the verbs' help texts and exit codes (help.py)."""

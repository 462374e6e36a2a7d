"""Where events and metrics leave the agent for the collectors admins already run: the journal (native
fields), remote syslog (RFC 5424) and node_exporter's textfile collector. The events file and the ring
buffer stay in agent/events.py."""

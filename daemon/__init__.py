"""overlapd.daemon: the process around the pipeline (CLI, socket server, systemd glue)."""

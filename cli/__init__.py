"""The `gpu-router` command line: the top layer, the one place that names every service, because it starts them
(commands, rendering to the terminal, exit codes, the demo, a local Prometheus/Alertmanager stack)."""

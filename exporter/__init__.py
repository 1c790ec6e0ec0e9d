"""`gpu-router exporter`: the Prometheus collector (collector) and its HTTP server (server)."""

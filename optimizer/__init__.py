"""`gpu-router optimizer`: the Alertmanager webhook, the JSON API and status page (app, webhook, statuspage), the
reconcile loop and the service that runs them (service)."""

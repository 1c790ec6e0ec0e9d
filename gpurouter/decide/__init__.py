"""Pure decisions: where each model should run (placement: check, route, plan) and which node serves a request
(choose)."""

"""Observability shared by the engine and the gateway (no torch): Prometheus metrics, JSON logs, traces."""

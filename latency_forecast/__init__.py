"""latency-forecast: forecast per-service p99 latency, alert before SLO breaches, explain why."""

__version__ = "0.1.0"

"""Prometheus metrics of the operator, served on KUBETASK_METRICS_PORT."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TRANSITIONS = Counter(
    "kubetask_run_transitions_total",
    "Status transitions the operator wrote, by reason (Assigned, WorkerLost, ...).",
    ["reason"],
)
WRITE_CONFLICTS = Counter(
    "kubetask_write_conflicts_total",
    "Status writes refused because the run changed since the decision; decided again.",
)
QUEUED_RUNS = Gauge("kubetask_queued_runs", "Runs waiting for a worker after the last pass.")
LIVE_WORKERS = Gauge(
    "kubetask_live_workers", "Ready worker pods with a fresh heartbeat, as of the last pass."
)
PASS_SECONDS = Histogram(
    "kubetask_scheduling_pass_seconds",
    "Time one scheduling pass spends deciding, in seconds.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)

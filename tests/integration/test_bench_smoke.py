"""`kubetask bench` end to end with small sizes: every part runs and reports every number.

Nothing here judges the numbers: CI machines are too noisy for timing assertions, and the targets
are for `make bench` on a quiet machine (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from kubetask_cli import cluster

from .conftest import REPO, run_command

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

PERCENTILE_KEYS = ("start_ms", "result_ms")
NUMBER_KEYS = (
    "limit_per_s",
    "throughput_per_s",
    "ratio",
    "writes_per_run",
    "backlog_ratio",
    "operator_rss_mb",
)


@pytest.fixture(scope="module")
def report(cluster_state: cluster.ClusterState, kubectl_env: dict[str, str]) -> dict[str, Any]:
    completed = run_command(
        [
            sys.executable, "-m", "kubetask_cli.main", "bench", "--json",
            "--runs", "50", "--latency-runs", "10",
            "--backlog-runs", "40", "--backlog-baseline-runs", "20",
            "--workers", "1", "--slots", "8", "--concurrency", "4",
        ],
        env=kubectl_env, cwd=REPO, timeout=220,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    parsed: dict[str, Any] = json.loads(completed.stdout)
    return parsed


def test_every_part_reports_a_positive_number(report: dict[str, Any]) -> None:
    for key in NUMBER_KEYS:
        value = report[key]
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
        assert value > 0, (key, value)


def test_latencies_come_as_ordered_percentiles(report: dict[str, Any]) -> None:
    for key in PERCENTILE_KEYS:
        percentiles = report[key]
        assert set(percentiles) == {"p50", "p95", "p99"}, key
        assert 0 < percentiles["p50"] <= percentiles["p95"] <= percentiles["p99"], (
            key,
            percentiles,
        )


def test_the_writes_behind_writes_per_run_are_broken_down(report: dict[str, Any]) -> None:
    writes = report["details"]["throughput"]["writes"]
    runs = report["details"]["throughput"]["runs"]

    assert writes and all(count > 0 for count in writes.values())
    assert sum(writes.values()) / runs == pytest.approx(report["writes_per_run"], abs=0.01)


def test_both_sides_of_the_ratio_are_the_best_of_two_alternating_samples(
    report: dict[str, Any],
) -> None:
    limits = report["details"]["limit"]["samples_per_s"]
    throughputs = report["details"]["throughput"]["samples_per_s"]

    assert len(limits) == len(throughputs) == 2
    assert report["limit_per_s"] == max(limits)
    assert report["throughput_per_s"] == max(throughputs)
    assert report["ratio"] == pytest.approx(max(throughputs) / max(limits), abs=0.01)

"""`kubetask bench`: what a run costs on a real cluster, next to what the API server allows.

Four parts, each optional (`--only`):

- limit: the ceiling. Bare objects of a throwaway CRD get exactly the writes a successful run
  costs: a create, a merge-patch of status guarded by the resourceVersion (what the operator's
  assignment is) and a JSON-patch of status guarded by `test` operations (what the worker's result
  is), from the same client library with the same concurrency, and nothing else happens.
- throughput: no-op runs through the operator and the workers, created as fast as the client can;
  runs/s from the first create to the last result the client sees, and the writes each run cost,
  read from the API server's own request counter. With the limit part too, the two alternate
  (limit, throughput, limit, throughput) and each reports its best sample, so that a slower spell
  of a shared machine weighs on neither side of the ratio alone.
- latency: one run at a time on an idle system with warm workers; trigger → start (the task
  function reports when it started) and trigger → result (when the client's watch sees Completed).
- backlog: runs queued while no worker exists, then drained by freshly started workers; a large
  backlog against a small one, and the operator's memory with the large one in the namespace.

The benchmark makes a namespace of its own, starts its own operator (`-n` that namespace) and
worker processes, and removes all of it at the end, also when interrupted.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any, NoReturn, TypeVar

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from kubetask import KubeTask
from kubetask.api import GROUP, VERSION
from kubetask.lifecycle import FINAL_PHASES, Phase, format_time, parse_time, utc_now
from kubetask.worker import WORKER_LABEL
from kubetask_cli import bench_tasks, cluster

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

PARTS = ("limit", "throughput", "latency", "backlog")

TASKRUNS = "taskruns"
WORKER_NAME = "bench-worker"
WORKER_TARGET = "kubetask_cli.bench_tasks:worker_from_environment"

#: Verbs of apiserver_request_total that change something.
MUTATING_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE", "DELETECOLLECTION", "APPLY"})

#: Runs put through the system before anything is timed: the first run of a fresh worker pays for
#: imports, connections and the Task object, which no later run does.
WARMUP_RUNS = 20

#: Seconds without progress (no run ending, no more runs seen queued) after which the benchmark
#: gives up on a part. Progress, not total time, is what is bounded: a slow system still gets
#: measured, and only a stuck one is given up on.
STALL_SECONDS = 180.0

#: Seconds the operator or a worker gets to stop on SIGTERM before it is killed. A worker deletes
#: its Lease and Pod on the way out, which takes a few requests.
STOP_GRACE_SECONDS = 15.0

#: Seconds a watch request stays open before the server ends it and it is opened again.
WATCH_SECONDS = 60

#: Seconds the system gets to go quiet before latencies are measured: the deletions of the
#: previous part's runs reach the operator and workers as watch events.
SETTLE_SECONDS = 2.0


class BenchError(Exception):
    """The benchmark could not measure something; the message says what happened."""


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    parts: frozenset[str] = frozenset(PARTS)
    runs: int = 2000
    """Runs of the throughput part, and objects of the limit part: half a minute at the 60-70
    runs/s of a 2-core machine, long enough for start-up and tail effects to fade."""
    workers: int = 2
    """Worker processes. On 2 cores more processes mostly compete for the same cores."""
    slots: int = 50
    """Slots per worker. A no-op run holds its slot for milliseconds, so the writes, not the
    slots, bound throughput."""
    concurrency: int = 16
    """Requests in flight: the client's creates, the operator's status writes
    (KUBETASK_WRITE_CONCURRENCY, whose default this is) and the limit's threads."""
    latency_runs: int = 200
    """Runs of the latency part, one at a time: 200 give a p99 that is more than one sample."""
    backlog_runs: int = 10_000
    """The large backlog: the size at which the issue asks for the operator's memory."""
    backlog_baseline_runs: int = 500
    """The small backlog the large one is compared with."""
    logs: Path | None = None
    """Where the operator's and workers' logs go; None: a temporary directory, kept on failure."""


def settings_from_arguments(arguments: Mapping[str, Any]) -> BenchSettings:
    """Settings from the options of `kubetask bench`; an option not given keeps its default."""
    given: dict[str, Any] = {}
    for field in dataclasses.fields(BenchSettings):
        value = arguments.get(field.name)
        if value is None or field.name in ("parts", "logs"):
            continue
        if value < 1:
            raise BenchError(f"--{field.name.replace('_', '-')} must be at least 1, not {value}.")
        given[field.name] = value
    if only := arguments.get("only"):
        parts = frozenset(part.strip() for part in only.split(",") if part.strip())
        if unknown := parts - set(PARTS):
            raise BenchError(f"Unknown parts {sorted(unknown)}; pick from {', '.join(PARTS)}.")
        given["parts"] = parts
    if logs := arguments.get("logs"):
        given["logs"] = Path(logs)
    return BenchSettings(**given)


@dataclasses.dataclass(frozen=True)
class Percentiles:
    p50: float
    p95: float
    p99: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Percentiles:
        """Nearest-rank percentiles: each one is a sample that was really measured."""
        ordered = sorted(samples)

        def rank(p: float) -> float:
            return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

        return cls(p50=rank(50), p95=rank(95), p99=rank(99))


@dataclasses.dataclass(frozen=True)
class Passes:
    """The operator's scheduling passes while a part ran, from its own Prometheus histogram."""

    count: int
    seconds: float

    def __sub__(self, earlier: Passes) -> Passes:
        return Passes(count=self.count - earlier.count, seconds=self.seconds - earlier.seconds)

    @property
    def mean_ms(self) -> float:
        return self.seconds * 1000 / self.count if self.count else 0.0


@dataclasses.dataclass(frozen=True)
class LimitSample:
    objects: int
    seconds: float
    cpu_ms_per_object: dict[str, float]

    @property
    def per_s(self) -> float:
        return self.objects / self.seconds


@dataclasses.dataclass(frozen=True)
class LimitResult:
    """The ceiling: the best of its samples, taken before and, with the throughput part, after it.

    The ceiling is what the API server can do; a burst of outside load during one sample (on a
    shared 2-core machine) would otherwise pass for a lower ceiling and flatter the ratio.
    """

    samples: tuple[LimitSample, ...]

    @property
    def best(self) -> LimitSample:
        return max(self.samples, key=lambda sample: sample.per_s)

    @property
    def per_s(self) -> float:
        return self.best.per_s

    @property
    def objects(self) -> int:
        return self.best.objects

    @property
    def cpu_ms_per_object(self) -> dict[str, float]:
        return self.best.cpu_ms_per_object


@dataclasses.dataclass(frozen=True)
class ThroughputResult:
    runs: int
    completed: int
    seconds: float
    writes: dict[str, float]
    """Mutating requests on taskruns while the part ran, by "VERB subresource code"."""
    cpu_ms_per_run: dict[str, float]
    passes: Passes
    samples_per_s: tuple[float, ...] = ()
    """Every sample's runs/s when the part was measured more than once; this one is the best."""

    @property
    def per_s(self) -> float:
        return self.runs / self.seconds

    @property
    def writes_per_run(self) -> float:
        return sum(self.writes.values()) / self.runs


@dataclasses.dataclass(frozen=True)
class LatencyResult:
    runs: int
    start_ms: Percentiles
    result_ms: Percentiles
    stages_ms: dict[str, Percentiles]
    """Where the time goes between trigger and result, stage by stage (see `_stages`)."""


@dataclasses.dataclass(frozen=True)
class DrainResult:
    runs: int
    completed: int
    seconds: float
    passes: Passes
    cpu_ms_per_run: dict[str, float]
    """From the moment every worker has announced itself to the last result."""

    @property
    def per_s(self) -> float:
        return self.runs / self.seconds


@dataclasses.dataclass(frozen=True)
class BacklogResult:
    baseline: DrainResult
    large: DrainResult
    rss_mb: dict[str, float]
    """The operator's VmRSS with the large backlog queued and after draining it, and its VmHWM."""

    @property
    def ratio(self) -> float:
        return self.large.per_s / self.baseline.per_s

    @property
    def operator_rss_mb(self) -> float:
        return max(self.rss_mb["queued"], self.rss_mb["drained"])


@dataclasses.dataclass
class Report:
    settings: BenchSettings
    namespace: str
    started: str
    limit: LimitResult | None = None
    throughput: ThroughputResult | None = None
    latency: LatencyResult | None = None
    backlog: BacklogResult | None = None

    @property
    def ratio(self) -> float | None:
        if self.limit is None or self.throughput is None:
            return None
        return self.throughput.per_s / self.limit.per_s

    def summary(self) -> dict[str, Any]:
        """The `--json` object: the issue's keys (null for a part not run), then details."""
        limit, throughput, latency, backlog = (
            self.limit,
            self.throughput,
            self.latency,
            self.backlog,
        )
        return {
            "limit_per_s": _round(limit.per_s) if limit else None,
            "throughput_per_s": _round(throughput.per_s) if throughput else None,
            "ratio": _round(self.ratio, 3) if self.ratio is not None else None,
            "writes_per_run": _round(throughput.writes_per_run, 3) if throughput else None,
            "start_ms": _percentiles(latency.start_ms) if latency else None,
            "result_ms": _percentiles(latency.result_ms) if latency else None,
            "backlog_ratio": _round(backlog.ratio, 3) if backlog else None,
            "operator_rss_mb": _round(backlog.operator_rss_mb) if backlog else None,
            "details": {
                "started": self.started,
                "namespace": self.namespace,
                "settings": {
                    "parts": sorted(self.settings.parts, key=PARTS.index),
                    "runs": self.settings.runs,
                    "workers": self.settings.workers,
                    "slots": self.settings.slots,
                    "concurrency": self.settings.concurrency,
                    "latency_runs": self.settings.latency_runs,
                    "backlog_runs": self.settings.backlog_runs,
                    "backlog_baseline_runs": self.settings.backlog_baseline_runs,
                },
                "limit": _limit_details(limit),
                "throughput": _throughput_details(throughput),
                "latency": _latency_details(latency),
                "backlog": _backlog_details(backlog),
            },
        }


# --- the run ------------------------------------------------------------------------------------


def run(settings: BenchSettings) -> Report:
    """Measure the parts `settings` asks for against the cluster of the current kubeconfig."""
    api_client = _api_client(settings.concurrency)
    suffix = uuid.uuid4().hex[:8]
    namespace = f"bench-{suffix}"
    report = Report(settings=settings, namespace=namespace, started=format_time(utc_now()))
    logs = settings.logs or Path(tempfile.mkdtemp(prefix="kubetask-bench-"))
    logs.mkdir(parents=True, exist_ok=True)
    core = client.CoreV1Api(api_client)
    host = _LocalCluster.find()

    # SIGTERM unwinds like Ctrl-C, so that the cleanup below also runs when `make` or a CI runner
    # stops the benchmark.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    succeeded = False
    try:
        with contextlib.ExitStack() as cleanup:
            core.create_namespace({"metadata": {"name": namespace}})
            cleanup.callback(_quietly, f"delete namespace {namespace}", core.delete_namespace,
                             namespace)  # fmt: skip
            logger.info("Benchmarking in namespace %s; logs in %s.", namespace, logs)

            limit = None
            if "limit" in settings.parts:
                limit = LimitBench(
                    api_client,
                    namespace=namespace,
                    suffix=suffix,
                    settings=settings,
                    host=host,
                    cleanup=cleanup,
                )
                report.limit = LimitResult(samples=(limit.measure(),))

            if settings.parts & {"throughput", "latency", "backlog"}:
                processes = BenchProcesses(namespace=namespace, logs=logs, settings=settings)
                cleanup.callback(processes.stop_all)
                bench = _RunBench(api_client, namespace, settings, processes, host)
                bench.start()
                if "throughput" in settings.parts:
                    report.throughput = bench.throughput()
                    if limit is not None and report.limit is not None:
                        # Both sides of the ratio get a second sample, alternating, and keep their
                        # best: a slow spell of the machine then lowers neither side alone. The
                        # workers and the operator sit idle during the limit: they watch other
                        # kinds.
                        samples = (*report.limit.samples, limit.measure())
                        report.limit = LimitResult(samples=samples)
                        report.throughput = _best_throughput(report.throughput, bench.throughput())
                if "latency" in settings.parts:
                    report.latency = bench.latency()
                if "backlog" in settings.parts:
                    report.backlog = bench.backlog()
        succeeded = True
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        if succeeded and settings.logs is None:
            shutil.rmtree(logs, ignore_errors=True)
        elif not succeeded:
            logger.warning("The operator's and workers' logs are kept in %s.", logs)
    return report


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


def _quietly(what: str, action: Callable[..., Any], *args: Any) -> None:
    """Cleanup that must not stop the rest of the cleanup."""
    try:
        action(*args)
    except Exception as exc:
        logger.warning("Could not %s: %s", what, exc)


def _api_client(concurrency: int) -> client.ApiClient:
    """A client for the kubeconfig whose connection pool holds every request in flight.

    The client's default pool (5 per core) would drop connections beyond it after each request
    and pay a TLS handshake for the next one: a cost of the benchmark, not of kubetask.
    """
    configuration = client.Configuration()
    configuration.connection_pool_maxsize = max(concurrency, 4) + 4
    return config.new_client_from_config(client_configuration=configuration)


def _in_parallel(work: Callable[[int], _T], count: int, *, concurrency: int) -> list[_T]:
    """work(0) ... work(count - 1) with `concurrency` threads; the first error stops the rest.

    A `with` block around the pool would wait for every queued call on the way out, also when
    the benchmark is interrupted.
    """
    pool = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="bench")
    try:
        return list(pool.map(work, range(count)))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# --- part 1: the limit ---------------------------------------------------------------------------


def _bench_crd(group: str) -> dict[str, Any]:
    """A throwaway kind with a status subresource and no schema to check: bare objects."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"benchobjects.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "benchobjects", "singular": "benchobject", "kind": "BenchObject",
                      "listKind": "BenchObjectList"},
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object",
                                               "x-kubernetes-preserve-unknown-fields": True}},
            }],
        },
    }  # fmt: skip


def _assignment_status(worker: str) -> dict[str, Any]:
    """The fields the operator's assignment writes, with values of the same size."""
    now = utc_now()
    return {
        "phase": Phase.RUNNING.value,
        "attempt": 1,
        "worker": worker,
        "node": "kwok-node-0",
        "startedAt": format_time(now),
        "deadline": format_time(now),
        "queuedAt": format_time(now),
        "reason": "Assigned",
        "message": f"Attempt 1 assigned to worker {worker} on node kwok-node-0.",
        "notBefore": None,
        "slotReleased": None,
        "conditions": None,
    }


def _result_patch(assigned: dict[str, Any]) -> list[dict[str, Any]]:
    """The worker's result write: `test` guards on the attempt, then the whole new status."""
    status = {key: value for key, value in assigned.items() if value is not None}
    guards = [
        {"op": "test", "path": f"/status/{field}", "value": status[field]}
        for field in ("phase", "worker", "startedAt")
    ]
    finished = {
        **status, "phase": Phase.COMPLETED.value, "reason": "Succeeded",
        "output": {"started": time.time()}, "finishedAt": format_time(utc_now()),
    }  # fmt: skip
    return [*guards, {"op": "replace", "path": "/status", "value": finished}]


class LimitBench:
    """The three writes of a successful run on bare objects of a throwaway kind.

    The kind is created once; `measure` may run more than once, each time on new objects.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        namespace: str,
        suffix: str,
        settings: BenchSettings,
        host: _LocalCluster | None,
        cleanup: contextlib.ExitStack,
    ) -> None:
        self.custom = client.CustomObjectsApi(api_client)
        self.namespace = namespace
        self.settings = settings
        self.host = host
        self.measured = 0
        # A group of its own per invocation: two benchmarks on one cluster never share the kind.
        self.group = f"b{suffix}.bench.kubetask.io"
        extensions = client.ApiextensionsV1Api(api_client)
        crd = _bench_crd(self.group)
        extensions.create_custom_resource_definition(crd)
        name = crd["metadata"]["name"]
        cleanup.callback(
            _quietly, f"delete CRD {name}", extensions.delete_custom_resource_definition, name
        )
        _wait_established(extensions, name)

        # The API server serves a new kind a moment after it is Established; the warm-up also
        # opens the connections, so the timed objects pay for neither.
        deadline = time.monotonic() + 30
        for index in range(WARMUP_RUNS):
            while True:
                try:
                    self._one_object(f"warmup-{index:06d}")
                    break
                except ApiException as exc:
                    if exc.status != 404 or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

    def _one_object(self, name: str) -> None:
        group, namespace, custom = self.group, self.namespace, self.custom
        body = {
            "apiVersion": f"{group}/v1", "kind": "BenchObject",
            "metadata": {"name": name, "labels": {"kubetask.io/task": bench_tasks.TASK}},
            "spec": {"task": bench_tasks.TASK, "input": {}},
        }  # fmt: skip
        created = custom.create_namespaced_custom_object(
            group, "v1", namespace, "benchobjects", body
        )
        assigned = _assignment_status(f"{WORKER_NAME}-000000")
        custom.patch_namespaced_custom_object_status(
            group, "v1", namespace, "benchobjects", name,
            {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]},
             "status": assigned},
        )  # fmt: skip
        custom.patch_namespaced_custom_object_status(
            group, "v1", namespace, "benchobjects", name, _result_patch(assigned),
            _content_type="application/json-patch+json",
        )  # fmt: skip

    def measure(self) -> LimitSample:
        """Objects/s of `settings.runs` new objects, `settings.concurrency` at a time."""
        objects, first = self.settings.runs, self.measured
        self.measured += objects
        logger.info("Limit: %d bare objects, %d at a time.", objects, self.settings.concurrency)
        meter = _CpuMeter(self.host, processes=None)
        started = time.monotonic()
        _in_parallel(
            lambda index: self._one_object(f"object-{first + index:06d}"),
            objects,
            concurrency=self.settings.concurrency,
        )
        sample = LimitSample(
            objects=objects,
            seconds=time.monotonic() - started,
            cpu_ms_per_object=meter.ms_per(objects),
        )
        logger.info("Limit: %.1f objects/s.", sample.per_s)
        return sample


def _wait_established(extensions: Any, name: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        crd = extensions.read_custom_resource_definition(name)
        conditions = (crd.status.conditions if crd.status else None) or []
        if any(c.type == "Established" and c.status == "True" for c in conditions):
            return
        time.sleep(0.1)
    raise BenchError(f"The CRD {name} was not Established after 60 s.")


# --- processes -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BenchProcesses:
    """The operator and worker processes of one benchmark; `stop_all` ends every one of them."""

    def __init__(self, *, namespace: str, logs: Path, settings: BenchSettings) -> None:
        self.namespace = namespace
        self.logs = logs
        self.settings = settings
        self.metrics_port = _free_port()
        self.operator: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._log_files: list[IO[bytes]] = []
        self._started = 0

    def _spawn(self, name: str, args: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        self._log_files.append(log)
        return subprocess.Popen(
            [sys.executable, "-m", "kubetask_cli.main", *args],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def start_operator(self) -> None:
        self.operator = self._spawn(
            "operator",
            ["operator", "-n", self.namespace],
            {
                "KUBETASK_METRICS_PORT": str(self.metrics_port),
                "KUBETASK_WRITE_CONCURRENCY": str(self.settings.concurrency),
                # The backlog part queues runs with no worker on purpose. After 5 s (the default)
                # the operator would tell each one why in a Waiting condition, a write per run
                # that is the operator informing users, not draining the queue.
                "KUBETASK_WAIT_CONDITION_AFTER_SECONDS": "3600",
            },
        )
        deadline = time.monotonic() + 60
        while self.operator_metric("kubetask_queued_runs") is None:
            if self.operator.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"The operator did not start:\n{self._tail('operator')}")
            time.sleep(0.1)

    def start_workers(self, api_client: client.ApiClient) -> None:
        """Start the workers at once and return when every one has announced itself."""
        for _ in range(self.settings.workers):
            self._started += 1
            self.workers.append(
                self._spawn(
                    f"worker-{self._started}",
                    ["worker", WORKER_TARGET],
                    {
                        "POD_NAMESPACE": self.namespace,
                        "KUBETASK_BENCH_WORKER": WORKER_NAME,
                        "KUBETASK_BENCH_SLOTS": str(self.settings.slots),
                    },
                )
            )
        coordination = client.CoordinationV1Api(api_client)
        deadline = time.monotonic() + 60
        while True:
            leases = coordination.list_namespaced_lease(
                self.namespace, label_selector=f"{WORKER_LABEL}={WORKER_NAME}"
            ).items
            if len(leases) >= len(self.workers):
                return
            if any(w.poll() is not None for w in self.workers) or time.monotonic() > deadline:
                raise BenchError(
                    f"The workers did not start:\n{self._tail(f'worker-{self._started}')}"
                )
            time.sleep(0.05)

    def stop_workers(self, api_client: client.ApiClient) -> None:
        """Stop every worker and make sure no Lease or Pod of theirs is left for the operator."""
        _stop(self.workers)
        self.workers = []
        coordination = client.CoordinationV1Api(api_client)
        core = client.CoreV1Api(api_client)
        selector = f"{WORKER_LABEL}={WORKER_NAME}"
        # A worker killed after the grace period leaves its Lease behind, and the operator would
        # count it live for up to 30 s.
        for lease in coordination.list_namespaced_lease(
            self.namespace, label_selector=selector
        ).items:
            coordination.delete_namespaced_lease(lease.metadata.name, self.namespace)
        for pod in core.list_namespaced_pod(self.namespace, label_selector=selector).items:
            core.delete_namespaced_pod(pod.metadata.name, self.namespace, grace_period_seconds=0)

    def stop_all(self) -> None:
        _stop([*self.workers, *([self.operator] if self.operator else [])])
        for log in self._log_files:
            log.close()

    def pids(self) -> dict[str, list[int]]:
        """The live processes by role, for CPU accounting."""
        pids: dict[str, list[int]] = {"workers": [w.pid for w in self.workers]}
        if self.operator is not None:
            pids["operator"] = [self.operator.pid]
        return pids

    def operator_metric(self, name: str) -> float | None:
        """A sample without labels of the operator's Prometheus endpoint; None while it is down."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
            ) as response:
                text = response.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        return None

    def operator_passes(self) -> Passes:
        """Scheduling passes the operator made so far and the seconds they took."""
        count = self.operator_metric("kubetask_scheduling_pass_seconds_count") or 0.0
        seconds = self.operator_metric("kubetask_scheduling_pass_seconds_sum") or 0.0
        return Passes(count=int(count), seconds=seconds)

    def operator_memory_mb(self) -> dict[str, float]:
        """VmRSS and VmHWM of the operator from /proc, in MiB."""
        assert self.operator is not None
        fields = {}
        for line in Path(f"/proc/{self.operator.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
        return fields

    def _tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _stop(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("Process %d did not stop on SIGTERM; killed it.", process.pid)
            process.kill()
            process.wait()


# --- CPU accounting --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LocalCluster:
    """The processes of a `kubetask cluster` whose kubeconfig is the current one, if it is one."""

    pids: dict[str, int]

    @classmethod
    def find(cls) -> _LocalCluster | None:
        kubeconfig = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
        if not kubeconfig:
            return None
        state = cluster.ClusterState.load(Path(kubeconfig).resolve().parent)
        if state is None or Path(state.kubeconfig).resolve() != Path(kubeconfig).resolve():
            return None
        return cls(pids=state.live_pids())


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads), 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _CpuMeter:
    """CPU each role spent from construction on: this client, kubetask's processes, and the
    control plane's when the cluster is a local one."""

    def __init__(self, host: _LocalCluster | None, processes: BenchProcesses | None) -> None:
        self.roles: dict[str, list[int]] = {}
        if processes is not None:
            self.roles.update(processes.pids())
        if host is not None:
            for name in ("kube-apiserver", "etcd"):
                if name in host.pids:
                    self.roles[name] = [host.pids[name]]
        self.before = self._sample()

    def _sample(self) -> dict[str, float]:
        times = os.times()
        sample = {"client": times.user + times.system}
        for role, pids in self.roles.items():
            sample[role] = sum(_cpu_seconds(pid) for pid in pids)
        return sample

    def ms_per(self, count: int) -> dict[str, float]:
        after = self._sample()
        return {role: round((after[role] - self.before[role]) * 1000 / count, 3) for role in after}


# --- the API server's request counter ----------------------------------------------------------

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def taskrun_writes(api_client: client.ApiClient) -> Counter[str]:
    """Mutating requests on taskruns the API server counted so far, by "VERB subresource code".

    The counter is the API server's, for the whole cluster: on a shared cluster other writers of
    taskruns count too.
    """
    method, url, headers, _, _ = api_client.param_serialize(
        "GET", "/metrics", header_params={"Accept": "text/plain"}, auth_settings=["BearerToken"]
    )
    response = api_client.call_api(method, url, headers)
    text = response.read().decode()
    if response.status != 200:
        raise BenchError(f"GET /metrics answered {response.status}: {text[:200]}")
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels_text, _, value = line.rpartition(" ")
        labels = dict(_LABEL.findall(labels_text))
        if labels.get("resource") != TASKRUNS or labels.get("verb") not in MUTATING_VERBS:
            continue
        key = f"{labels['verb']} {labels.get('subresource') or '-'} {labels.get('code', '?')}"
        counts[key] += int(float(value))
    return counts


# --- following runs ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Sighting:
    """What the client saw of one run, with its own clock (`time.time()`) at each change."""

    running_seen: float | None = None
    final_seen: float | None = None
    final: dict[str, Any] | None = None


class RunWatch:
    """Follows every TaskRun of the namespace in a thread: the client's view of each run."""

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.custom = client.CustomObjectsApi(api_client)
        self.namespace = namespace
        self.sightings: dict[str, _Sighting] = {}
        self.finals = 0
        self._changed = threading.Condition()
        self._listed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="bench-watch", daemon=True)

    def __enter__(self) -> RunWatch:
        self._thread.start()
        if not self._listed.wait(30):
            raise BenchError(f"Could not list the TaskRuns of {self.namespace}.")
        return self

    def __exit__(self, *_: object) -> None:
        # The thread ends with its watch request, at the latest WATCH_SECONDS later; as a daemon it
        # never holds up the exit.
        self._stop.set()

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                listing = self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, TASKRUNS
                )
                seen = time.time()
                for item in listing["items"]:
                    self._note(item, seen)
                self._listed.set()
                stream = watch.Watch().stream(
                    self.custom.list_namespaced_custom_object,
                    GROUP, VERSION, self.namespace, TASKRUNS,
                    resource_version=listing["metadata"]["resourceVersion"],
                    allow_watch_bookmarks=True, timeout_seconds=WATCH_SECONDS,
                )  # fmt: skip
                for event in stream:
                    seen = time.time()
                    if self._stop.is_set():
                        return
                    if event["type"] == "ERROR":
                        break
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._note(event["object"], seen)
            except ApiException as exc:
                # 410: the version to resume from is gone; listing again is the cure.
                if exc.status != 410:
                    logger.warning("Watching the runs failed (%s); listing again.", exc.reason)
                    self._stop.wait(1.0)
            except Exception as exc:
                if self._stop.is_set():
                    return
                logger.warning("Watching the runs failed (%s); listing again.", exc)
                self._stop.wait(1.0)

    def _note(self, run: dict[str, Any], seen: float) -> None:
        phase = (run.get("status") or {}).get("phase")
        with self._changed:
            sighting = self.sightings.setdefault(run["metadata"]["name"], _Sighting())
            if phase == Phase.RUNNING.value and sighting.running_seen is None:
                sighting.running_seen = seen
            elif phase in FINAL_PHASES and sighting.final is None:
                sighting.final_seen = seen
                sighting.final = run
                self.finals += 1
                self._changed.notify_all()

    def wait_finals(self, count: int) -> None:
        """Wait until `count` runs have ended, as long as runs keep ending."""
        with self._changed:
            while self.finals < count:
                before = self.finals
                stalled = time.monotonic() + STALL_SECONDS
                while self.finals == before and (left := stalled - time.monotonic()) > 0:
                    self._changed.wait(left)
                if self.finals == before:
                    raise BenchError(
                        f"Only {self.finals} of {count} runs ended, and none in the last "
                        f"{STALL_SECONDS:.0f} s; see the operator's and workers' logs."
                    )

    def wait_final(self, name: str, timeout: float) -> _Sighting:
        with self._changed:
            if not self._changed.wait_for(
                lambda: (s := self.sightings.get(name)) is not None and s.final is not None,
                timeout,
            ):
                raise BenchError(f"Run {self.namespace}/{name} did not end within {timeout:.0f} s.")
            return self.sightings[name]

    def completed(self) -> int:
        with self._changed:
            return sum(
                1
                for s in self.sightings.values()
                if s.final is not None and s.final["status"].get("phase") == Phase.COMPLETED.value
            )


# --- parts 2 to 4: runs through kubetask -------------------------------------------------------


def run_body() -> dict[str, Any]:
    """A TaskRun of the no-op task as the SDK's trigger writes it."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TaskRun",
        "metadata": {
            "name": f"{bench_tasks.TASK}-{uuid.uuid4().hex[:12]}",
            "labels": {"kubetask.io/task": bench_tasks.TASK},
        },
        "spec": {"task": bench_tasks.TASK, "input": {}},
    }


class _RunBench:
    """The parts that put runs through the operator and the workers."""

    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        settings: BenchSettings,
        processes: BenchProcesses,
        host: _LocalCluster | None,
    ) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.settings = settings
        self.processes = processes
        self.host = host
        self.kt = KubeTask(namespace=namespace, api_client=api_client)
        self.custom = client.CustomObjectsApi(api_client)

    def start(self) -> None:
        logger.info(
            "Starting the operator and %d workers with %d slots each.",
            self.settings.workers,
            self.settings.slots,
        )
        self.processes.start_operator()
        self.processes.start_workers(self.api_client)
        # The first runs also make the workers apply the Task, which the backlog part relies on:
        # its runs are queued before any worker of its own exists.
        with RunWatch(self.api_client, self.namespace) as runs:
            self._create(WARMUP_RUNS)
            runs.wait_finals(WARMUP_RUNS)
        self._delete_runs()

    def _create(self, count: int) -> list[str]:
        def create(_: int) -> str:
            body = run_body()
            self.kt.kube.create_run(self.namespace, body)
            return str(body["metadata"]["name"])

        return _in_parallel(create, count, concurrency=self.settings.concurrency)

    def _delete_runs(self) -> None:
        """Delete every run of the namespace and wait until they are gone."""
        self.custom.delete_collection_namespaced_custom_object(
            GROUP, VERSION, self.namespace, TASKRUNS
        )
        deadline = time.monotonic() + 120
        while self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, TASKRUNS, limit=1
        )["items"]:
            if time.monotonic() > deadline:
                raise BenchError(f"The runs of {self.namespace} were not deleted within 120 s.")
            time.sleep(0.2)

    def throughput(self) -> ThroughputResult:
        runs = self.settings.runs
        logger.info("Throughput: %d no-op runs, created %d at a time.", runs,
                    self.settings.concurrency)  # fmt: skip
        with RunWatch(self.api_client, self.namespace) as watched:
            writes_before = taskrun_writes(self.api_client)
            meter = _CpuMeter(self.host, self.processes)
            passes_before = self.processes.operator_passes()
            started = time.time()
            self._create(runs)
            watched.wait_finals(runs)
            last = max(s.final_seen or 0.0 for s in watched.sightings.values())
            cpu = meter.ms_per(runs)
            passes = self.processes.operator_passes() - passes_before
            writes = taskrun_writes(self.api_client) - writes_before
            completed = watched.completed()
        result = ThroughputResult(
            runs=runs,
            completed=completed,
            seconds=last - started,
            writes={key: float(count) for key, count in sorted(writes.items())},
            cpu_ms_per_run=cpu,
            passes=passes,
        )
        logger.info("Throughput: %.1f runs/s, %.2f writes per run.", result.per_s,
                    result.writes_per_run)  # fmt: skip
        self._delete_runs()
        return result

    def latency(self) -> LatencyResult:
        count = self.settings.latency_runs
        logger.info("Latency: %d runs one after the other.", count)
        time.sleep(SETTLE_SECONDS)
        samples: list[dict[str, float]] = []
        with RunWatch(self.api_client, self.namespace) as watched:
            for _ in range(count):
                body = run_body()
                triggered = time.time()
                self.kt.kube.create_run(self.namespace, body)
                sighting = watched.wait_final(body["metadata"]["name"], timeout=60)
                samples.append(_stages(triggered, sighting))
        result = LatencyResult(
            runs=count,
            start_ms=Percentiles.of([s["start"] for s in samples]),
            result_ms=Percentiles.of([s["result"] for s in samples]),
            stages_ms={
                stage: Percentiles.of([s[stage] - s[previous] for s in samples])
                for previous, stage in itertools.pairwise(STAGES)
            },
        )
        logger.info(
            "Latency: trigger → start p50 %.1f ms, trigger → result p50 %.1f ms.",
            result.start_ms.p50,
            result.result_ms.p50,
        )
        self._delete_runs()
        return result

    def backlog(self) -> BacklogResult:
        baseline, _ = self._drain(self.settings.backlog_baseline_runs)
        self._delete_runs()
        # The large backlog is the last thing measured: deleting the namespace removes its runs.
        large, memory = self._drain(self.settings.backlog_runs)
        return BacklogResult(baseline=baseline, large=large, rss_mb=memory)

    def _drain(self, runs: int) -> tuple[DrainResult, dict[str, float]]:
        """Queue `runs` with no worker, then time fresh workers draining them.

        The drain lasts from the first assignment the client sees to the last result: workers
        take a second or two to start, whatever the backlog, and that is not draining.
        """
        self.processes.stop_workers(self.api_client)
        logger.info("Backlog: queueing %d runs with no worker running.", runs)
        with RunWatch(self.api_client, self.namespace) as watched:
            self._create(runs)
            self._wait_queued(runs)
            queued = self.processes.operator_memory_mb()
            passes_before = self.processes.operator_passes()
            self.processes.start_workers(self.api_client)
            # The meter starts once the workers exist, so that it follows them; their start-up
            # is not draining.
            meter = _CpuMeter(self.host, self.processes)
            watched.wait_finals(runs)
            passes = self.processes.operator_passes() - passes_before
            cpu = meter.ms_per(runs)
            sightings = list(watched.sightings.values())
            completed = watched.completed()
        first = min(s.running_seen or s.final_seen or math.inf for s in sightings)
        last = max(s.final_seen or 0.0 for s in sightings)
        result = DrainResult(
            runs=runs, completed=completed, seconds=last - first, passes=passes, cpu_ms_per_run=cpu
        )
        drained = self.processes.operator_memory_mb()
        memory = {"queued": queued["VmRSS"], "drained": drained["VmRSS"], "hwm": drained["VmHWM"]}
        logger.info("Backlog: drained %d runs at %.1f runs/s.", runs, result.per_s)
        return result, memory

    def _wait_queued(self, runs: int) -> None:
        """Wait until the operator has seen every run and found each one waiting for a worker."""
        seen, progress = 0.0, time.monotonic()
        while (queued := self.processes.operator_metric("kubetask_queued_runs") or 0) < runs:
            if queued > seen:
                seen, progress = queued, time.monotonic()
            elif time.monotonic() - progress > STALL_SECONDS:
                raise BenchError(f"The operator saw only {queued:.0f} of {runs} queued runs.")
            time.sleep(0.2)


#: The moments of a run from the client's trigger to the result it sees, in order: the operator
#: decides (status.startedAt, the operator's clock), the function starts (its output), the worker
#: finishes (status.finishedAt, written just before the result), the client's watch sees it.
STAGES = ("trigger", "decided", "start", "finished", "result")


def _stages(triggered: float, sighting: _Sighting) -> dict[str, float]:
    """Milliseconds from the trigger to each stage of one run."""
    assert sighting.final is not None and sighting.final_seen is not None
    status = sighting.final["status"]
    if status.get("phase") != Phase.COMPLETED.value:
        raise BenchError(f"Run {sighting.final['metadata']['name']} ended {status.get('phase')}.")
    moments = {
        "trigger": triggered,
        "decided": parse_time(status["startedAt"]).timestamp(),
        "start": float(status["output"]["started"]),
        "finished": parse_time(status["finishedAt"]).timestamp(),
        "result": sighting.final_seen,
    }
    return {stage: (moment - triggered) * 1000 for stage, moment in moments.items()}


# --- the report ----------------------------------------------------------------------------------

#: The issue's targets on a 2-core machine; reported, never asserted.
TARGETS = {
    "ratio": 0.6,
    "writes_per_run": 3.0,
    "start_p50_ms": 25.0,
    "start_p99_ms": 100.0,
    "backlog_ratio": 0.8,
    "operator_rss_mb": 300.0,
}


def _round(value: float, digits: int = 1) -> float:
    return round(value, digits)


def _percentiles(p: Percentiles) -> dict[str, float]:
    return {"p50": _round(p.p50), "p95": _round(p.p95), "p99": _round(p.p99)}


def _passes(passes: Passes) -> dict[str, float]:
    return {"count": passes.count, "mean_ms": _round(passes.mean_ms, 2)}


def _limit_details(limit: LimitResult | None) -> dict[str, Any] | None:
    if limit is None:
        return None
    return {
        "objects": limit.objects,
        "samples_per_s": [_round(sample.per_s) for sample in limit.samples],
        "cpu_ms_per_object": limit.cpu_ms_per_object,
    }


def _best_throughput(*samples: ThroughputResult) -> ThroughputResult:
    best = max(samples, key=lambda sample: sample.per_s)
    return dataclasses.replace(best, samples_per_s=tuple(sample.per_s for sample in samples))


def _throughput_details(result: ThroughputResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {
        "samples_per_s": [_round(per_s) for per_s in result.samples_per_s or (result.per_s,)],
        "runs": result.runs,
        "completed": result.completed,
        "seconds": _round(result.seconds, 2),
        "writes": result.writes,
        "cpu_ms_per_run": result.cpu_ms_per_run,
        "operator_passes": _passes(result.passes),
    }


def _latency_details(result: LatencyResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {
        "runs": result.runs,
        "stages_ms": {stage: _percentiles(p) for stage, p in result.stages_ms.items()},
    }


def _backlog_details(result: BacklogResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {
        "drains": [
            {"runs": d.runs, "completed": d.completed, "seconds": _round(d.seconds, 2),
             "per_s": _round(d.per_s), "operator_passes": _passes(d.passes),
             "cpu_ms_per_run": d.cpu_ms_per_run}
            for d in (result.baseline, result.large)
        ],
        "operator_memory_mb": {key: _round(value) for key, value in result.rss_mb.items()},
    }  # fmt: skip


def _target(text: str, met: bool) -> str:
    return f"{text}: {'met' if met else 'MISSED'}"


def _rows(report: Report) -> Iterator[tuple[str, str, str, str]]:
    """(part, measure, value, target) for each line of the table."""
    if limit := report.limit:
        measure = f"bare objects/s ({limit.objects}, 3 writes each)"
        if len(limit.samples) > 1:
            measure += ", best of " + " and ".join(f"{s.per_s:.1f}" for s in limit.samples)
        yield "limit", measure, f"{limit.per_s:.1f}", ""
    if throughput := report.throughput:
        measure = f"runs/s ({throughput.completed}/{throughput.runs} completed)"
        if len(throughput.samples_per_s) > 1:
            measure += ", best of " + " and ".join(f"{v:.1f}" for v in throughput.samples_per_s)
        yield "throughput", measure, f"{throughput.per_s:.1f}", ""
        if (ratio := report.ratio) is not None:
            met = ratio >= TARGETS["ratio"]
            yield "", "throughput / limit", f"{ratio:.2f}", _target(">= 0.6", met)
        per_run = throughput.writes_per_run
        met = per_run <= TARGETS["writes_per_run"]
        yield "", "writes on taskruns per run", f"{per_run:.2f}", _target("<= 3", met)
    if latency := report.latency:
        start, result = latency.start_ms, latency.result_ms
        met = start.p50 <= TARGETS["start_p50_ms"] and start.p99 <= TARGETS["start_p99_ms"]
        values = f"{start.p50:.1f} / {start.p95:.1f} / {start.p99:.1f}"
        yield "latency", "trigger → start ms p50/p95/p99", values, _target("25 / - / 100", met)
        values = f"{result.p50:.1f} / {result.p95:.1f} / {result.p99:.1f}"
        yield "", "trigger → result ms p50/p95/p99", values, ""
    if backlog := report.backlog:
        for drain in (backlog.baseline, backlog.large):
            yield "backlog", f"drain of {drain.runs} queued runs, runs/s", f"{drain.per_s:.1f}", ""
        sizes = f"drain {backlog.large.runs} ÷ drain {backlog.baseline.runs}"
        met = backlog.ratio >= TARGETS["backlog_ratio"]
        yield "", sizes, f"{backlog.ratio:.2f}", _target(">= 0.8", met)
        rss = backlog.operator_rss_mb
        met = rss <= TARGETS["operator_rss_mb"]
        yield (
            "",
            f"operator RSS MiB with {backlog.large.runs} runs",
            f"{rss:.0f}",
            _target("<= 300", met),
        )


def render_table(report: Report) -> str:
    """The human-readable report: one line per measure, with the target where there is one."""
    settings = report.settings
    rows = [("part", "measure", "value", "target"), *_rows(report)]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [
        f"kubetask bench: {settings.workers} workers, {settings.slots} slots each, "
        f"{settings.concurrency} requests in flight, namespace {report.namespace}",
        "",
    ]
    lines.extend(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    )
    lines.extend(_breakdowns(report))
    return "\n".join(line.rstrip() for line in lines)


def _breakdowns(report: Report) -> Iterator[str]:
    """The evidence under the table: what each part cost, and where the time went."""
    if throughput := report.throughput:
        yield ""
        yield "Writes on taskruns during the throughput part (verb, subresource, code):"
        for key, count in throughput.writes.items():
            yield f"  {key:<24} {count:>8.0f}  {count / throughput.runs:.2f} per run"
        yield ""
        yield "CPU ms per run during the throughput part:"
        yield "  " + ", ".join(f"{k} {v:.2f}" for k, v in throughput.cpu_ms_per_run.items())
        yield f"  operator: {_describe_passes(throughput.passes, throughput.runs)}"
    if limit := report.limit:
        yield ""
        yield "CPU ms per object during the limit part:"
        yield "  " + ", ".join(f"{k} {v:.2f}" for k, v in limit.cpu_ms_per_object.items())
    if latency := report.latency:
        yield ""
        yield "Where the latency goes, ms from the previous stage, p50 / p99:"
        for stage, p in latency.stages_ms.items():
            yield f"  → {stage:<9} {p.p50:7.1f} / {p.p99:7.1f}"
    if backlog := report.backlog:
        memory = backlog.rss_mb
        yield ""
        for drain in (backlog.baseline, backlog.large):
            yield f"Drain of {drain.runs}, CPU ms per run:"
            yield "  " + ", ".join(f"{k} {v:.2f}" for k, v in drain.cpu_ms_per_run.items())
            yield f"  operator: {_describe_passes(drain.passes, drain.runs)}"
        yield (
            f"Operator memory (MiB): {memory['queued']:.0f} with the large backlog queued, "
            f"{memory['drained']:.0f} after draining it, peak {memory['hwm']:.0f}."
        )


def _describe_passes(passes: Passes, runs: int) -> str:
    return (
        f"{passes.count} scheduling passes ({passes.count / runs:.2f} per run), "
        f"{passes.mean_ms:.2f} ms each on average, {passes.seconds:.1f} s in all"
    )


def to_json(report: Report) -> str:
    return json.dumps(report.summary(), indent=2, ensure_ascii=False)

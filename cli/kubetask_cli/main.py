"""The `kubetask` command: the one entry point that configures logging."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kubetask_cli import cluster

Command = Callable[[argparse.Namespace], int]


def _cluster_up(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    try:
        state = cluster.up(directory)
    except cluster.ClusterError as exc:
        print(f"kubetask cluster up: {exc}", file=sys.stderr)
        return 1
    print(f"The local cluster is ready at {state.server} (data in {directory}).")
    print("Point kubectl at it with:")
    print(f'  eval "$(kubetask cluster env --dir {directory})"')
    return 0


def _cluster_down(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if cluster.down(directory):
        print(f"Stopped the local cluster in {directory} and deleted its data.")
    else:
        print(f"No cluster is running in {directory}; nothing to stop.")
    return 0


def _cluster_env(args: argparse.Namespace) -> int:
    try:
        lines = cluster.env_lines(Path(args.dir))
    except cluster.ClusterError as exc:
        print(f"kubetask cluster env: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


def _crds(args: argparse.Namespace) -> int:
    from kubetask.api import crd

    for path in crd.write_crds(Path(args.out)):
        print(f"Wrote {path}.")
    return 0


def _operator(args: argparse.Namespace) -> int:
    import kubetask_operator

    kubetask_operator.run(liveness_endpoint=args.liveness, namespaces=args.namespace or None)
    return 0


def _load_object(reference: str) -> Any:
    """`package.module:attribute` → the attribute; the module is imported from the current dir."""
    module_name, _, attribute = reference.partition(":")
    if not attribute:
        raise SystemExit(f"kubetask: expected MODULE:OBJECT, got {reference!r}")
    sys.path.insert(0, os.getcwd())
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def _worker(args: argparse.Namespace) -> int:
    from kubetask.worker import Worker

    worker = _load_object(args.worker)
    if callable(worker) and not isinstance(worker, Worker):
        worker = worker()
    if not isinstance(worker, Worker):
        print(f"kubetask worker: {args.worker} is not a kubetask Worker.", file=sys.stderr)
        return 2
    if args.node:
        worker.node = args.node
    worker.start()
    return 0


def _manifests(args: argparse.Namespace) -> int:
    import yaml

    from kubetask.task import TaskDefinition
    from kubetask.worker import Worker

    target = _load_object(args.target)
    if isinstance(target, Worker):
        tasks = list(target.tasks.values())
    elif isinstance(target, TaskDefinition):
        tasks = [target]
    else:
        print(f"kubetask manifests: {args.target} is neither a Worker nor a task.", file=sys.stderr)
        return 2
    print(yaml.safe_dump_all([task.manifest(args.namespace) for task in tasks], sort_keys=False))
    return 0


def _client(args: argparse.Namespace) -> Any:
    from kubetask import KubeTask

    return KubeTask(namespace=args.namespace)


def _run(args: argparse.Namespace) -> int:
    from kubetask.task import is_final

    kt = _client(args)
    try:
        payload = json.loads(args.input)
    except json.JSONDecodeError as exc:
        print(f"kubetask run: --input is not JSON: {exc}", file=sys.stderr)
        return 2
    spec: dict[str, Any] = {"task": args.task, "input": payload}
    if args.priority is not None:
        spec["priority"] = args.priority
    body = {
        "apiVersion": "kubetask.io/v1alpha1",
        "kind": "TaskRun",
        "metadata": {"generateName": f"{args.task}-", "labels": {"kubetask.io/task": args.task}},
        "spec": spec,
    }
    created = kt.kube.create_run(kt.namespace, body)
    name = created["metadata"]["name"]
    if not args.wait:
        print(name)
        return 0
    run = kt.wait_for_run(name, timeout=args.timeout)
    status = run.get("status") or {}
    if is_final(run) and status.get("phase") == "Completed":
        print(json.dumps(status.get("output"), indent=2))
        return 0
    error = status.get("error") or {}
    print(
        f"Run {name} ended {status.get('phase')} ({status.get('reason')}): "
        f"{error.get('message', status.get('message', ''))}",
        file=sys.stderr,
    )
    return 1


def _cancel(args: argparse.Namespace) -> int:
    kt = _client(args)
    kt.kube.cancel_run(kt.namespace, args.run)
    print(f"Asked to cancel {kt.namespace}/{args.run}.")
    return 0


def _logs(args: argparse.Namespace) -> int:
    kt = _client(args)
    run = kt.kube.get_run(kt.namespace, args.run)
    for line in (run.get("status") or {}).get("logs") or []:
        print(line)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from kubetask_cli import bench

    try:
        settings = bench.settings_from_arguments(vars(args))
        report = bench.run(settings)
    except bench.BenchError as exc:
        print(f"kubetask bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kubetask bench: interrupted; stopped the processes it started.", file=sys.stderr)
        return 130
    table = bench.render_table(report)
    if args.json:
        print(table, file=sys.stderr)
        print(bench.to_json(report))
    else:
        print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetask", description="Background tasks on Kubernetes, the Hatchet way."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True)

    cluster_parser = commands.add_parser("cluster", help="a local control plane for dev and tests")
    cluster_commands = cluster_parser.add_subparsers(dest="cluster_command", required=True)
    for name, handler, text in (
        ("up", _cluster_up, "build (once) and start etcd, kube-apiserver, KWOK and a fake node"),
        ("down", _cluster_down, "stop every process of the cluster and delete its data"),
        ("env", _cluster_env, "print shell lines that export KUBECONFIG and put kubectl on PATH"),
    ):
        sub = cluster_commands.add_parser(name, help=text)
        sub.add_argument(
            "--dir", default=str(cluster.default_dir()), help="the cluster's directory"
        )
        sub.set_defaults(handler=handler)

    crds_parser = commands.add_parser("crds", help="write the generated CRDs")
    crds_parser.add_argument("--out", default="crds", help="directory to write into")
    crds_parser.set_defaults(handler=_crds)

    operator_parser = commands.add_parser("operator", help="run the operator")
    operator_parser.add_argument(
        "--liveness",
        default=None,
        help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz",
    )
    operator_parser.add_argument(
        "-n", "--namespace", action="append", help="watch only this namespace (repeatable)"
    )
    operator_parser.set_defaults(handler=_operator)

    worker_parser = commands.add_parser("worker", help="run a worker defined in Python")
    worker_parser.add_argument(
        "worker", metavar="MODULE:OBJ", help="a Worker, or a callable making one"
    )
    worker_parser.add_argument(
        "--node", help="outside a cluster: the node to bind the worker's Pod to"
    )
    worker_parser.set_defaults(handler=_worker)

    manifests_parser = commands.add_parser("manifests", help="print the Task manifests of a worker")
    manifests_parser.add_argument("target", metavar="MODULE:OBJ", help="a Worker or a task")
    manifests_parser.add_argument("-n", "--namespace", default=None)
    manifests_parser.set_defaults(handler=_manifests)

    run_parser = commands.add_parser("run", help="create a TaskRun, optionally wait for it")
    run_parser.add_argument("task")
    run_parser.add_argument("--input", default="{}", help="the input as a JSON object")
    run_parser.add_argument("--priority", type=int, choices=(1, 2, 3))
    run_parser.add_argument("--wait", action="store_true", help="wait and print the output")
    run_parser.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")
    run_parser.set_defaults(handler=_run)

    cancel_parser = commands.add_parser("cancel", help="cancel a TaskRun")
    cancel_parser.add_argument("run")
    cancel_parser.set_defaults(handler=_cancel)

    logs_parser = commands.add_parser("logs", help="print the log lines a run kept")
    logs_parser.add_argument("run")
    logs_parser.set_defaults(handler=_logs)

    bench_parser = commands.add_parser(
        "bench", help="measure throughput, latency and backlog against the API server's limit"
    )
    bench_parser.add_argument("--only", metavar="PARTS", help="limit,throughput,latency,backlog")
    bench_parser.add_argument("--json", action="store_true", help="print one JSON object")
    for flag, text in (
        ("--runs", "runs of the throughput part and objects of the limit (2000)"),
        ("--workers", "worker processes (2)"),
        ("--slots", "slots per worker (50)"),
        ("--concurrency", "requests in flight: creates, operator writes, the limit (16)"),
        ("--latency-runs", "runs of the latency part, one at a time (200)"),
        ("--backlog-runs", "the large backlog (10000)"),
        ("--backlog-baseline-runs", "the small backlog it is compared with (500)"),
    ):
        bench_parser.add_argument(flag, type=int, help=text)
    bench_parser.add_argument("--logs", help="keep the operator's and workers' logs here")
    bench_parser.set_defaults(handler=_bench)

    for sub in (run_parser, cancel_parser, logs_parser):
        sub.add_argument("-n", "--namespace", default=None, help="default: the kubeconfig's")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # kopf reports every handled watch event at INFO; the operator logs its own decisions.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    handler: Command = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())

"""A task defined in Python: the function, its configuration, and the ways to trigger it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import typing
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import pydantic

from kubetask import _kube, api
from kubetask.context import Context
from kubetask.errors import RunCancelledError, RunFailedError
from kubetask.lifecycle import FINAL_PHASES, Phase, RetryPolicy, format_time

if TYPE_CHECKING:
    from kubetask.client import KubeTask

InputT = TypeVar("InputT", bound=pydantic.BaseModel)
OutputT = TypeVar("OutputT")

TaskFunction = Callable[[InputT, Context], OutputT | Awaitable[OutputT]]

#: Runs created at once by `run_many`: enough to keep the API server busy without a thread per run.
CREATE_CONCURRENCY = 16


@dataclasses.dataclass(frozen=True)
class DesiredWorkerLabel:
    """A label a task wants on its worker's pod or node (`workerAffinity` in the Task spec).

    Workers failing a `required` label never get the task's runs; among the rest, the one with
    the highest sum of matched `weight`s wins. The ordering comparators compare integers.
    """

    value: str | int
    required: bool = False
    weight: int = 100
    comparator: str = "Equal"


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """A task's name and spec, validated by the model the API server's schema is made from."""

    name: str
    spec: api.TaskSpec

    @classmethod
    def build(
        cls,
        *,
        name: str,
        retries: int,
        backoff_factor: float | None,
        backoff_max_seconds: int | None,
        execution_timeout: str,
        schedule_timeout: str,
        default_priority: int,
        desired_worker_labels: Mapping[str, DesiredWorkerLabel],
    ) -> TaskConfig:
        """Raises pydantic.ValidationError, naming the setting, for anything the API refuses."""
        backoff = (
            api.Backoff(factor=backoff_factor, max_seconds=backoff_max_seconds)
            if backoff_factor is not None
            else None
        )
        spec = api.TaskSpec(
            retries=retries,
            backoff=backoff,
            execution_timeout=execution_timeout,
            schedule_timeout=schedule_timeout,
            default_priority=default_priority,
            worker_affinity=[
                api.DesiredWorkerLabel(
                    key=key,
                    value=str(label.value),
                    comparator=api.WorkerLabelComparator(label.comparator),
                    required=label.required,
                    weight=label.weight,
                )
                for key, label in desired_worker_labels.items()
            ],
        )
        return cls(name=name, spec=spec)

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(retries=self.spec.retries, backoff=self.spec.backoff)


class RunHandle(Generic[OutputT]):
    """A triggered run: its TaskRun's `name`, and `result()` to wait for its output."""

    def __init__(self, task: TaskDefinition[Any, OutputT], name: str) -> None:
        self.task = task
        self.name = name

    def __repr__(self) -> str:
        return f"RunHandle({self.task.config.name!r}, {self.name!r})"

    def result(self, timeout: float | None = None) -> OutputT:
        """Wait (with a watch) until the run ends and return its output.

        Raises RunFailedError or RunCancelledError when the run ends otherwise.
        """
        run = self.task.client.wait_for_run(self.name, timeout=timeout)
        return self.task.parse_result(run)

    async def aio_result(self, timeout: float | None = None) -> OutputT:
        return await asyncio.to_thread(self.result, timeout)


class TaskDefinition(Generic[InputT, OutputT]):
    """What `@kt.task(...)` returns: still callable as the plain function, plus triggers."""

    def __init__(
        self,
        client: KubeTask,
        function: TaskFunction[InputT, OutputT],
        config: TaskConfig,
    ) -> None:
        self.client = client
        self.function = function
        self.config = config
        self.is_async = inspect.iscoroutinefunction(function)
        self.input_type, self.output_adapter = _signature_types(function)

    def __call__(self, input: InputT, ctx: Context) -> OutputT | Awaitable[OutputT]:
        return self.function(input, ctx)

    # --- manifests --------------------------------------------------------------------------

    def manifest(self, namespace: str | None = None) -> dict[str, Any]:
        task = api.Task(
            metadata=api.ObjectMeta(
                name=self.config.name, namespace=namespace or self.client.namespace
            ),
            spec=self.config.spec,
        )
        return task.to_manifest()

    def run_manifest(
        self,
        input: InputT | Mapping[str, Any],
        *,
        priority: int | None = None,
        metadata: Mapping[str, str] | None = None,
        run_at: datetime | None = None,
    ) -> dict[str, Any]:
        model = input if isinstance(input, pydantic.BaseModel) else self.input_type(**input)
        spec: dict[str, Any] = {"task": self.config.name, "input": model.model_dump(mode="json")}
        if priority is not None:
            spec["priority"] = priority
        if metadata:
            spec["metadata"] = dict(metadata)
        if run_at is not None:
            spec["runAt"] = format_time(run_at)
        return {
            "apiVersion": _kube.API_VERSION,
            "kind": "TaskRun",
            "metadata": {
                "name": f"{self.config.name}-{uuid.uuid4().hex[:12]}",
                "namespace": self.client.namespace,
                "labels": {"kubetask.io/task": self.config.name},
            },
            "spec": spec,
        }

    # --- triggers ---------------------------------------------------------------------------

    def run_no_wait(
        self,
        input: InputT | Mapping[str, Any],
        *,
        priority: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> RunHandle[OutputT]:
        body = self.run_manifest(input, priority=priority, metadata=metadata)
        created = self.client.kube.create_run(self.client.namespace, body)
        return RunHandle(self, created["metadata"]["name"])

    def run(
        self,
        input: InputT | Mapping[str, Any],
        *,
        priority: int | None = None,
        metadata: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> OutputT:
        return self.run_no_wait(input, priority=priority, metadata=metadata).result(timeout)

    def schedule(
        self,
        run_at: datetime,
        input: InputT | Mapping[str, Any],
        *,
        priority: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> RunHandle[OutputT]:
        """Enqueue the run at `run_at` (a timezone-aware time; naive times are taken as UTC)."""
        body = self.run_manifest(input, priority=priority, metadata=metadata, run_at=run_at)
        created = self.client.kube.create_run(self.client.namespace, body)
        return RunHandle(self, created["metadata"]["name"])

    def run_many_no_wait(
        self, inputs: Iterable[InputT | Mapping[str, Any]]
    ) -> list[RunHandle[OutputT]]:
        items = list(inputs)
        with concurrent.futures.ThreadPoolExecutor(CREATE_CONCURRENCY) as pool:
            return list(pool.map(self.run_no_wait, items))

    def run_many(self, inputs: Iterable[InputT | Mapping[str, Any]]) -> list[OutputT]:
        handles = self.run_many_no_wait(inputs)
        with concurrent.futures.ThreadPoolExecutor(CREATE_CONCURRENCY) as pool:
            return list(pool.map(lambda handle: handle.result(), handles))

    async def aio_run_no_wait(
        self,
        input: InputT | Mapping[str, Any],
        *,
        priority: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> RunHandle[OutputT]:
        return await asyncio.to_thread(
            lambda: self.run_no_wait(input, priority=priority, metadata=metadata)
        )

    async def aio_run(
        self,
        input: InputT | Mapping[str, Any],
        *,
        priority: int | None = None,
        metadata: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> OutputT:
        handle = await self.aio_run_no_wait(input, priority=priority, metadata=metadata)
        return await handle.aio_result(timeout)

    async def aio_schedule(
        self,
        run_at: datetime,
        input: InputT | Mapping[str, Any],
        *,
        priority: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> RunHandle[OutputT]:
        return await asyncio.to_thread(
            lambda: self.schedule(run_at, input, priority=priority, metadata=metadata)
        )

    async def aio_run_many_no_wait(
        self, inputs: Iterable[InputT | Mapping[str, Any]]
    ) -> list[RunHandle[OutputT]]:
        return await asyncio.to_thread(self.run_many_no_wait, list(inputs))

    async def aio_run_many(self, inputs: Iterable[InputT | Mapping[str, Any]]) -> list[OutputT]:
        return await asyncio.to_thread(self.run_many, list(inputs))

    # --- results ----------------------------------------------------------------------------

    def parse_result(self, run: dict[str, Any]) -> OutputT:
        status = run.get("status") or {}
        name = run["metadata"]["name"]
        phase = status.get("phase")
        if phase == Phase.COMPLETED:
            output: OutputT = self.output_adapter.validate_python(status.get("output"))
            return output
        if phase == Phase.CANCELLED:
            raise RunCancelledError(
                f"Run {name} was cancelled ({status.get('reason')}).", run=name, status=status
            )
        error = status.get("error") or {}
        raise RunFailedError(
            f"Run {name} failed ({status.get('reason')}): {error.get('message', '')}",
            run=name,
            status=status,
        )


def is_final(run: dict[str, Any]) -> bool:
    return (run.get("status") or {}).get("phase") in FINAL_PHASES


def _signature_types(
    function: Callable[..., Any],
) -> tuple[type[pydantic.BaseModel], pydantic.TypeAdapter[Any]]:
    """The input model and an adapter for the output, read from the function's annotations."""
    hints = typing.get_type_hints(function)
    parameters = list(inspect.signature(function).parameters)
    if not parameters:
        raise TypeError(f"Task function {function.__name__} must take (input, ctx).")
    input_type = hints.get(parameters[0])
    if not (isinstance(input_type, type) and issubclass(input_type, pydantic.BaseModel)):
        raise TypeError(
            f"The first parameter of task {function.__name__} must be annotated with a pydantic "
            "model (its input)."
        )
    output_type = hints.get("return", Any)
    return input_type, pydantic.TypeAdapter(output_type)

"""A task defined in Python: the function, its configuration, and the ways to trigger it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import typing
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

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
class Concurrency:
    """At most `max_runs` runs per key running at once; the key is a CEL `expression` over
    `input` and `metadata`, e.g. "input.user". `strategy` says what happens at the limit:
    GroupRoundRobin (wait; keys take turns), CancelInProgress (cancel the key's oldest run) or
    CancelNewest (cancel the new run)."""

    expression: str
    max_runs: int
    strategy: str = "GroupRoundRobin"


@dataclasses.dataclass(frozen=True)
class RateLimit:
    """Units a run takes from a rate limit when it starts.

    Either `key` names a RateLimit object (`kt.rate_limits.put(...)`), or `dynamic_key` is a CEL
    expression giving the key per run, with `limit` units per `duration` (second, minute, hour,
    day, week, month or year) shared by every task that renders the same key.
    """

    key: str | None = None
    dynamic_key: str | None = None
    units: int = 1
    limit: int | None = None
    duration: str | None = None


#: The key of the integer shorthand `concurrency=N`: one constant key for every run.
CONSTANT_KEY_EXPRESSION = "'all'"


def concurrency_rules(
    concurrency: int | Sequence[Concurrency | Mapping[str, Any]] | None,
) -> list[api.ConcurrencyRule]:
    """The API's rules from what `@kt.task(concurrency=...)` accepts."""
    if concurrency is None:
        return []
    if isinstance(concurrency, int):
        return [api.ConcurrencyRule(expression=CONSTANT_KEY_EXPRESSION, max_runs=concurrency)]
    rules = []
    for item in concurrency:
        fields = dataclasses.asdict(item) if isinstance(item, Concurrency) else dict(item)
        rules.append(api.ConcurrencyRule.model_validate(fields))
    return rules


def rate_limit_uses(
    rate_limits: Sequence[RateLimit | Mapping[str, Any]] | None,
) -> list[api.TaskRateLimit]:
    uses = []
    for item in rate_limits or ():
        fields = dataclasses.asdict(item) if isinstance(item, RateLimit) else dict(item)
        uses.append(
            api.TaskRateLimit.model_validate({k: v for k, v in fields.items() if v is not None})
        )
    return uses


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
        concurrency: int | Sequence[Concurrency | Mapping[str, Any]] | None = None,
        rate_limits: Sequence[RateLimit | Mapping[str, Any]] | None = None,
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
            concurrency=concurrency_rules(concurrency),
            rate_limits=rate_limit_uses(rate_limits),
        )
        return cls(name=name, spec=spec)

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(retries=self.spec.retries, backoff=self.spec.backoff)


class TaskDecorator:
    """What `kt.task(...)` returns: applied to a function (sync or async), declares the task."""

    def __init__(self, client: KubeTask, name: str | None, settings: dict[str, Any]) -> None:
        self.client = client
        self.name = name
        self.settings = settings

    @overload
    def __call__(
        self, function: Callable[[InputT, Context], Coroutine[Any, Any, OutputT]]
    ) -> TaskDefinition[InputT, OutputT]: ...

    @overload
    def __call__(
        self, function: Callable[[InputT, Context], OutputT]
    ) -> TaskDefinition[InputT, OutputT]: ...

    def __call__(self, function: Callable[[Any, Context], Any]) -> TaskDefinition[Any, Any]:
        config = TaskConfig.build(
            name=self.name or function.__name__.replace("_", "-"), **self.settings
        )
        return TaskDefinition(self.client, function, config)


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

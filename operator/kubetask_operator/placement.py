"""Which queued run goes to which worker: pure decisions over plain data, no API access.

The queue is ordered by priority (3 first), then by the time a run entered the queue, then by name
so that ties are deterministic. All runs of one task share the same requirements (affinity lives
on the Task), so when the head of a task's queue cannot be placed, nothing behind it can either:
the task is set aside for this pass with the reason, and the cost of a pass grows with the number
of assignments and tasks, not with the number of waiting runs.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime


class Comparator(enum.StrEnum):
    EQUAL = "Equal"
    NOT_EQUAL = "NotEqual"
    GREATER_THAN = "GreaterThan"
    GREATER_THAN_OR_EQUAL = "GreaterThanOrEqual"
    LESS_THAN = "LessThan"
    LESS_THAN_OR_EQUAL = "LessThanOrEqual"


class WaitReason(enum.StrEnum):
    """Why the runs of a task stay queued; the value is the condition reason users see."""

    NO_WORKER = "NoWorker"
    NO_MATCHING_WORKER = "NoMatchingWorker"
    SLOTS_BUSY = "SlotsBusy"


WAIT_MESSAGES = {
    WaitReason.NO_WORKER: "No live worker serves this task.",
    WaitReason.NO_MATCHING_WORKER: "No live worker serving this task matches its required labels.",
    WaitReason.SLOTS_BUSY: "Every matching worker has all its slots busy.",
}


@dataclasses.dataclass(frozen=True)
class AffinityTerm:
    key: str
    value: str
    comparator: Comparator = Comparator.EQUAL
    required: bool = False
    weight: int = 100

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.key)
        if actual is None:
            return self.comparator is Comparator.NOT_EQUAL
        if self.comparator is Comparator.EQUAL:
            return actual == self.value
        if self.comparator is Comparator.NOT_EQUAL:
            return actual != self.value
        # The ordering comparators compare integers; a label that is not one never matches.
        try:
            have, want = int(actual), int(self.value)
        except ValueError:
            return False
        return {
            Comparator.GREATER_THAN: have > want,
            Comparator.GREATER_THAN_OR_EQUAL: have >= want,
            Comparator.LESS_THAN: have < want,
            Comparator.LESS_THAN_OR_EQUAL: have <= want,
        }[self.comparator]


@dataclasses.dataclass(frozen=True)
class Worker:
    """A live worker pod as the scheduler sees it.

    `labels` are the node's labels overlaid with the pod's, so affinity can name either.
    """

    name: str
    tasks: frozenset[str]
    slots: int
    busy: int
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def free(self) -> int:
        return self.slots - self.busy


@dataclasses.dataclass(frozen=True)
class QueuedRun:
    name: str
    task: str
    priority: int
    queued_at: datetime
    seq: int = 0
    """Tie-breaker for runs queued within the same second (creation times have no fraction)."""

    def order_key(self) -> tuple[int, datetime, int, str]:
        return (-self.priority, self.queued_at, self.seq, self.name)


@dataclasses.dataclass(frozen=True)
class Assignment:
    run: str
    worker: str


@dataclasses.dataclass(frozen=True)
class PlacementResult:
    assignments: list[Assignment]
    waiting: dict[str, WaitReason]
    """Task name → why its remaining runs wait (only tasks with runs left in the queue)."""


def score(terms: Sequence[AffinityTerm], labels: Mapping[str, str]) -> int | None:
    """Sum of the matched preferred weights, or None when a required term fails."""
    total = 0
    for term in terms:
        matched = term.matches(labels)
        if term.required and not matched:
            return None
        if matched and not term.required:
            total += term.weight
    return total


def place(
    queue: Iterable[QueuedRun],
    workers: Iterable[Worker],
    affinity: Mapping[str, Sequence[AffinityTerm]],
) -> PlacementResult:
    """Assign queued runs to workers with free slots, best-scoring then least-loaded first."""
    busy = {worker.name: worker.busy for worker in workers}
    workers_by_task: dict[str, list[Worker]] = {}
    for worker in workers:
        for task in worker.tasks:
            workers_by_task.setdefault(task, []).append(worker)

    per_task: dict[str, list[tuple[tuple[int, datetime, int, str], QueuedRun]]] = {}
    for run in queue:
        per_task.setdefault(run.task, []).append((run.order_key(), run))
    heads: list[tuple[tuple[int, datetime, int, str], str]] = []
    for task, runs in per_task.items():
        heapq.heapify(runs)
        heads.append((runs[0][0], task))
    heapq.heapify(heads)

    assignments: list[Assignment] = []
    waiting: dict[str, WaitReason] = {}
    while heads:
        _, task = heapq.heappop(heads)
        runs = per_task[task]
        choice, reason = _best_worker(workers_by_task.get(task, []), affinity.get(task, ()), busy)
        if choice is None:
            waiting[task] = reason
            continue
        _, run = heapq.heappop(runs)
        busy[choice.name] += 1
        assignments.append(Assignment(run=run.name, worker=choice.name))
        if runs:
            heapq.heappush(heads, (runs[0][0], task))
    return PlacementResult(assignments=assignments, waiting=waiting)


def _best_worker(
    candidates: Sequence[Worker],
    terms: Sequence[AffinityTerm],
    busy: Mapping[str, int],
) -> tuple[Worker | None, WaitReason]:
    if not candidates:
        return None, WaitReason.NO_WORKER
    best: Worker | None = None
    best_key: tuple[int, float, str] | None = None
    any_match = False
    for worker in candidates:
        points = score(terms, worker.labels)
        if points is None:
            continue
        any_match = True
        used = busy[worker.name]
        if used >= worker.slots:
            continue
        # Highest score first, then the lowest share of busy slots, then the name for stability.
        key = (-points, used / worker.slots, worker.name)
        if best_key is None or key < best_key:
            best, best_key = worker, key
    if best is not None:
        return best, WaitReason.SLOTS_BUSY
    return None, WaitReason.SLOTS_BUSY if any_match else WaitReason.NO_MATCHING_WORKER

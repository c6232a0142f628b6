"""Which queued run goes to which worker: pure decisions over plain data, no API access.

Runs are placed from groups. A group holds the queued runs of one task that share every constraint:
the same concurrency keys and the same rate-limit keys. When the head of a group cannot be placed,
nothing behind it can be either, so the group is set aside for the pass; when no worker can take
the head of a task, the whole task is. The cost of a pass therefore grows with the number of
assignments and groups, not with the number of waiting runs.

Order: priority (3 first), then a time that is the run's arrival, or — for a group that takes
turns with others (GroupRoundRobin) — the turn its key was last served if that is later. A key
that was just served thus goes behind the keys that waited, and freed capacity goes round-robin.
A turn is the pass's time and the assignment's index within the pass, so that keys served in one
pass keep the order they were served in: a tie on the time alone would go to the same key (by
name) again and again whenever a pass has more free slots than there are keys.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from kubetask.api import WorkerLabelComparator

# The API's enum is the one definition of the comparators.
Comparator = WorkerLabelComparator


class WaitReason(enum.StrEnum):
    """Why a run stays queued; the value is the condition reason users see."""

    NO_WORKER = "NoWorker"
    NO_MATCHING_WORKER = "NoMatchingWorker"
    SLOTS_BUSY = "SlotsBusy"
    CONCURRENCY_LIMITED = "ConcurrencyLimited"
    RATE_LIMITED = "RateLimited"


WAIT_MESSAGES = {
    WaitReason.NO_WORKER: "No live worker serves this task.",
    WaitReason.NO_MATCHING_WORKER: "No live worker serving this task matches its required labels.",
    WaitReason.SLOTS_BUSY: "Every matching worker has all its slots busy.",
    WaitReason.CONCURRENCY_LIMITED: "A concurrency key of this run has its maximum running.",
    WaitReason.RATE_LIMITED: "A rate limit of this run has no units left in its window.",
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
class Cap:
    """A concurrency counter a run occupies while running: at most `limit` at once."""

    counter: str
    limit: int


@dataclasses.dataclass(frozen=True)
class Units:
    """Units a run takes from a rate-limit budget when it is assigned."""

    budget: str
    units: int


@dataclasses.dataclass(frozen=True)
class QueuedRun:
    name: str
    task: str
    priority: int
    queued_at: datetime
    seq: int = 0
    """Tie-breaker for runs queued within the same second (creation times have no fraction)."""
    caps: tuple[Cap, ...] = ()
    units: tuple[Units, ...] = ()
    turn_key: str | None = None
    """The key a GroupRoundRobin rule gives this run: keys take turns for freed capacity."""

    def order_key(self) -> tuple[int, datetime, int, str]:
        return (-self.priority, self.queued_at, self.seq, self.name)

    @property
    def group(self) -> tuple[str, tuple[Cap, ...], tuple[Units, ...]]:
        return (self.task, self.caps, self.units)


@dataclasses.dataclass(frozen=True)
class Assignment:
    run: str
    worker: str


@dataclasses.dataclass(frozen=True)
class PlacementResult:
    assignments: list[Assignment]
    waiting: dict[str, WaitReason]
    """Run name → why it stays queued, for every run not assigned."""
    spent: dict[str, int]
    """Budget → units the assignments take from it."""


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


_Order = tuple[int, datetime, int, str]
_HeadOrder = tuple[int, datetime, int, int, str]
Turn = tuple[datetime, int]
"""When a round-robin key was last served: the pass's time, then the assignment's index in it."""
Group = tuple[str, tuple[Cap, ...], tuple[Units, ...]]


class RunQueue:
    """Queued runs that may be assigned now, grouped by the constraints they share.

    Each group is a heap in queue order. Runs leave lazily: `discard` forgets a run at once, and
    its heap entry is dropped when it reaches the top. Everything here costs O(log n) per run.
    """

    def __init__(self) -> None:
        self._heaps: dict[Group, list[tuple[_Order, str]]] = {}
        self._runs: dict[str, QueuedRun] = {}
        self._by_cap: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._runs)

    def __contains__(self, name: object) -> bool:
        return name in self._runs

    def get(self, name: str) -> QueuedRun | None:
        return self._runs.get(name)

    def put(self, run: QueuedRun) -> None:
        if self._runs.get(run.name) == run:
            return
        self.discard(run.name)
        self._runs[run.name] = run
        heapq.heappush(self._heaps.setdefault(run.group, []), (run.order_key(), run.name))
        for cap in run.caps:
            self._by_cap.setdefault(cap.counter, set()).add(run.name)

    def discard(self, name: str) -> None:
        run = self._runs.pop(name, None)
        if run is None:
            return
        for cap in run.caps:
            members = self._by_cap.get(cap.counter)
            if members is not None:
                members.discard(name)
                if not members:
                    del self._by_cap[cap.counter]

    def holding(self, counter: str) -> set[str]:
        """Queued runs that would take `counter` once running."""
        return self._by_cap.get(counter, set())

    def head(self, group: Group) -> QueuedRun | None:
        heap = self._heaps.get(group)
        while heap:
            _, name = heap[0]
            run = self._runs.get(name)
            if run is not None and run.group == group:
                return run
            heapq.heappop(heap)
        self._heaps.pop(group, None)
        return None

    def pop(self, group: Group) -> QueuedRun:
        run = self.head(group)
        assert run is not None
        heapq.heappop(self._heaps[group])
        self.discard(run.name)
        return run

    def groups(self) -> list[Group]:
        return [group for group in list(self._heaps) if self.head(group) is not None]

    def members(self, group: Group) -> list[QueuedRun]:
        """The group's runs, in no particular order; O(size of the group)."""
        names = {name for _, name in self._heaps.get(group, [])}
        return [
            self._runs[name]
            for name in names
            if name in self._runs and self._runs[name].group == group
        ]


@dataclasses.dataclass(frozen=True)
class QueuePlacement:
    assignments: list[Assignment]
    blocked: dict[Group, WaitReason]
    """Groups whose head could not be placed, with the reason; their runs stay queued."""
    spent: dict[str, int]
    popped: dict[str, QueuedRun]
    """The assigned runs as they were queued."""
    turns: dict[str, Turn]
    """Round-robin keys served in this pass, with their last turn in it."""


def place(
    queue: Iterable[QueuedRun],
    workers: Iterable[Worker],
    affinity: Mapping[str, Sequence[AffinityTerm]],
    *,
    running: Mapping[str, int] | None = None,
    budgets: Mapping[str, int] | None = None,
    last_turn: Mapping[str, Turn] | None = None,
    now: datetime | None = None,
) -> PlacementResult:
    """`place_queue` over a list of runs, with a waiting reason for every run not assigned."""
    run_queue = RunQueue()
    for run in queue:
        run_queue.put(run)
    result = place_queue(
        run_queue, workers, affinity,
        running=running, budgets=budgets, last_turn=last_turn, now=now,
    )  # fmt: skip
    waiting = {
        run.name: reason
        for group, reason in result.blocked.items()
        for run in run_queue.members(group)
    }
    return PlacementResult(assignments=result.assignments, waiting=waiting, spent=result.spent)


def place_queue(
    queue: RunQueue,
    workers: Iterable[Worker],
    affinity: Mapping[str, Sequence[AffinityTerm]],
    *,
    running: Mapping[str, int] | None = None,
    budgets: Mapping[str, int] | None = None,
    last_turn: Mapping[str, Turn] | None = None,
    now: datetime | None = None,
) -> QueuePlacement:
    """Assign queued runs to workers with free slots, within concurrency caps and budgets.

    Assigned runs are popped from `queue`. `running` counts the runs holding each concurrency
    counter, `budgets` the units left in each rate-limit window, `last_turn` when each
    round-robin key was last given a run; `now` is that moment for this pass's assignments.
    """
    workers = list(workers)
    busy = {worker.name: worker.busy for worker in workers}
    held = dict(running or {})
    left = dict(budgets or {})
    turns = dict(last_turn or {})
    served: dict[str, Turn] = {}
    workers_by_task: dict[str, list[Worker]] = {}
    for worker in workers:
        for task in worker.tasks:
            workers_by_task.setdefault(task, []).append(worker)

    heads: list[tuple[_HeadOrder, Group]] = []
    for group in queue.groups():
        head = queue.head(group)
        if head is not None:
            heads.append((_head_order(head, turns), group))
    heapq.heapify(heads)

    assignments: list[Assignment] = []
    blocked: dict[Group, WaitReason] = {}
    spent: dict[str, int] = {}
    popped: dict[str, QueuedRun] = {}
    blocked_tasks: dict[str, WaitReason] = {}
    while heads:
        _, group = heapq.heappop(heads)
        head = queue.head(group)
        if head is None:
            continue
        reason = blocked_tasks.get(head.task) or _limited(head, held, left)
        choice = None
        if reason is None:
            choice, reason = _best_worker(
                workers_by_task.get(head.task, []), affinity.get(head.task, ()), busy
            )
            if choice is None:
                blocked_tasks[head.task] = reason
        if choice is None:
            blocked[group] = reason
            continue

        popped[head.name] = queue.pop(group)
        busy[choice.name] += 1
        for cap in head.caps:
            held[cap.counter] = held.get(cap.counter, 0) + 1
        for use in head.units:
            left[use.budget] = left.get(use.budget, 0) - use.units
            spent[use.budget] = spent.get(use.budget, 0) + use.units
        if head.turn_key is not None and now is not None:
            turns[head.turn_key] = served[head.turn_key] = (now, len(assignments))
        assignments.append(Assignment(run=head.name, worker=choice.name))
        following = queue.head(group)
        if following is not None:
            heapq.heappush(heads, (_head_order(following, turns), group))
    return QueuePlacement(
        assignments=assignments, blocked=blocked, spent=spent, popped=popped, turns=served
    )


def _head_order(run: QueuedRun, turns: Mapping[str, Turn]) -> _HeadOrder:
    # An arrival sorts before any turn given at the same time (index -1).
    moment: Turn = (run.queued_at, -1)
    if run.turn_key is not None and run.turn_key in turns:
        moment = max(moment, turns[run.turn_key])
    return (-run.priority, moment[0], moment[1], run.seq, run.name)


def _limited(run: QueuedRun, held: Mapping[str, int], left: Mapping[str, int]) -> WaitReason | None:
    if any(held.get(cap.counter, 0) >= cap.limit for cap in run.caps):
        return WaitReason.CONCURRENCY_LIMITED
    if any(left.get(use.budget, 0) < use.units for use in run.units):
        return WaitReason.RATE_LIMITED
    return None


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

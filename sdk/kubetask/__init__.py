"""kubetask: Hatchet-style background tasks on Kubernetes.

kt = KubeTask()

@kt.task(name="resize", retries=3, backoff_factor=2, execution_timeout="30s")
def resize(input: ResizeInput, ctx: Context) -> ResizeOutput: ...

resize.run(ResizeInput(...))                            # waits for the output
kt.worker("images", tasks=[resize], slots=4).start()    # serves runs in a worker pod
"""

from kubetask.client import KubeTask
from kubetask.context import Context, WorkerInfo
from kubetask.errors import NonRetryableError, RunCancelledError, RunError, RunFailedError
from kubetask.task import Concurrency, DesiredWorkerLabel, RateLimit, RunHandle, TaskDefinition
from kubetask.worker import Worker

__all__ = [
    "Concurrency",
    "Context",
    "DesiredWorkerLabel",
    "KubeTask",
    "NonRetryableError",
    "RateLimit",
    "RunCancelledError",
    "RunError",
    "RunFailedError",
    "RunHandle",
    "TaskDefinition",
    "Worker",
    "WorkerInfo",
]

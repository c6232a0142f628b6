"""An example worker: `kubetask worker examples.python.hello_worker:worker`.

It serves the `hello` task that examples/ manifests and `make dev` trigger.
"""

import asyncio

from pydantic import BaseModel

from kubetask import Context, KubeTask


class HelloInput(BaseModel):
    name: str = "world"


class HelloOutput(BaseModel):
    greeting: str


kt = KubeTask()


@kt.task(name="hello", retries=2, execution_timeout="30s")
async def hello(input: HelloInput, ctx: Context) -> HelloOutput:
    ctx.log(f"greeting {input.name} on attempt {ctx.attempt}")
    await asyncio.sleep(0)
    return HelloOutput(greeting=f"Hello, {input.name}!")


worker = kt.worker("hello-worker", tasks=[hello], slots=4)

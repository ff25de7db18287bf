"""A stage: one step of a build over Ray Data blocks (one block = one fragment, the unit of commit).

A `TaskStage` runs a function on each block in Ray tasks (CPU); an `ActorStage` runs a callable class on its
own actor pool (a model held once per actor, GPUs if asked). Both can be run alone on a pyarrow table with
`run`, which is how they are tested. A build is a list of stages (`plan.py`), applied in order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

import pyarrow as pa

from ..config import ActorResources
from ..ray_runtime import actor_pool, actor_resources, gpu_request


class Stage(ABC):
    name: ClassVar[str]

    @abstractmethod
    def apply(self, ds: Any) -> Any:
        """The Ray dataset with this stage added (lazily; nothing runs until the rows are consumed)."""

    @abstractmethod
    def run(self, table: pa.Table) -> pa.Table:
        """This stage on one block, in this process."""

    def describe(self) -> str:
        return self.name


class TaskStage(Stage):
    """A function `fn(table, **kwargs) -> table` per block, in Ray tasks (`task_options`: Ray Data's
    options for them, e.g. num_cpus; default one CPU each)."""

    task_options: ClassVar[dict[str, Any]] = {}

    @abstractmethod
    def function(self) -> tuple[Callable[..., pa.Table], dict[str, Any]]: ...

    def apply(self, ds: Any) -> Any:
        fn, kwargs = self.function()
        return ds.map_batches(fn, batch_format="pyarrow", batch_size=None, fn_kwargs=kwargs, **self.task_options)

    def run(self, table: pa.Table) -> pa.Table:
        fn, kwargs = self.function()
        return fn(table, **kwargs)


class ActorStage(Stage):
    """A class `cls(**ctor_kwargs)` called on each block, on an actor pool sized by `resources`;
    `share` = how many actor stages the job runs (CPU actors split the node's cores between them)."""

    def __init__(self, resources: ActorResources, share: int = 1):
        self.resources, self.share = resources, share
        self._sized: tuple[float, float, int] | None = None

    @abstractmethod
    def actor(self, torch_threads: int) -> tuple[type, dict[str, Any]]: ...

    def sizing(self) -> tuple[float, float, int]:
        """(cpus, gpus, torch threads) per actor (asks the cluster once)."""
        if self._sized is None:
            self._sized = actor_resources(self.resources, self.share)
        return self._sized

    def describe(self) -> str:
        cpus, gpus, threads = self.sizing()
        pool = self.resources.actors
        size = pool if isinstance(pool, int) else f"{pool.min}..{pool.max}"
        return (f"{self.name} actors: {size} x ({cpus:g} CPU, {gpus:g} GPU, {threads} torch threads; "
                f"accelerator {self.resources.accelerator})")

    def apply(self, ds: Any) -> Any:
        cpus, gpus, threads = self.sizing()
        cls, kwargs = self.actor(threads)
        return ds.map_batches(cls, fn_constructor_kwargs=kwargs, compute=actor_pool(self.resources),
                              batch_size=None, batch_format="pyarrow", num_cpus=cpus, **gpu_request(gpus))

    def run(self, table: pa.Table) -> pa.Table:
        cls, kwargs = self.actor(self.resources.torch_threads or 1)
        return cls(**kwargs)(table)

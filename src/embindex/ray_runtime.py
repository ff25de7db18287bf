"""The driver's Ray: connect or start one, shut it down on exit (SIGTERM included), size the actors,
run plain tasks (`run_tasks`), tell retryable failures from deterministic ones (`classify_failure`)."""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from .config import ActorResources, ResourcesConfig


@contextmanager
def ray_session(res: ResourcesConfig) -> Iterator[None]:
    """Use a running Ray, connect to `resources.ray_address` (or $RAY_ADDRESS, as inside `ray job submit`),
    or start a local one in-process."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = res.ray_address or os.environ.get("RAY_ADDRESS")
    if address:  # joining a cluster: its nodes say what resources there are
        ray.init(address=address, log_to_driver=False)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private in-process cluster
        # Ray starts workers at nice 15; the embed actors would then lose the CPU to any other process.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ncpu = os.cpu_count() or 2
        # one more logical CPU than cores: read/write tasks must never starve behind the actors
        ray.init(num_cpus=res.num_cpus or ncpu + 1, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    previous = _exit_on_sigterm()
    try:
        yield
    finally:
        ray.shutdown()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm() -> Any:
    """Turn SIGTERM into SystemExit so `finally` shuts Ray down (a killed driver leaks ~1 GB of workers)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def _handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, _handler)


def actor_resources(res: ActorResources, share: int = 1) -> tuple[float, float, int]:
    """(cpus, gpus, torch threads) per actor of a stage (the embed stage: `resources`).

    GPUs: `gpus_per_actor` when set; else one per actor with `accelerator: gpu` (requested even when no GPU
    node is up, so an autoscaler provisions one) or with `auto` on a cluster that has GPUs or whose autoscaler
    can start a node type with GPUs; none with `cpu`.
    CPUs: `cpus_per_actor` when set; 1 beside a GPU; a CPU actor takes the cores of the largest node (alive,
    or of a node type the autoscaler can start) but one (left for read and write tasks), split between the
    `share` actor stages of the job (a generative stage and the embed stage), never the driver machine's
    core count."""
    gpus = res.gpus_per_actor
    if gpus is None:
        if res.accelerator == "gpu":
            gpus = 1.0
        elif res.accelerator == "auto":
            gpus = 1.0 if cluster_can_have_gpus() else 0.0
        else:
            gpus = 0.0
    cpus = res.cpus_per_actor
    if cpus is None:
        cpus = 1.0 if gpus else max(1.0, largest_node_cpus() - 1) / max(1, share)
    threads = res.torch_threads or max(1, int(cpus))
    return cpus, gpus, threads


def cluster_has_gpus() -> bool:
    """Whether the Ray cluster this driver is connected to has any GPU."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def autoscaler_node_types() -> list[dict[str, float]]:
    """Resources of each node type the cluster's autoscaler can start (KubeRay worker groups, `ray up`
    node types; max_count != 0), from the cluster config the autoscaler reports to the GCS; [] without
    an autoscaler (a local Ray, a fixed cluster)."""
    import ray._private.state

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS without the key: no autoscaler information
        return []
    if config is None:
        return []
    return [{k: float(v) for k, v in g.resources.items()} for g in config.node_group_configs if g.max_count != 0]


def cluster_can_have_gpus() -> bool:
    """GPUs up now, or a node type with GPUs the autoscaler can start (a GPU worker group scaled to zero)."""
    return cluster_has_gpus() or any(t.get("GPU", 0) > 0 for t in autoscaler_node_types())


def largest_node_cpus() -> float:
    """CPUs of the largest node: alive ones (the head's when it is alone) and the autoscaler's node types."""
    import ray

    alive = [n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return max(alive + [t.get("CPU", 0.0) for t in autoscaler_node_types()], default=1.0) or 1.0


def gpu_request(gpus: float) -> dict[str, Any]:
    """map_batches arguments asking each actor for `gpus` GPUs while keeping `batch_size=None`: a batch is one
    whole block, i.e. one fragment, the unit of commit. (`num_gpus=` would make Ray Data demand a batch size,
    which re-bundles blocks: fragments split or merged across batches.)"""
    if not gpus:
        return {}
    warnings.filterwarnings("ignore", message="`ray_remote_args_fn` is deprecated")  # pinned below 2.64
    return {"ray_remote_args_fn": functools.partial(dict, num_gpus=gpus)}


def actor_pool(res: ActorResources) -> Any:
    """Ray Data's actor pool for `resources.actors`: fixed size, or autoscaling between min and max."""
    import ray.data

    if isinstance(res.actors, int):
        return ray.data.ActorPoolStrategy(size=res.actors)
    return ray.data.ActorPoolStrategy(min_size=res.actors.min, max_size=res.actors.max)


def run_tasks(fn: Callable[..., Any], calls: Sequence[tuple], shared: dict[str, Any] | None = None,
              num_cpus: float = 1.0) -> list[Any]:
    """fn(*call, **shared) for every call, as Ray tasks when Ray is up (shared values put once), else inline.

    Results come back in call order."""
    shared = shared or {}
    try:
        import ray
        use_ray = ray.is_initialized()
    except ImportError:  # pragma: no cover - ray is a dependency
        use_ray = False
    if not use_ray:
        return [fn(*call, **shared) for call in calls]
    remote = ray.remote(num_cpus=num_cpus, max_retries=2)(fn)
    refs = {k: ray.put(v) for k, v in shared.items()}
    return ray.get([remote.remote(*call, **refs) for call in calls])


class _FailureNarrative(logging.Filter):
    """Drops Ray Data's account of a user-code failure, which embindex replaces with one line of its own
    (`classify_failure`): "An exception was raised from a task of operator ... To ignore this exception and
    continue, set DataContext.max_errored_blocks" (advice that would drop rows silently). Its internal
    errors (logged with a traceback) and every other record pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is not None or "DataContext.max_errored_blocks" not in str(record.msg)


def quiet_ray_data(progress: bool) -> Any:
    """Ray Data without its periodic progress logs (bars only when asked for and stderr is a terminal) and
    without its narrative of a failed UDF, which the run reports in one line. Returns the DataContext."""
    import sys

    import ray.data
    from ray.util.debug import log_once

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    executor_state = logging.getLogger("ray.data._internal.execution.streaming_executor_state")
    if not any(isinstance(f, _FailureNarrative) for f in executor_state.filters):
        executor_state.addFilter(_FailureNarrative())
    # "Exception occurred in user code, with the abbreviated stack trace below": there is none below, the
    # run prints the error's one line (the full trace stays in Ray Data's log file)
    log_once("ray_data_exception_internal_hidden")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(progress and sys.stderr.isatty())
    ctx.verbose_progress = False
    if not ctx.enable_progress_bars:
        # embindex prints its own progress lines: Ray Data's one-time "Progress bars disabled. To enable..."
        # hint (logged under this log_once key) would only describe this deliberate setting
        log_once("ray_data_progress_manager_disabled")
    return ctx


class ComputeThread:
    """One thread an actor owns for all its torch work (setup and every call).

    Ray Data calls an actor's `__init__` on its main thread but `__call__` on a thread of its own; torch ops
    on both would make two OpenMP teams, and libgomp, seeing more team threads than cores, stops spinning at
    its barriers and sleeps instead (measured on 2 cores: ~500 sleeps/s per thread and a slower forward)."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embindex-compute")
        self._setup_error: BaseException | None = None

    def setup(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run the actor's setup (model load, warm-up). What it raises is kept and raised by the first `run`,
        not from the actor's constructor: Ray restarts an actor whose constructor raised and reports each
        task pending on it, full traceback included, on the driver's stdout; raised from a call, the error
        reaches the driver once, as that batch's exception, which `classify_failure` reads."""
        try:
            self.run(fn, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised by run()
            self._setup_error = e

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._setup_error is not None:
            raise self._setup_error
        return self._pool.submit(fn, *args, **kwargs).result()


@dataclass(frozen=True)
class Failure:
    """What a failed Ray Data run says: whether another attempt can succeed, and one readable line."""

    retryable: bool
    message: str


# exception types (by name, as remote tracebacks carry them) that a later attempt may not meet again
TRANSIENT_ERRORS = ("OSError", "IOError", "ConnectionError", "ConnectionResetError", "ConnectionRefusedError",
                    "TimeoutError", "BrokenPipeError", "ClientError", "EndpointConnectionError",
                    "ReadTimeoutError", "ConnectTimeoutError", "ResponseStreamingError", "IncompleteReadError",
                    "ArrowIOError")
_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(?P<type>[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)): (?P<msg>.*)$")
_WRAPPERS = ("UserCodeException", "RayTaskError", "SystemException", "ActorDiedError", "RayActorError")
_LOST = ("WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError", "ObjectReconstructionFailedError",
         "ObjectFetchTimedOutError", "RaySystemError", "ActorUnavailableError", "OutOfMemoryError")


def _root_line(text: str) -> tuple[str, str] | None:
    """(type, message) of the innermost exception a Ray error's text reports (its last 'XError: msg' line)."""
    found = None
    for line in text.splitlines():
        m = _ERROR_LINE.match(line.strip())
        if m and not m.group("type").startswith(_WRAPPERS):
            found = (m.group("type"), m.group("msg"))
    return found


def classify_failure(e: BaseException) -> Failure:
    """Lost workers, nodes and objects, and storage I/O errors are retryable; anything the code or the data
    raised (config, model, shape, NotImplementedError, ...) fails the same way again and is not."""
    import ray.exceptions

    if isinstance(e, OSError):
        return Failure(True, f"{type(e).__name__}: {e}")
    chain, x = [], e
    while x is not None and len(chain) < 10:
        chain.append(x)
        x = x.__cause__ or x.__context__
    names = {type(c).__name__ for c in chain}
    text = "\n".join(str(c) for c in chain)
    root = _root_line(text)
    if root is not None:
        kind, msg = root
        return Failure(kind in TRANSIENT_ERRORS or kind.endswith("OSError"), f"{kind}: {msg}"[:500])
    # no error line: a worker or node went away (killed, preempted, out of memory) and the next attempt runs
    # elsewhere, or Ray itself failed
    lost = any(n.startswith(_LOST) for n in names) or isinstance(e, ray.exceptions.ActorDiedError)
    return Failure(lost, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")

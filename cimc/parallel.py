"""Execution backends: run independent tasks (design-space points, shards of chip instances) in parallel.

One small interface, three implementations:

* :class:`InProcessBackend` — the tasks one after the other in this process (no ``--workers``);
* :class:`LocalBackend` — an embedded :class:`concurrent.futures.ProcessPoolExecutor` (``--workers N``; no
  server, nothing to start). Workers are spawned with ``OMP_WAIT_POLICY=PASSIVE`` and each sets
  ``torch.set_num_threads(cores // workers)``, so workers × threads never exceed the cores (torch's OpenMP
  threads spin while they wait, and oversubscribed cores slow everything down many times);
* :class:`RayBackend` — Ray tasks (``--ray auto`` starts or joins a local Ray, ``--ray ADDRESS`` joins a
  cluster; optional extra ``pip install "cimc[ray]"``). The read-only payload every task needs (model bytes,
  data) goes once into Ray's object store; a task whose worker process dies is retried (``max_retries``).

A task is a module-level function ``fn(shared, task)``: ``shared`` is the payload common to all tasks (sent
to each worker once), ``task`` the small per-task argument. :meth:`Backend.run` yields ``(index, result)``
as tasks finish, in completion order; callers that need a fixed order sort by index. A
:class:`~cimc.errors.CimcError` raised by a task is re-raised in the caller as the same one-line error.
"""

from __future__ import annotations

import abc
import ast
import logging
import multiprocessing
import multiprocessing.context
import os
import pickle
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cimc.errors import CimcError, InputError

__all__ = ["Backend", "InProcessBackend", "LocalBackend", "RayBackend", "available_cores", "get_backend",
           "split_range"]

logger = logging.getLogger(__name__)

Task = Callable[[Any, Any], Any]

# Retries of a Ray task whose worker process died (not of a task that raised: those are the user's errors).
RAY_MAX_RETRIES = 3


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def split_range(count: int, parts: int) -> list[tuple[int, int]]:
    """``[0, count)`` as at most ``parts`` contiguous, near-equal, non-empty ranges (the first ones larger)."""
    parts = max(1, min(parts, count))
    base, extra = divmod(count, parts)
    ranges, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


@dataclass
class _Failure:
    """A user error raised inside a worker, carried back as data (class and one-line message)."""

    kind: type
    message: str

    def reraise(self) -> None:
        kind = self.kind if isinstance(self.kind, type) and issubclass(self.kind, CimcError) else CimcError
        raise kind(self.message)


def _guarded(fn: Task, shared: Any, task: Any) -> Any:
    try:
        return fn(shared, task)
    except CimcError as exc:
        return _Failure(type(exc), str(exc))


def _unwrap(result: Any) -> Any:
    if isinstance(result, _Failure):
        result.reraise()
    return result


class Backend(abc.ABC):
    """Runs ``fn(shared, task)`` for every task; see the module docstring."""

    name: str = ""
    workers: int = 1

    @abc.abstractmethod
    def run(self, fn: Task, tasks: Sequence[Any], shared: Any = None) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, result)`` for each task as it finishes."""

    def describe(self) -> str:
        return f"{self.name} ({self.workers} worker{'s' if self.workers != 1 else ''})"

    def close(self) -> None:
        """Release what the backend started (a no-op for the local ones: their pools live for one run)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class InProcessBackend(Backend):
    """No parallelism: the tasks in order, in this process (the default)."""

    name = "in-process"

    def run(self, fn: Task, tasks: Sequence[Any], shared: Any = None) -> Iterator[tuple[int, Any]]:
        for i, task in enumerate(tasks):
            yield i, fn(shared, task)


# ------------------------------------------------------------------------------------------ process pool
_WORKER_SHARED: Any = None


def _init_worker(threads: int, shared: Any) -> None:
    """Pool initializer: torch threads for this worker, and the shared payload (received once)."""
    global _WORKER_SHARED
    import torch

    torch.set_num_threads(threads)
    _WORKER_SHARED = shared


def _pool_call(fn: Task, task: Any) -> Any:
    return _guarded(fn, _WORKER_SHARED, task)


# ------------------------------------------------------------------------------------------ start method
def _guarded_lines(path: str) -> list[tuple[int, int]]:
    """Line ranges of the top-level ``if __name__ == "__main__":`` blocks of a script (none if unreadable)."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return []
    ranges = []
    for node in tree.body:
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test):
            ranges.append((node.lineno, node.end_lineno or node.lineno))
    return ranges


def main_reruns_in_workers() -> bool:
    """True when this call comes from the top-level code of the ``__main__`` script outside its
    ``if __name__ == "__main__":`` block (a plain script). A spawned worker re-imports ``__main__`` to find
    what the parent defined there, which would run that code again in every worker (a compile, then a nested
    pool, which Python refuses with "An attempt has been made to start a new process before the current
    process has finished its bootstrapping phase")."""
    main = sys.modules.get("__main__")
    if main is None:
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals is main.__dict__ and frame.f_code.co_name == "<module>":
            line = frame.f_lineno
            return not any(first <= line <= last for first, last in _guarded_lines(frame.f_code.co_filename))
        frame = frame.f_back
    return False


class _SpawnWithoutMainProcess(multiprocessing.context.SpawnProcess):
    """A spawned process that does not re-import the parent's ``__main__`` (see :func:`main_reruns_in_workers`).

    cimc's tasks and payloads live in cimc's own modules, so the worker never needs the script. While the
    process is created ``__main__`` is an empty module: the child is told of no main module to import, and a
    payload that does need the script (a metric class defined in it) fails to pickle here, in the parent, with
    a one-line error instead of a hang.
    """

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        saved = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            return multiprocessing.context.SpawnProcess._Popen(process_obj)
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise InputError(f"worker processes cannot receive what this script defines itself ({exc}); put the "
                             "script's code under 'if __name__ == \"__main__\":', or move the definition into a "
                             "module of its own") from None
        finally:
            sys.modules["__main__"] = saved


class _SpawnWithoutMainContext(multiprocessing.context.SpawnContext):
    Process = _SpawnWithoutMainProcess  # type: ignore[assignment]


def worker_context() -> multiprocessing.context.BaseContext:
    """The start method of the local pool: spawn (a fresh interpreter: no inherited torch/OpenMP thread pool,
    which a forked child can deadlock on), without re-importing a plain script's ``__main__``."""
    if main_reruns_in_workers():
        logger.debug("called from a script's top level: workers will not re-import __main__")
        return _SpawnWithoutMainContext()
    return multiprocessing.get_context("spawn")


class LocalBackend(Backend):
    """An embedded process pool of ``workers`` spawned processes, ``threads`` torch threads each."""

    name = "local"

    def __init__(self, workers: int, threads: int | None = None):
        if isinstance(workers, bool) or int(workers) != workers or workers < 1:
            raise InputError(f"--workers {workers!r} is invalid; give a whole number of processes >= 1")
        self.workers = int(workers)
        self.threads = threads or max(1, available_cores() // self.workers)

    def describe(self) -> str:
        return f"local process pool ({self.workers} worker{'s' if self.workers != 1 else ''} x {self.threads} thread(s))"

    def run(self, fn: Task, tasks: Sequence[Any], shared: Any = None) -> Iterator[tuple[int, Any]]:
        if not tasks:
            return
        # spawn, not fork: a forked child inherits torch's initialised OpenMP pool and this process' threads.
        # The environment is read when each child starts: OpenMP must not spin-wait in workers that share cores.
        context = worker_context()
        previous = os.environ.get("OMP_WAIT_POLICY")
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        try:
            pool = ProcessPoolExecutor(max_workers=min(self.workers, len(tasks)), mp_context=context,
                                       initializer=_init_worker, initargs=(self.threads, shared))
            try:
                futures = {pool.submit(_pool_call, fn, task): i for i, task in enumerate(tasks)}
            except BaseException:  # a payload the workers cannot receive: no pool left behind
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        finally:
            if previous is None:
                os.environ.pop("OMP_WAIT_POLICY", None)
            else:
                os.environ["OMP_WAIT_POLICY"] = previous
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=futures.__getitem__):
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        raise CimcError("a worker process died (killed, or out of memory); rerun the same command: "
                                        "a sweep resumes from the points already finished") from None
                    yield futures[future], _unwrap(result)
        finally:
            for future in futures:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------ Ray
def _ray_call(fn: Task, shared: Any, task: Any, threads: int) -> Any:
    import torch

    torch.set_num_threads(threads)
    return _guarded(fn, shared, task)


class RayBackend(Backend):
    """Ray tasks, one CPU each. ``address``: ``"auto"`` (join a running local Ray or start one) or a cluster
    address (``ray://host:10001`` or ``host:6379``). An already initialised Ray session is used as it is (and
    left running); one this backend started is shut down by :meth:`close`."""

    name = "ray"

    def __init__(self, address: str = "auto", max_retries: int = RAY_MAX_RETRIES):
        try:
            import ray
        except ImportError:
            raise InputError("--ray needs Ray: pip install \"cimc[ray]\" (or use --workers N for a local pool)") from None
        self._ray = ray
        self.max_retries = max_retries
        self._started = False
        if not ray.is_initialized():
            try:
                # Job-wide worker environment: OpenMP threads sleep instead of spinning when they wait.
                env = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
                if address == "auto":
                    # Joins the local cluster 'ray start' left running, else starts one for this process.
                    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, runtime_env=env)
                else:
                    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                             runtime_env=env)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise InputError(f"cannot join Ray at {address!r} ({first}); start it with 'ray start --head' "
                                 "or use --ray auto") from None
            self._started = True
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))

    def describe(self) -> str:
        return f"Ray ({self.workers} CPU(s))"

    def run(self, fn: Task, tasks: Sequence[Any], shared: Any = None) -> Iterator[tuple[int, Any]]:
        ray = self._ray
        if not tasks:
            return
        remote = ray.remote(_ray_call).options(num_cpus=1, max_retries=self.max_retries)
        shared_ref = ray.put(shared)  # once into the object store; each node fetches it once
        refs = {remote.remote(fn, shared_ref, task, 1): i for i, task in enumerate(tasks)}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    yield refs[ref], _unwrap(ray.get(ref))
        finally:
            for ref in pending:
                ray.cancel(ref)

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


def get_backend(workers: int | None = None, ray: str | None = None) -> Backend:
    """The backend the options ask for: ``ray`` (an address or ``"auto"``), else ``workers`` processes,
    else in-process."""
    if ray is not None and workers is not None:
        raise InputError("give either --workers N (local processes) or --ray ADDRESS|auto, not both")
    if ray is not None:
        if not str(ray).strip():
            raise InputError("--ray needs 'auto' or a cluster address such as ray://head:10001")
        return RayBackend(str(ray).strip())
    if workers is not None:
        return LocalBackend(workers)
    return InProcessBackend()

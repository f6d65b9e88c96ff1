"""Worker threads for chunked codec work, and how many of them a call gets.

Why threads and not processes: the work that splits (zstd on one chunk's planes, numpy on that
chunk's arrays) runs in C with the GIL released, so threads scale with cores without copying
tensors between processes. Why one shared pool per thread count: a model has hundreds of
tensors, and starting a pool for each of them would cost about as much as coding a small one.

The number of threads never changes what is written: codecs cut their work at boundaries fixed
by the format, and only the order in which chunks finish depends on it.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, TypeVar

from mlcompress.errors import UsageError

T = TypeVar("T")
R = TypeVar("R")

_POOLS: dict[int, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def default_threads() -> int:
    """All cores (``os.cpu_count()``): what every call uses unless told otherwise."""
    return os.cpu_count() or 1


def resolve_threads(threads: Any) -> int:
    """``threads`` as a positive int; ``None`` means :func:`default_threads`."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(f"threads must be a positive integer, got {threads!r}")
    return threads


def pool(threads: int) -> ThreadPoolExecutor:
    """The shared pool of ``threads`` workers (started on first use, kept for the process)."""
    with _LOCK:
        executor = _POOLS.get(threads)
        if executor is None:
            executor = _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix=f"mlcompress-{threads}")
        return executor


def submit(threads: int, fn: Callable[..., R], *args: Any) -> Future[R]:
    """Run ``fn(*args)`` on the shared pool of ``threads`` workers."""
    return pool(threads).submit(fn, *args)


def map_ordered(fn: Callable[[T], R], items: Iterable[T], threads: int) -> list[R]:
    """``[fn(x) for x in items]``, on ``threads`` workers when there is more than one item.

    Results keep the order of ``items`` whatever order they finish in; the first exception
    raised by ``fn`` is re-raised here (the remaining items are still waited for, so no work is
    left running on the caller's buffers).
    """
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    futures = [pool(threads).submit(fn, x) for x in items]
    error: BaseException | None = None
    results: list[R] = []
    for future in futures:
        try:
            results.append(future.result())
        except BaseException as exc:  # noqa: BLE001 -- re-raised below, after the others finished
            if error is None:
                error = exc
    if error is not None:
        raise error
    return results

"""Worker threads for chunked codec work, and how many of them a call gets.

Why threads and not processes: the work that splits (zstd on one chunk's planes, numpy on that
chunk's arrays) runs in C with the GIL released, so threads scale with cores without copying
tensors between processes. Why one shared pool per thread count: a model has hundreds of
tensors, and starting a pool for each of them would cost about as much as coding a small one.

The number of threads never changes what is written: codecs cut their work at boundaries fixed
by the format, and only the order in which chunks finish depends on it.

A call that uses ``threads`` threads is the calling thread plus ``threads - 1`` helpers.
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


def _helpers(threads: int) -> ThreadPoolExecutor:
    """The shared pool that helps a caller using ``threads`` threads: ``threads - 1`` workers,
    since the caller works too (started on first use, kept for the process)."""
    with _LOCK:
        executor = _POOLS.get(threads)
        if executor is None:
            executor = _POOLS[threads] = ThreadPoolExecutor(threads - 1, thread_name_prefix=f"mlcompress-{threads}")
        return executor


def submit(threads: int, fn: Callable[..., R], *args: Any) -> Future[R]:
    """Run ``fn(*args)`` on a helper of a caller that uses ``threads`` (at least 2) threads; a
    :func:`map_ordered` with the same count started afterwards has it join once it is done."""
    return _helpers(threads).submit(fn, *args)


def map_ordered(fn: Callable[[T], R], items: Iterable[T], threads: int) -> list[R]:
    """``[fn(x) for x in items]`` on ``threads`` threads: the caller and ``threads - 1`` helpers
    take the next item as they become free.

    Why the caller works too: a tensor of two or three chunks would otherwise wait for a pool
    thread to wake up for each of them, which on the machines measured cost more than it saved.
    Results keep the order of ``items``; once an item fails no new ones start, and the error
    of the first failed item is raised after every started item has finished (so no work is
    left running on the caller's buffers).
    """
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    results: list[Any] = [None] * len(items)
    errors: dict[int, BaseException] = {}
    order = iter(range(len(items)))
    lock = threading.Lock()

    def drain() -> None:
        while True:
            with lock:
                index = None if errors else next(order, None)
            if index is None:
                return
            try:
                results[index] = fn(items[index])
            except BaseException as exc:  # noqa: BLE001 -- re-raised by the caller below
                with lock:
                    errors[index] = exc

    helpers = [_helpers(threads).submit(drain) for _ in range(min(threads, len(items)) - 1)]
    drain()
    for helper in helpers:
        helper.result()
    if errors:
        raise errors[min(errors)]
    return results

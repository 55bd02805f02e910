"""Blocks of numpy work spread over the CPU's cores by one shared thread pool.

numpy releases the GIL while it gathers, converts and sums, so threads run blocks side by side.
FAISS calls made inside a block run on one OpenMP thread (OpenMP's thread count belongs to the
calling thread), so that two blocks calling FAISS do not each start a team on every core.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

_lock = threading.Lock()
_pool: list[ThreadPoolExecutor] = []


def cores() -> int:
    """Cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def each(fn: Callable[[int], None], starts: range) -> None:
    """fn(start) for every start, one block per core; returns when all are done (re-raises).

    fn must not call `each` itself: the pool's threads would wait on each other.
    """
    if len(starts) < 2:
        for start in starts:
            fn(start)
        return
    with _lock:
        if not _pool:
            _pool.append(ThreadPoolExecutor(cores(), "simsearch-block"))
    for future in [_pool[0].submit(_one_openmp_thread, fn, start) for start in starts]:
        future.result()


def _one_openmp_thread(fn: Callable[[int], None], start: int) -> None:
    faiss = sys.modules.get("faiss")
    if faiss is not None:
        faiss.omp_set_num_threads(1)
    fn(start)

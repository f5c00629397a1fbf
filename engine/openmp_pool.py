"""Keep the engine loop's OpenMP team the only one in the process (CPU speed).

torch's CPU ops run on OpenMP (libgomp in torch's wheels), and every thread that runs a
parallel op gets a worker team of its own that lives as long as that thread. libgomp lets
its workers spin between parallel regions, which is what makes a decode step's ~200 small
matmuls fast, but only while it manages no more threads than there are CPUs: beyond that
it parks them on a futex after ~100 spins, and each of those ops pays a wake-up.

The engine loads the model on the caller's thread (a team there) and decodes on its loop
thread (a second team): on a 2-core box that is 4 managed threads for 2 CPUs, and decode
ran at half speed (SmolLM2-135M, GGUF Q4_1, batch 1: 45 tok/s on the loop thread, 88 tok/s
on the loading thread). ``release_calling_thread_pool`` ends the calling thread's team
(OpenMP 5's ``omp_pause_resource_all``; it comes back by itself if that thread runs a
parallel op again), so the loop's team spins as it should.
"""

from __future__ import annotations

import ctypes
import logging
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep the settings


@cache
def _torch_openmp() -> ctypes.CDLL | None:
    """torch's own libgomp (already loaded with torch), or None where torch has none."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    for library in sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*")):
        try:
            lib = ctypes.CDLL(str(library))
        except OSError:
            continue
        if hasattr(lib, "omp_pause_resource_all"):
            return lib
    return None


def release_calling_thread_pool() -> bool:
    """End the calling thread's OpenMP worker team; True if one could be released.

    Call it on a thread that has finished its CPU work (the one that built the engine);
    harmless where torch uses another threading library or no team exists."""
    lib = _torch_openmp()
    if lib is None:
        return False
    released = lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0
    if not released:
        log.debug("omp_pause_resource_all refused (called inside a parallel region?)")
    return released

"""Keep freed frame-sized memory in the process instead of handing it back to the kernel.

glibc serves large allocations (a 4-megapixel frame is 9-18 MB) with a fresh ``mmap`` and
returns them with ``munmap`` on free, so every frame's arrays page-fault their memory
afresh: at 4 Mpx a new float32 array cost ~35 ms where a reused one cost ~5 ms
(benchmarks/detector_scale.py measures the daemon with it). Raising the mmap and trim
thresholds makes freed frames go back to the heap, where the next frame finds them. Peak
memory is unchanged (it is bounded by the queue); only its return to the OS is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
HEAP_LIMIT = 1 << 30  # allocations up to 1 GiB come from the heap (glibc's maximum is 32 MiB
# on its own: mallopt lifts it)


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed large blocks for reuse; False (logged) where the C library
    is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        done = libc.mallopt(M_MMAP_THRESHOLD, HEAP_LIMIT) == 1 and \
            libc.mallopt(M_TRIM_THRESHOLD, 2 * HEAP_LIMIT) == 1
    except (OSError, AttributeError):
        done = False
    if not done:
        log.info("the C library's allocator was left as it is (not glibc?)")
    return done

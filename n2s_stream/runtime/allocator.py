"""Keep freed frame-sized memory in the process instead of handing it back to the kernel.

glibc serves large allocations (a 4-megapixel frame is 9-18 MB, a UNet activation of it
290 MB) with a fresh ``mmap`` and returns them with ``munmap`` on free, so every frame's
arrays page-fault their memory afresh: at 4 Mpx a new float32 array cost ~35 ms where a
reused one cost ~5 ms, and the default network's forward pass took 2.3 s in a worker
thread against 1.3 s with its memory reused. Raising the mmap and trim thresholds makes
freed blocks go back to the heap, where the next frame finds them; one arena for all
threads is needed too, since a thread's own arena cannot hold a block over 64 MB and
mmaps it anyway. Peak memory is unchanged (it is bounded by the queue and the network);
only its return to the OS is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
HEAP_LIMIT = 1 << 30  # allocations up to 1 GiB come from the heap (glibc's maximum is 32 MiB
# on its own: mallopt lifts it)


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed large blocks for reuse, in one arena; call it before the
    worker threads start. False (logged) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        done = (
            libc.mallopt(M_MMAP_THRESHOLD, HEAP_LIMIT) == 1
            and libc.mallopt(M_TRIM_THRESHOLD, 2 * HEAP_LIMIT) == 1
            and libc.mallopt(M_ARENA_MAX, 1) == 1
        )
    except (OSError, AttributeError):
        done = False
    if not done:
        log.info("the C library's allocator was left as it is (not glibc?)")
    return done

"""Run ``n2s-stream`` with its memory traced, to tell a leak from allocator fragmentation.

Used by ``soak.py --trace``: ``python benchmarks/traced_daemon.py <n2s-stream args>``. A
thread appends one JSON line every ``TRACED_DAEMON_EVERY`` seconds (default 30) to the file
named by ``TRACED_DAEMON_OUT``:

- ``python_mib``: memory Python objects hold (tracemalloc), and ``growth``: the source
  lines whose allocations grew most since the first sample;
- ``malloc_in_use_mib`` / ``malloc_free_mib`` / ``mmap_mib``: glibc's own account
  (``mallinfo2``) of bytes handed out, bytes held but free (fragmentation), and large
  blocks mapped directly; native allocations (torch, HDF5, ZeroMQ) show here only;
- ``objects``: live objects of the most common types (``gc``).

RSS rising with ``malloc_in_use`` flat and ``malloc_free`` rising is fragmentation;
``python_mib`` or ``objects`` rising is a leak in our code, and ``growth`` names the line.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import json
import os
import sys
import threading
import time
import tracemalloc

from n2s_stream.cli import main

MIB = 1024 * 1024


class MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc >= 2.33), every field a ``size_t``."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_figures() -> dict[str, float]:
    """glibc's heap in use, free-but-held and mmapped, in MiB; empty where not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return {}
    info = libc.mallinfo2()
    return {
        "malloc_in_use_mib": info.uordblks / MIB,
        "malloc_free_mib": info.fordblks / MIB,
        "mmap_mib": info.hblkhd / MIB,
    }


def object_counts(top: int = 12) -> dict[str, int]:
    """Live objects tracked by the garbage collector, by type name, the most common first."""
    counts = collections.Counter(type(o).__name__ for o in gc.get_objects())
    return dict(counts.most_common(top))


def sample_forever(path: str, every: float) -> None:
    """Append one memory sample per ``every`` seconds to ``path``; runs in a daemon thread."""
    started = time.monotonic()
    baseline = None
    while True:
        time.sleep(every)
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        baseline = baseline or snapshot
        growth = snapshot.compare_to(baseline, "lineno")[:8]
        record = {
            "t": time.monotonic() - started,
            "python_mib": tracemalloc.get_traced_memory()[0] / MIB,
            **malloc_figures(),
            "objects": object_counts(),
            "growth": [
                {
                    "where": str(stat.traceback[0]),
                    "kib": stat.size_diff / 1024,
                    "count": stat.count_diff,
                }
                for stat in growth
            ],
        }
        with open(path, "a") as out:
            out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    tracemalloc.start(1)
    threading.Thread(
        target=sample_forever,
        daemon=True,
        name="memory-trace",
        args=(os.environ["TRACED_DAEMON_OUT"], float(os.environ.get("TRACED_DAEMON_EVERY", "30"))),
    ).start()
    sys.exit(main(sys.argv[1:]))

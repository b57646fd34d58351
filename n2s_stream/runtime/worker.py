"""The background-thread shape every stage of the daemon shares."""

from __future__ import annotations

import faulthandler
import logging
import signal
import threading
import time

log = logging.getLogger(__name__)


class BackgroundWorker:
    """One named thread running ``_run`` until ``stop()``: the sources, the inference loop,
    the trainer, the refiner, the checkpoint follower and the Tiled registrar each subclass
    it and loop while ``self._stopping`` is unset.

    An exception that escapes ``_run`` is logged with its traceback and kept in
    ``error``; the thread is then dead, and ``alive`` (``n2s_worker_up``) says so."""

    def __init__(self, name: str, *, join_timeout: float = 30.0) -> None:
        self.name = name
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        # daemon: a thread stuck in a call that never returns (a hung file system) must not
        # keep the process from exiting once the stop bound has passed
        self._thread = threading.Thread(target=self._guarded_run, name=name, daemon=True)
        self._join_timeout = join_timeout

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    @property
    def alive(self) -> bool:
        """True while the thread runs (the systemd watchdog is fed only while all the
        required ones are)."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """Ask the thread to finish and wait for it (at most ``join_timeout``)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._join_timeout)
            if self._thread.is_alive():
                log.error(
                    "%s did not stop within %.0f s; leaving it behind",
                    self.name,
                    self._join_timeout,
                )

    def _guarded_run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc
            log.exception("%s died: %s", self.name, exc)

    def _run(self) -> None:
        raise NotImplementedError


def unfinished_threads(timeout: float) -> list[str]:
    """Wait at most ``timeout`` seconds for the process's other non-daemon threads (thread
    pools' workers) to end; the names of those still running.

    Python waits for every non-daemon thread before a process exits, so one pool worker
    blocked for good would keep a stopped daemon alive past any bound; the caller exits
    regardless once this names one."""
    deadline = time.monotonic() + timeout
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
    return [
        t.name for t in threading.enumerate() if t is not current and not t.daemon and t.is_alive()
    ]


def dump_stacks_on(signum: int) -> None:
    """Write every thread's stack to stderr (the journal) when ``signum`` arrives, so an
    operator can see where a daemon that seems stuck is (``kill -USR1 PID``). Call it from
    the main thread: the dump runs there, between bytecodes and holding the GIL, so the
    other threads' stacks are read while they stand still (a lock wait or a sleep there
    is interrupted for it)."""

    def dump(_signum: int, _frame: object) -> None:
        faulthandler.dump_traceback(all_threads=True)

    signal.signal(signum, dump)

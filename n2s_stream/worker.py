"""The background-thread shape every stage of the daemon shares."""

from __future__ import annotations

import threading


class BackgroundWorker:
    """One named thread running ``_run`` until ``stop()``: sources, trainer, checkpoint
    follower and inference each subclass it and loop while ``self._stopping`` is unset."""

    def __init__(self, name: str, *, join_timeout: float = 30.0) -> None:
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name)
        self._join_timeout = join_timeout

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    @property
    def alive(self) -> bool:
        """True while the thread runs (the systemd watchdog is fed only while all are)."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """Ask the thread to finish and wait for it (at most ``join_timeout``)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._join_timeout)

    def _run(self) -> None:
        raise NotImplementedError

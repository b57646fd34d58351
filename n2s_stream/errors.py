"""The few error types n2s-stream raises on purpose.

Everything the program reports to a user as a one-line reason derives from `N2SError`;
anything else reaching the command line is a bug and is shown with its traceback.
"""

from __future__ import annotations


class N2SError(Exception):
    """Root of all deliberate n2s-stream errors; its message is one line for a user."""


class UsageError(N2SError):
    """A bad command line or config value; the CLI exits with status 2."""


class InputError(N2SError):
    """An input file or frame that cannot be used; the message names it and the reason.

    `reason` is a short machine-friendly label (e.g. ``no_dataset``) used as the
    ``reason`` label of ``n2s_frames_rejected_total`` by the daemon.
    """

    def __init__(self, message: str, *, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class CheckpointError(N2SError):
    """A checkpoint that cannot be loaded or does not fit the requested model."""


class OutputError(N2SError):
    """An existing output file that cannot be read or reopened to resume its series; the
    daemon refuses that series' frames (``output_unreadable``) and serves the others."""

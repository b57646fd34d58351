"""What the benchmark scripts share: where results go, how to start n2s-stream, a port."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
N2S = [sys.executable, "-m", "n2s_stream"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

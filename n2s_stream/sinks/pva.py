"""The denoised frames served as an NTNDArray PV, so a control-room viewer (Phoebus,
ImageJ's EPICS plugin, C2DataViewer, pvapy) only changes the PV name.

Each frame goes out as NDPluginPva would publish it: float32 (detector units), the source
frame's ``uniqueId`` (its number in the series from 1 where the source has none),
``dataTimeStamp`` and NDAttributes, plus ``N2SModelVersion`` and ``N2SDenoiser`` (0 the
network, 1 the classical cold start), optionally compressed. The server binds loopback
unless the ``EPICS_PVAS_*`` variables say otherwise. Posting never waits for a viewer:
PVAccess keeps a queue per subscriber and drops updates for one that falls behind.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from n2s_stream.errors import UsageError
from n2s_stream.formats.ntndarray import encode
from n2s_stream.sinks import SinkContext
from n2s_stream.stages import Frame, FrameMeta, SeriesEnd, SeriesStart

log = logging.getLogger(__name__)

LOOPBACK = {
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
}
"""Server settings used where the environment sets none: serve this host only."""


def loopback_client_env(server_port: int, broadcast_port: int) -> dict[str, str]:
    """EPICS client settings that find PVs only at the name server on 127.0.0.1
    ``server_port`` (UDP search between processes on one host is fragile): the demo's,
    the benchmarks' and the tests' daemons and clients."""
    return {
        "EPICS_PVA_NAME_SERVERS": f"127.0.0.1:{server_port}",
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_ADDR_LIST": "",
        "EPICS_PVA_BROADCAST_PORT": str(broadcast_port),
    }


def loopback_server_env(port: int, broadcast_port: int) -> dict[str, str]:
    """EPICS server settings: 127.0.0.1, TCP ``port``, no beacons beyond this host."""
    return {
        "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_PVAS_SERVER_PORT": str(port),
        "EPICS_PVAS_BROADCAST_PORT": str(broadcast_port),
        "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_PVAS_BEACON_ADDR_LIST": "",
    }


def server_conf(environ: dict[str, str]) -> dict[str, str]:
    """The loopback defaults that ``environ`` does not override."""
    if "EPICS_PVAS_INTF_ADDR_LIST" in environ:
        return {}
    return {key: value for key, value in LOOPBACK.items() if key not in environ}


class PvaServeSink:
    """Serves each denoised frame on one NTNDArray PV."""

    name = "pva_serve"
    required = False

    def __init__(self, pv: str, codec: str = "none") -> None:
        try:
            import p4p.server.thread  # noqa: F401  (what start() needs, checked when built)
        except ImportError as exc:
            raise UsageError(
                "--pva-serve needs the optional extra: pip install 'n2s-stream[pva]'"
            ) from exc
        self.pv, self.codec = pv, codec
        self._shared: Any = None
        self._server: Any = None

    def start(self) -> None:
        """Bind the PVAccess server (loopback unless ``EPICS_PVAS_INTF_ADDR_LIST`` says
        otherwise)."""
        from p4p.server import Server
        from p4p.server.thread import SharedPV

        conf = server_conf(dict(os.environ))
        self._shared = SharedPV()  # no value (clients wait) until the first frame
        self._server = Server(providers=[{self.pv: self._shared}], conf=conf or None, useenv=True)
        log.info(
            "serving denoised frames as PV %s (codec %s; %s)",
            self.pv,
            self.codec,
            "loopback" if conf else "interfaces from EPICS_PVAS_INTF_ADDR_LIST",
        )

    @classmethod
    def from_context(cls, context: SinkContext) -> PvaServeSink:
        """Served as ``pva_serve`` says."""
        options = context.config.pva
        assert options.serve is not None
        return cls(options.serve, options.serve_codec)

    def open_series(self, start: SeriesStart) -> None:
        """Nothing to announce: viewers follow ``uniqueId``."""

    def write(self, frame: Frame, denoised: np.ndarray, meta: FrameMeta) -> None:
        """Publish one denoised frame (viewers too slow for it miss it)."""
        attributes: dict[str, float | int | str] = {
            **frame.attributes,
            "N2SModelVersion": meta.version,
            "N2SDenoiser": meta.denoiser,
        }
        value = encode(
            denoised.astype(np.float32, copy=False),
            frame.index + 1 if frame.source_id is None else frame.source_id,
            timestamp=frame.t_source or frame.received_at,
            codec=self.codec,
            attributes=attributes,
        )
        if self._shared.isOpen():
            self._shared.post(value)
        else:
            self._shared.open(value)

    def end_series(self, end: SeriesEnd) -> None:
        """The PV keeps showing the series' last frame, as NDPluginPva does."""

    def close(self) -> None:
        """Disconnect the viewers and stop serving (nothing to stop if never started)."""
        if self._shared is not None:
            self._shared.close()
        if self._server is not None:
            self._server.stop()
            self._server = None

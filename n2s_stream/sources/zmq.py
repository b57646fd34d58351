"""Follow a ZeroMQ detector feed (PULL from a PUSH, or SUB to a PUB).

The socket connects, so ZeroMQ reconnects by itself when the detector restarts. Each
message's header is read by the protocol's decoder (`formats/protocols.py`) on the
receiving thread; its pixels are decoded (decompressed) by a pool of ``decode_threads``
while the next messages come in, at most a few frames ahead. Frames go downstream in the
order they came, with backpressure (a full queue stops us reading, and the detector's send
high-water mark then holds frames on its side); undecodable messages are counted under
their reason, in that order too.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from n2s_stream.config import DaemonConfig, ZmqOptions
from n2s_stream.errors import UsageError
from n2s_stream.formats.codecs import MessageError
from n2s_stream.formats.protocols import End, Image, Payload, make_decoder
from n2s_stream.formats.writer import series_output
from n2s_stream.runtime.worker import BackgroundWorker
from n2s_stream.sources import Emit, Reject, SourceContext
from n2s_stream.stages import Frame, SeriesEnd

log = logging.getLogger(__name__)

SOCKET_TYPES = {"pull": zmq.PULL, "sub": zmq.SUB}
HARD_LIMIT_FACTOR = 4
"""ZeroMQ itself cuts off a peer sending more than this times ``max_message_mb`` at once:
such a message never reaches us, so it cannot be counted, only the disconnect logged."""


class ZmqSource(BackgroundWorker):
    """Emits the frames of a ZeroMQ feed; one output file per series."""

    def __init__(
        self,
        options: ZmqOptions,
        *,
        out_root: Path,
        emit: Emit,
        reject: Reject,
        headers: MutableMapping[str, np.ndarray | None] | None = None,
        dropped: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__("zmq-source")
        if options.endpoint is None:
            raise UsageError("the ZeroMQ source needs --zmq ENDPOINT")
        self.config = config = options
        self.endpoint: str = options.endpoint
        self.out_root = out_root
        self._decoder = make_decoder(config.protocol, headers)
        self._emit, self._reject = emit, reject
        self._dropped = dropped or (lambda output: None)
        self._tee_dropping = False
        self._frames_in: dict[str, int] = {}
        self._max_bytes = config.max_message_mb << 20
        self._context = zmq.Context()  # no thread until a socket is made: start() makes them
        self._socket: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._tee: zmq.Socket | None = None
        self._decoders: ThreadPoolExecutor | None = None  # started by start()
        # decoded or decoding, in arrival order: (frame or end, when it arrived)
        self._in_hand: deque[tuple[Future[Image] | End, float]] = deque()

    @classmethod
    def from_config(cls, config: DaemonConfig, context: SourceContext) -> ZmqSource:
        """The source ``--zmq`` selects."""
        return cls(
            config.zmq,
            out_root=config.output.out,
            emit=context.emit,
            reject=context.reject,
            headers=context.headers,
            dropped=context.dropped,
        )

    def start(self) -> None:
        """Bind the tee (if asked for), connect and start reading."""
        self._socket = self._context.socket(SOCKET_TYPES[self.config.socket])
        self._socket.setsockopt(zmq.RCVHWM, self.config.hwm)
        self._socket.setsockopt(zmq.MAXMSGSIZE, HARD_LIMIT_FACTOR * self._max_bytes)
        self._socket.setsockopt(zmq.LINGER, 0)
        if self.config.socket == "sub":
            self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        if self.config.tee:
            # The facility's own writer PULLs here and gets every message, untouched: a
            # second PULL client on the detector would take half of the frames instead.
            # It never blocks the daemon: a writer that is down or slow loses messages
            # (counted in n2s_output_dropped_total{output="zmq_tee"}), the daemon none.
            self._tee = self._context.socket(zmq.PUSH)
            self._tee.setsockopt(zmq.SNDHWM, self.config.hwm)
            self._tee.setsockopt(zmq.LINGER, 1000)  # at stop: 1 s to deliver what is queued
            self._tee.bind(self.config.tee)
        self._decoders = ThreadPoolExecutor(self.config.decode_threads, thread_name_prefix="decode")
        self._socket.connect(self.endpoint)
        log.info(
            "following %s (%s, %s)", self.endpoint, self.config.protocol, self.config.socket.upper()
        )
        super().start()

    def stop(self) -> None:
        """Stop reading; what the socket still holds is the detector's to resend."""
        super().stop()
        if self._decoders is not None:
            # never wait for a decode that does not return: the CLI bounds the exit
            self._decoders.shutdown(wait=not self.alive, cancel_futures=True)
        if self._socket is not None:  # else never started
            self._socket.disable_monitor()
        for opened in (self._monitor, self._socket, self._tee):
            if opened is not None:
                opened.close()
        self._context.term()

    def _run(self) -> None:
        socket, monitor = self._socket, self._monitor
        assert socket is not None and monitor is not None, "start() makes the sockets"
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        while not self._stopping.is_set():
            ready = dict(poller.poll(0 if self._in_hand else 100))
            if monitor in ready:
                self._log_disconnect(monitor)
            if socket not in ready:
                if not self._hand_on(wait=True):  # nothing new: finish what is in hand
                    return
                continue
            parts = socket.recv_multipart()
            received = time.time()
            if self._tee is not None:
                self._forward_to_tee(parts)
            size = sum(len(part) for part in parts)
            if size > self._max_bytes:
                self._reject(
                    "too_large",
                    f"{self.endpoint}: message of {size} bytes "
                    f"exceeds zmq_max_message_mb ({self.config.max_message_mb} MiB)",
                )
                continue
            try:
                events = self._decoder.parse(parts)
            except Exception as exc:  # a decoder bug must not stop the feed either
                self._refuse(exc)
                continue
            assert self._decoders is not None
            for event in events:
                decoding = (
                    self._decoders.submit(event.decode) if isinstance(event, Payload) else event
                )
                self._in_hand.append((decoding, received))
            if not self._hand_on(wait=False):
                return

    def _hand_on(self, *, wait: bool) -> bool:
        """Pass on, in order, what is decoded; with ``wait``, or when more than a few
        frames are in hand, wait for the oldest. False once downstream is stopping."""
        limit = 2 * self.config.decode_threads
        while self._in_hand:
            decoding, received = self._in_hand[0]
            pending = isinstance(decoding, Future) and not decoding.done()
            if pending and not wait and len(self._in_hand) <= limit:
                return True
            self._in_hand.popleft()
            if isinstance(decoding, End):
                event: Image | End = decoding
            else:
                try:
                    event = decoding.result()
                except Exception as exc:
                    self._refuse(exc)
                    continue
            if not self._forward(event, received):
                return False
        return True

    def _refuse(self, exc: Exception) -> None:
        """Count a message or frame that cannot be used under its reason; anything but a
        `MessageError` is a decoder bug met by odd input (``internal_error``, logged with
        its traceback), and the feed goes on."""
        if isinstance(exc, MessageError):
            self._reject(exc.reason, f"{self.endpoint}: {exc}")
            return
        log.exception("decoding a message failed")
        self._reject("internal_error", f"{self.endpoint}: {exc}")

    def _forward_to_tee(self, parts: list[bytes]) -> None:
        """Pass a raw message on, or count it when the tee's reader cannot take it now."""
        assert self._tee is not None
        try:
            self._tee.send_multipart(parts, zmq.NOBLOCK)
        except zmq.Again:
            self._dropped("zmq_tee")
            if not self._tee_dropping:
                log.warning(
                    "%s: nobody takes the tee's messages (reader down or slow): "
                    "dropping them, counted in n2s_output_dropped_total",
                    self.config.tee,
                )
            self._tee_dropping = True
            return
        if self._tee_dropping:
            log.info("%s: the tee's reader takes messages again", self.config.tee)
            self._tee_dropping = False

    def _log_disconnect(self, monitor: zmq.Socket) -> None:
        event = recv_monitor_message(monitor)
        log.warning(
            "%s: detector disconnected (it stopped, or sent a message over %d MiB, "
            "which ZeroMQ refuses); reconnecting",
            self.endpoint,
            HARD_LIMIT_FACTOR * self.config.max_message_mb,
        )
        log.debug("monitor event %s", event)

    def _output(self, series: str) -> Path:
        return series_output(self.out_root, series)

    def _forward(self, event: Image | End, received: float) -> bool:
        if isinstance(event, End):
            n = self._frames_in.pop(event.series, 0)
            log.info(
                "series %s ended after %d frames (%s sent)",
                event.series,
                n,
                "?" if event.total is None else event.total,
            )
            if event.total is None:
                return self._emit(SeriesEnd(event.series, n, self._output(event.series)))
            return self._emit(
                SeriesEnd(event.series, event.total, self._output(event.series), sender_count=True)
            )
        if event.series not in self._frames_in:
            log.info("series %s started", event.series)
        self._frames_in[event.series] = self._frames_in.get(event.series, 0) + 1
        return self._emit(
            Frame(
                event.series,
                event.index,
                event.data,
                received,
                self._output(event.series),
                event.pixel_mask,
            )
        )

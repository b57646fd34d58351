"""The streaming daemon: wires source → queue → inference/writer, buffer → trainer.

``Daemon.run()`` is startup, a loop that watches a stop flag (metrics, systemd pings),
then a shutdown that drains: the source stops reading, every queued frame is denoised
and written, the trainer saves a checkpoint, files are closed. Signal handlers only set
the flag; a second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from types import FrameType

import torch
from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
from torch import nn

from n2s_stream.buffer import RollingBuffer
from n2s_stream.checkpoint import load_checkpoint, save_checkpoint
from n2s_stream.coldstart import ColdStart
from n2s_stream.config import DaemonConfig, as_toml
from n2s_stream.errors import UsageError
from n2s_stream.frames import Frame, SeriesEnd
from n2s_stream.inference import DroppedFrames, InferenceSettings, InferenceWorker, Republisher
from n2s_stream.metrics import LatencyWindow, Metrics, MetricsServer
from n2s_stream.models import build_model
from n2s_stream.n2s.masking import Masker
from n2s_stream.onnx_engine import check_engine
from n2s_stream.preview import Preview, preview_app
from n2s_stream.service import Notifier
from n2s_stream.sources.directory import DirectoryConfig, DirectorySource
from n2s_stream.sources.zmq import ZmqConfig, ZmqSource
from n2s_stream.state import StateDir, newest_checkpoint
from n2s_stream.trainer import (
    CheckpointFollower,
    ModelStore,
    OnlineTrainConfig,
    OnlineTrainer,
    copy_state,
)
from n2s_stream.training import resolve_device
from n2s_stream.writer import OutputSet

log = logging.getLogger(__name__)


class Daemon:
    """One running n2s-stream service."""

    def __init__(self, config: DaemonConfig, *, registry: CollectorRegistry = REGISTRY) -> None:
        if (config.watch is None) == (config.zmq is None):
            raise UsageError("give either --watch DIR or --zmq ENDPOINT (the frames to follow)")
        self.config = config
        self.metrics = Metrics(registry)
        self.stop_requested = threading.Event()
        self.failure: BaseException | None = None
        self.notifier = Notifier()
        self._signals = 0
        self._frames: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self._dropped = DroppedFrames()  # drop_when_full: dropped frames are not also missing
        self.preview = Preview()

    # ---- wiring -------------------------------------------------------------------------
    def _start(self) -> None:
        config = self.config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        check_engine(config.engine, self.device)
        self.state = StateDir(config.state_dir, on_write_error=self.metrics.state_write_errors.inc)
        checkpoint = self.state.latest_checkpoint()
        if checkpoint is None and config.model_from is not None:
            checkpoint = newest_checkpoint(config.model_from / "checkpoints")
        if checkpoint is not None:
            log.info("resuming from %s (version %d, step %d)", checkpoint.path,
                     checkpoint.version, checkpoint.step)
        elif config.ckpt is not None:
            checkpoint = load_checkpoint(config.ckpt)
            log.info("starting from offline model %s (version %d)", config.ckpt,
                     checkpoint.version)
        self._checkpoint = checkpoint
        model_config = checkpoint.model_config if checkpoint else config.model_config()
        masker = Masker(checkpoint.masker_config if checkpoint else config.masker_config())
        self._model_config, self._masker = model_config, masker
        torch.manual_seed(config.seed)
        train_model = checkpoint.build_model(self.device) if checkpoint else build_model(
            model_config).to(self.device)
        version = checkpoint.version if checkpoint else 0
        self.store = ModelStore(copy_state(train_model), version)
        self.metrics.model_version.set(version)
        buffer = RollingBuffer(max_frames=config.buffer_frames,
                               max_bytes=config.buffer_mb * 2**20)
        val_buffer = RollingBuffer(max_frames=8, max_bytes=64 * 2**20)
        # Only a network that will train from scratch here starts cold; a fan-out worker
        # (model_from) has no trainer to measure it and waits for the trainer's weights.
        cold = (config.cold_start and checkpoint is None and config.model_from is None)
        self.cold_start = ColdStart(active=cold, on_change=self._cold_start_changed)
        self.worker = InferenceWorker(
            frames=self._frames, model=build_model(model_config).to(self.device),
            masker=masker, normalizer=checkpoint.normalizer if checkpoint else None,
            store=self.store, outputs=OutputSet(config_text=as_toml(config, "daemon")),
            buffer=buffer, val_buffer=val_buffer, metrics=self.metrics, state=self.state,
            device=self.device, on_fatal=self._fatal,
            republisher=Republisher(config.zmq_out) if config.zmq_out else None,
            cold_start=self.cold_start if cold else None, preview=self.preview,
            dropped=self._dropped,
            settings=InferenceSettings(jinv=config.jinv, max_batch=self._max_batch(),
                                       series_idle_close=config.series_idle_close,
                                       context_flush_seconds=config.context_flush_seconds,
                                       count_gaps=not config.shared_feed,
                                       compile=config.compile, engine=config.engine,
                                       onnx_reload_seconds=config.onnx_reload_seconds,
                                       min_free_mb=config.min_free_mb,
                                       require_reconstructable=config.require_reconstructable,
                                       normalize=config.normalize,
                                       scale_integers=not config.no_scale_integers),
        )
        self.follower: CheckpointFollower | None = None
        if config.model_from is not None:
            self.follower = CheckpointFollower(config.model_from / "checkpoints", self.store,
                                               on_load=self._adopt_normalizer)
        self.trainer: OnlineTrainer | None = None
        if config.train and config.model_from is None:
            self.trainer = OnlineTrainer(
                model=train_model, masker=masker, buffer=buffer, val_buffer=val_buffer,
                store=self.store, metrics=self.metrics, device=self.device,
                config=OnlineTrainConfig(patch=config.patch, batch=config.batch, lr=config.lr,
                                         publish_every=config.publish_every),
                busy=lambda: self.worker.busy or not self._frames.empty(),
                save=self._save_checkpoint,
                checkpoint_every=config.checkpoint_every,
                optimizer_state=checkpoint.optimizer_state if checkpoint else None,
                step=checkpoint.step if checkpoint else 0, seed=config.seed,
                cold_start=self.cold_start if cold else None,
            )
        self.source = self._make_source()
        self.metrics_server = None
        if config.metrics_port >= 0:
            app = preview_app(self.preview, make_wsgi_app(self.metrics.registry))
            self.metrics_server = MetricsServer(self.metrics.registry, port=config.metrics_port,
                                                addr=config.metrics_addr, app=app)
        self.worker.start()
        if self.trainer is not None:
            self.trainer.start()
        if self.follower is not None:
            self.follower.start()
        self.source.start()

    def _adopt_normalizer(self, checkpoint: object) -> None:
        if self.worker.normalizer is None:
            self.worker.normalizer = checkpoint.normalizer  # type: ignore[attr-defined]

    def _make_source(self) -> DirectorySource | ZmqSource:
        config = self.config
        if config.zmq is not None:
            return ZmqSource(ZmqConfig(endpoint=config.zmq, protocol=config.zmq_protocol,
                                       out_root=config.out, socket_type=config.zmq_socket,
                                       hwm=config.zmq_hwm, tee=config.zmq_tee,
                                       max_message_mb=config.zmq_max_message_mb),
                             emit=self._emit, reject=self._reject,
                             headers=self.state.series_headers)
        assert config.watch is not None
        return DirectorySource(
            DirectoryConfig(root=config.watch, out_root=config.out,
                            ignore=(config.state_dir,), pattern=config.pattern,
                            poll=config.poll, settle_seconds=config.settle_seconds,
                            process_existing=config.process_existing, dataset=config.dataset),
            emit=self._emit, reject=self._reject, start_position=self.state.start_position,
        )

    # ---- callbacks from the stages ------------------------------------------------------
    def _emit(self, item: Frame | SeriesEnd) -> bool:
        """Queue an item; block while full (backpressure), give up once stopping."""
        if isinstance(item, Frame):
            self.metrics.frames_received.inc()
        if self.config.drop_when_full and isinstance(item, Frame):
            try:
                self._frames.put_nowait(item)
            except queue.Full:
                self._dropped.add(item.series, item.index)
                self._reject("dropped_queue_full", f"frame {item.index} of {item.series}"
                             " dropped: inference queue full (drop_when_full)")
            return True
        started = time.monotonic()
        while True:
            try:
                self._frames.put(item, timeout=0.1)
                break
            except queue.Full:
                if self.stop_requested.is_set():
                    return False
        self.metrics.source_blocked.inc(time.monotonic() - started)
        self.metrics.queue_depth.set(self._frames.qsize())
        return True

    def _max_batch(self) -> int:
        """Frames per forward pass when they queue: on CPU one at a time is faster than
        batches (benchmarks/daemon_memory.py: 39.6 vs 33.3 frames/s at 256x256), on a GPU
        batches keep it busy."""
        if self.config.max_batch:
            return self.config.max_batch
        return 8 if self.device.type == "cuda" else 1

    def _cold_start_changed(self, active: bool, classical_loss: float) -> None:
        self.metrics.cold_start_active.set(int(active))
        self.metrics.classical_selfsup_loss.set(classical_loss)

    def _reject(self, reason: str, message: str) -> None:
        log.warning("rejected (%s): %s", reason, message)
        self.metrics.reject(reason)

    def _fatal(self, exc: BaseException) -> None:
        self.failure = exc
        self.stop_requested.set()

    def _save_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                         version: int) -> None:
        normalizer = self.worker.normalizer
        if normalizer is None:
            return  # nothing seen yet: nothing learnt worth keeping
        path = self.state.checkpoint_path(version)
        try:
            save_checkpoint(path, model=model, model_config=self._model_config,
                            masker_config=self._masker.config, normalizer=normalizer,
                            optimizer=optimizer, step=step, version=version)
            self.state.prune_checkpoints()
        except OSError as exc:  # training goes on; the next interval tries again
            self.state.write_failed(f"checkpoint {path}", exc)
            return
        log.info("checkpoint %s (step %d)", path, step)

    # ---- lifecycle ----------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            os._exit(1)  # second signal: the operator wants out now
        log.info("%s received: draining and stopping", signal.Signals(signum).name)
        self.stop_requested.set()

    def run(self) -> int:
        """Run until stopped; returns the process exit status (0 clean, 1 failure)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        try:
            self._start()
        except BaseException:
            self._shutdown()
            raise
        following = self.config.watch or self.config.zmq
        self.notifier.notify("READY=1", f"STATUS=following {following}")
        log.info("n2s-stream ready: following %s, writing to %s", following, self.config.out)
        self._loop()
        self.notifier.notify("STOPPING=1")
        self._shutdown()
        if self.failure is not None:
            log.error("stopped after a failure: %s", self.failure)
            return 1
        log.info("stopped cleanly after %d frames", self.worker.written)
        return 0

    def _loop(self) -> None:
        last_ping = last_status = time.monotonic()
        last_written, last_time = 0, time.monotonic()
        latency = LatencyWindow(self.metrics.registry)
        while not self.stop_requested.wait(0.25):
            now = time.monotonic()
            if now - last_time >= 2.0:
                fps = (self.worker.written - last_written) / (now - last_time)
                self.metrics.frames_per_second.set(fps)
                last_written, last_time = self.worker.written, now
                self._sample_preview(fps, latency.mean_since_last())
            interval = self.notifier.watchdog_interval
            healthy = self.worker.alive and self.source.alive
            if interval is not None and healthy and now - last_ping >= interval:
                self.notifier.notify("WATCHDOG=1")
                last_ping = now
            if now - last_status >= 5.0:
                self.notifier.notify(
                    f"STATUS={self.worker.written} frames written, model version "
                    f"{self.store.version}, queue {self._frames.qsize()}")
                last_status = now

    def _sample_preview(self, fps: float, latency_s: float) -> None:
        """A point for the preview page's plots, and its status lines."""
        value = self.metrics.registry.get_sample_value
        following = self.config.watch or self.config.zmq
        self.preview.sample(
            {"fps": fps, "latency_s": latency_s,
             "selfsup_val_loss": value("n2s_selfsup_val_loss") or float("nan"),
             "train_loss": value("n2s_train_loss") or float("nan")},
            {"source": f"{following} ({'following' if self.source.alive else 'stopped'})",
             "model version": self.store.version,
             "denoiser": "classical (cold start)" if self.cold_start.active else "network",
             "frames written": self.worker.written,
             "queue": self._frames.qsize(),
             "output": "paused: disk nearly full" if value("n2s_output_paused") else "writing"})

    def _shutdown(self) -> None:
        """Stop the stages in data-flow order, also after a start that failed half-way: the
        source reads no more (unread frames stay in their files), the worker writes what is
        queued, the trainer saves a final checkpoint."""
        for name in ("source", "worker", "follower", "trainer"):
            part = getattr(self, name, None)
            if part is not None:
                part.stop()
        server = getattr(self, "metrics_server", None)
        if server is not None:
            server.close()

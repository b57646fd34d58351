"""The streaming daemon: wires source → queue → inference loop → sinks, and buffer → trainer.

``Daemon.run()`` is startup, a loop that watches a stop flag (metrics, systemd pings),
then a shutdown that drains: the source stops reading, every queued frame is denoised
and written, the trainer saves a checkpoint, files are closed. Signal handlers only set
the flag; a second signal exits at once.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType

import torch
from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
from torch import nn

from n2s_stream import __version__
from n2s_stream.config import DaemonConfig, ServiceOptions
from n2s_stream.errors import UsageError
from n2s_stream.formats.checkpoint import Checkpoint
from n2s_stream.formats.writer import OutputAccess
from n2s_stream.models import StateDict, build_model
from n2s_stream.n2s.denoising import Network
from n2s_stream.n2s.device import resolve_device
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.specs import Objective
from n2s_stream.pretrained import starting_model
from n2s_stream.runtime.allocator import keep_freed_memory
from n2s_stream.runtime.buffer import RollingBuffer
from n2s_stream.runtime.calibration import Calibration
from n2s_stream.runtime.coldstart import ColdStart, StartingNetwork
from n2s_stream.runtime.engine import Engine
from n2s_stream.runtime.heartbeat import Heartbeat
from n2s_stream.runtime.inference import InferenceLoop
from n2s_stream.runtime.intake import Intake
from n2s_stream.runtime.metrics import Metrics, MetricsServer
from n2s_stream.runtime.onnx_engine import check_engine
from n2s_stream.runtime.preview import Preview, preview_app
from n2s_stream.runtime.refine import Refiner
from n2s_stream.runtime.scheduler import Scheduler, Services
from n2s_stream.runtime.series import SeriesTracker
from n2s_stream.runtime.service import Notifier
from n2s_stream.runtime.snapshot import ModelStore, copy_state
from n2s_stream.runtime.state import StateDir, checkpoints_dir, refine_dir
from n2s_stream.runtime.trainer import VAL_CROP, CheckpointFollower, OnlineTrainer
from n2s_stream.runtime.worker import dump_stacks_on
from n2s_stream.sinks import SinkContext, make_sinks
from n2s_stream.sinks.hdf5 import Hdf5Sink
from n2s_stream.sources import Source, SourceContext, make_source
from n2s_stream.stages import RefinedListener, SinkChain

log = logging.getLogger(__name__)

VAL_FRAMES = 8  # held-out frames kept to score the model
REQUIRED_WORKERS = ("source", "inference", "http")
"""Workers whose death stops the daemon (exit 1, systemd restarts it). The trainer and the
checkpoint follower are not: inference goes on with the last weights, visibly
(``n2s_worker_up``, the status line, the preview page)."""


@dataclass(frozen=True)
class Roles:
    """Which optional stages a daemon runs, from its options and its starting checkpoint."""

    training: bool
    cold: bool
    refining: bool


@dataclass
class Stages:
    """The running parts of a daemon: the source and the inference loop first, as frames
    flow and as `Daemon._shutdown` stops them; then the workers beside the flow."""

    source: Source
    inference: InferenceLoop
    follower: CheckpointFollower | None
    trainer: OnlineTrainer | None
    refiner: Refiner | None
    store: ModelStore
    cold_start: ColdStart
    server: MetricsServer | None


def serve_metrics(
    service: ServiceOptions, metrics: Metrics, preview: Preview
) -> MetricsServer | None:
    """The HTTP port: Prometheus ``/metrics`` and the preview page (none with port -1)."""
    if service.metrics_port < 0:
        return None
    app = preview_app(preview, make_wsgi_app(metrics.registry))
    return MetricsServer(
        metrics.registry, port=service.metrics_port, addr=service.metrics_addr, app=app
    )


class Daemon:
    """One running n2s-stream service."""

    def __init__(self, config: DaemonConfig, *, registry: CollectorRegistry = REGISTRY) -> None:
        if len(config.sources_given()) != 1:
            raise UsageError(
                "give exactly one source to follow: --watch DIR, --zmq "
                "ENDPOINT, --pva PVNAME or --bluesky ENDPOINT"
            )
        if config.pva.serve and config.pva.serve == config.pva.pv:
            raise UsageError(
                f"--pva-serve {config.pva.serve} is the PV followed: the daemon "
                "would denoise its own output"
            )
        self.config = config
        self.metrics = Metrics(registry)
        self.metrics.build.info(
            {"version": __version__, "source": config.source or "", "following": config.following()}
        )
        self.stop_requested = threading.Event()
        self.failure: BaseException | None = None
        self.notifier = Notifier()
        self.preview = Preview()
        self.stages: Stages | None = None
        self._signals = 0
        self.intake = Intake(
            size=config.inference.queue_size,
            max_bytes=config.inference.queue_mb * 2**20,
            drop_when_full=config.inference.drop_when_full,
            metrics=self.metrics,
            stopping=self.stop_requested,
        )
        self._state: StateDir | None = None
        self._masker = Masker(config.network.masker_config())  # a checkpoint's replace them
        self._model_config = config.network.model_config()

    # ---- wiring -------------------------------------------------------------------------
    def _start(self) -> Stages:
        # What is opened before the stages exist is closed again if the start fails
        # (a metrics port taken, a bad option found late): sockets and the state dir's lock.
        with contextlib.ExitStack() as undo:
            config = self.config
            if config.inference.threads:
                torch.set_num_threads(config.inference.threads)
            device = resolve_device(config.inference.device)
            check_engine(config.inference.engine, device)
            state = self._state = StateDir(
                config.service.state_dir,
                on_write_error=self.metrics.state_write_errors.inc,
                claim=True,
            )
            undo.callback(state.release)
            self.metrics.unwritten_at_last_stop.set(state.last_stop_unwritten())
            checkpoint = state.starting_checkpoint(
                model_from=config.training.model_from, ckpt=config.training.ckpt
            )
            roles = self._roles(checkpoint)
            train_model, store, cold_start = self._starting_model(device, checkpoint, roles)
            cold = cold_start if roles.cold else None  # what the stages that feed it see
            buffer = RollingBuffer(
                max_frames=config.training.buffer_frames,
                max_bytes=config.training.buffer_mb * 2**20,
            )
            val_buffer = RollingBuffer(max_frames=VAL_FRAMES, max_bytes=64 * 2**20)
            sink_context = SinkContext(
                config=config,
                metrics=self.metrics,
                state=state,
                stopping=self.stop_requested,
                preview=self.preview,
                buffer=buffer,
                val_buffer=val_buffer,
                cold_start=cold,
                outputs=OutputAccess(min_free_bytes=config.output.min_free_bytes),
            )
            sinks = make_sinks(sink_context, train=roles.training, refine=roles.refining)
            chain = SinkChain(sinks, self.metrics.sink_error)
            undo.callback(chain.close)
            chain.start()
            scheduler = Scheduler(self.intake.queue)
            services = Services(store, self.metrics, scheduler, self._fatal)
            inference = self._inference_loop(device, services, cold, chain)
            scheduler.attach(inference=inference)
            refiner = None
            if roles.refining:
                refiner = self._refiner(
                    device, services, inference, chain, sink_context.outputs, cold_start
                )
                scheduler.attach(refiner=refiner)
            trainer = None
            if roles.training:
                trainer = OnlineTrainer(
                    network=Network(train_model, self._masker, device),
                    buffer=buffer,
                    val_buffer=val_buffer,
                    services=services,
                    options=config.training,
                    save=self._save_checkpoint,
                    resume=checkpoint,
                    cold_start=cold,
                )
            follower = None
            if config.training.model_from is not None:
                follower = CheckpointFollower(checkpoints_dir(config.training.model_from), store)
            source = self._source(state)
            undo.callback(source.stop)
            server = serve_metrics(config.service, self.metrics, self.preview)
            if server is not None:
                undo.callback(server.close)
                server.start()
            stages = Stages(
                source, inference, follower, trainer, refiner, store, cold_start, server
            )
            self.stages = stages
            undo.pop_all()  # from here on, _shutdown stops what runs
            for worker in (inference, trainer, refiner, follower, source):
                if worker is not None:
                    worker.start()
        return stages

    def _refiner(
        self,
        device: torch.device,
        services: Services,
        inference: InferenceLoop,
        sinks: SinkChain,
        outputs: OutputAccess,
        cold_start: ColdStart,
    ) -> Refiner:
        """The refiner of finished series: a network of its own, the live calibration,
        the access to the outputs it shares with the live writer, and the sinks that hear
        of each refined output."""
        network = Network(
            build_model(self._model_config).to(device),
            self._masker,
            device,
            jinv=self.config.inference.jinv,
        )
        return Refiner(
            refine_dir(self.config.service.state_dir),
            network=network,
            services=services,
            calibration=inference.calibration,
            options=self.config.refine,
            outputs=outputs,
            cold_start=cold_start,
            on_published=[s.refined for s in sinks.sinks if isinstance(s, RefinedListener)],
        )

    def _roles(self, checkpoint: Checkpoint | None) -> Roles:
        """Which of training, the cold start and refinement this daemon runs.

        Only a network without a checkpoint starts cold (without training, the classical
        denoiser then writes for good unless the shipped network beat it on the first
        frame); a fan-out worker (model_from) has no trainer to measure it and waits for
        the training worker's weights. The passthrough engine runs none of them."""
        config = self.config
        passthrough = config.inference.engine == "passthrough"
        if passthrough:
            log.info(
                "engine passthrough: frames are written as they came, not denoised; "
                "training, the cold start and refinement are off"
            )
        worker = config.training.model_from is not None
        return Roles(
            training=config.training.train and not worker and not passthrough,
            cold=config.training.cold_start
            and checkpoint is None
            and not worker
            and not passthrough,
            refining=config.refine.enabled and not passthrough,
        )

    def _starting_model(
        self, device: torch.device, checkpoint: Checkpoint | None, roles: Roles
    ) -> tuple[nn.Module, ModelStore, ColdStart]:
        """The network training starts from (the checkpoint's, else the shipped or a new
        one), the store that publishes its weights, and the cold start that guards it."""
        if checkpoint is not None:
            self._model_config = checkpoint.model_config
            self._masker = Masker(checkpoint.masker_config)
        torch.manual_seed(self.config.training.seed)
        train_model, pretrained = (
            (checkpoint.build_model(device), False) if checkpoint else self._new_model(device)
        )
        store = ModelStore(
            copy_state(train_model),
            checkpoint.version if checkpoint else 0,
            checkpoint.normalizer if checkpoint else None,
        )
        self.metrics.model_version.set(store.version)
        starting = (
            StartingNetwork(
                copy.deepcopy(train_model),
                self._masker,
                VAL_CROP,
                self.config.training.objective,
                self.config.training.split_keep,
            )
            if roles.cold and pretrained
            else None
        )
        cold_start = ColdStart(
            active=roles.cold, on_change=self._cold_start_changed, starting=starting
        )
        return train_model, store, cold_start

    def _source(self, state: StateDir) -> Source:
        """The source the config selects, wired to the intake and the state dir."""
        return make_source(
            self.config,
            SourceContext(
                emit=self.intake.emit,
                reject=self.intake.reject,
                start_position=state.start_position,
                headers=state.series_headers,
                ignore=(self.config.service.state_dir,),
                dropped=lambda output: self.metrics.output_dropped.labels(output=output).inc(),
                refused=self.intake.dropped.add,
            ),
        )

    def _new_model(self, device: torch.device) -> tuple[nn.Module, bool]:
        """A network without a checkpoint: the shipped pretrained one (or the file
        ``pretrained_model``) where it fits the network options (``pretrained``), else
        random weights; and whether it is a pretrained one."""
        model = build_model(self._model_config)
        training = self.config.training
        shipped = (
            starting_model(
                self._model_config,
                self._masker.config,
                training.objective,
                training.pretrained_model,
            )
            if training.pretrained
            else None
        )
        if shipped is not None:
            model.load_state_dict(shipped.state_dict)
            origin = "shipped" if training.pretrained_model is None else "given"
            log.info("network starts from the %s pretrained model %s", origin, shipped.path)
        elif training.pretrained:
            log.info(
                "no shipped pretrained model fits these network options: the "
                "network starts from random weights"
            )
        return model.to(device), shipped is not None

    def _inference_loop(
        self,
        device: torch.device,
        services: Services,
        cold_start: ColdStart | None,
        sinks: SinkChain,
    ) -> InferenceLoop:
        config = self.config
        output = next(sink for sink in sinks.sinks if isinstance(sink, Hdf5Sink))
        engine = Engine(
            build_model(self._model_config).to(device),
            self._masker,
            device=device,
            options=config.inference,
            metrics=self.metrics,
        )
        series = SeriesTracker(
            self._masker.config,
            self.metrics,
            last_written=output.last_written,
            count_gaps=not config.zmq.shared_feed,
            dropped=self.intake.dropped,
        )
        return InferenceLoop(
            frames=self.intake.queue,
            engine=engine,
            series=series,
            sinks=sinks,
            services=services,
            calibration=Calibration(services.store, config.network, cold_start, self.metrics),
            cold_start=cold_start,
            options=config.inference,
        )

    # ---- callbacks from the stages ------------------------------------------------------
    def _cold_start_changed(self, active: bool, classical_loss: float, network_loss: float) -> None:
        self.metrics.cold_start_active.set(int(active))
        self.metrics.classical_selfsup_loss.set(classical_loss)
        if math.isfinite(network_loss):  # the pair on the dashboard, from the first frame on
            self.metrics.selfsup_val_loss.set(network_loss)

    def _fatal(self, exc: BaseException) -> None:
        self.failure = exc
        self.stop_requested.set()

    def _save_checkpoint(
        self,
        weights: StateDict,
        optimizer: torch.optim.Optimizer,
        step: int,
        version: int,
        objective: Objective,
    ) -> None:
        assert self.stages is not None and self._state is not None
        normalizer = self.stages.store.snapshot().normalizer
        if normalizer is not None:  # else nothing seen yet: nothing learnt worth keeping
            self._state.save_checkpoint(
                model=weights,
                optimizer=optimizer,
                step=step,
                version=version,
                model_config=self._model_config,
                masker_config=self._masker.config,
                normalizer=normalizer,
                objective=objective,
            )

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
            dump_stacks_on(signal.SIGUSR1)
        keep_freed_memory()  # before the worker threads start (runtime/allocator.py)
        try:
            stages = self._start()
        except BaseException:
            self._shutdown()
            raise
        following = self.config.following()
        self.notifier.notify("READY=1", f"STATUS=following {following}")
        log.info("n2s-stream ready: following %s, writing to %s", following, self.config.output.out)
        self._loop(stages)
        self.notifier.notify("STOPPING=1")
        self._shutdown()
        if self.failure is not None:
            log.error("stopped after a failure: %s", self.failure)
            return 1
        log.info("stopped cleanly after %d frames", stages.inference.written)
        return 0

    def _loop(self, stages: Stages) -> None:
        workers = {
            "source": stages.source,
            "inference": stages.inference,
            "trainer": stages.trainer,
            "refiner": stages.refiner,
            "follower": stages.follower,
            "http": stages.server,
        }
        heartbeat = Heartbeat(
            metrics=self.metrics,
            notifier=self.notifier,
            preview=self.preview,
            workers={name: worker for name, worker in workers.items() if worker is not None},
            required=REQUIRED_WORKERS,
            written=lambda: stages.inference.written,
            status=lambda: self._status(stages),
        )
        while not self.stop_requested.wait(0.25):
            dead = heartbeat.beat()
            if dead and not self.stop_requested.is_set():  # not a worker ending as asked
                self._fatal(
                    RuntimeError(
                        f"the {dead} worker died (see the log above); "
                        "stopping so that systemd restarts the daemon"
                    )
                )

    def _status(self, stages: Stages) -> dict[str, object]:
        """The status lines of the preview page and systemd."""
        following = self.config.following()
        return {
            "source": f"{following} ({'following' if stages.source.alive else 'stopped'})",
            "model version": stages.store.version,
            "denoiser": ("classical (cold start)" if stages.cold_start.active else "network"),
            "training": self._training_status(stages),
            "frames written": stages.inference.written,
            "queue": self.intake.queue.qsize(),
        }

    def _training_status(self, stages: Stages) -> str:
        trainer = stages.trainer
        if trainer is None:
            return "following checkpoints" if stages.follower else "off"
        if trainer.error is not None:
            return f"STOPPED after an error ({trainer.error}); inference goes on"
        return f"step {trainer.step}" if trainer.alive else "stopped"

    def _shutdown(self) -> None:
        """Stop the stages in data-flow order, also after a start that failed half-way,
        within ``stop_timeout``: the source reads no more (unread frames stay in their
        files), the inference loop writes what is queued until the bound, the trainer
        saves a final checkpoint."""
        stages = self.stages
        if stages is None:
            return
        deadline = time.monotonic() + self.config.service.stop_timeout
        stages.source.stop()
        stages.inference.stop_by(deadline)
        if self._state is not None:
            self._state.note_last_stop(stages.inference.unwritten)
        for worker in (stages.refiner, stages.follower, stages.trainer):
            if worker is not None:
                worker.stop()
        if stages.server is not None:
            stages.server.close()
        if self._state is not None:
            self._state.release()

"""Typed options of every command, declared once (see ``options.py`` for the layering).

The daemon's options are grouped by the stage that uses them (`DaemonConfig` holds one
section per stage, and each stage's constructor takes its own section); offline commands
have one class each. Names, defaults, choices, bounds and help live on the fields: the
command line, the TOML tables, the ``N2S_*`` environment variables and ``check-config``
are generated from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from n2s_stream.errors import UsageError
from n2s_stream.formats.output_format import LOSSY, Compression, OutputDtype, OutputFormat
from n2s_stream.formats.protocols import ZmqProtocol
from n2s_stream.n2s.specs import MaskerConfig, ModelConfig, Objective, Precision, is_blind
from n2s_stream.options import as_toml, option, section

if TYPE_CHECKING:
    from n2s_stream.n2s.normalize import Normalizer

__all__ = [
    "DaemonConfig",
    "DemoConfig",
    "DenoiseConfig",
    "MergeConfig",
    "SimulateConfig",
    "TrainConfig",
    "as_toml",
]

ENGINES = ("torch", "onnxruntime", "passthrough")  # what runs the daemon's forward passes
Engine = Literal["torch", "onnxruntime", "passthrough"]
Normalize = Literal["none", "meanstd", "percentile"]


@dataclass(frozen=True)
class NetworkOptions:
    """The network and its masking (for a model from scratch; a checkpoint has its own)."""

    model: Literal["unet", "dncnn"] = option("unet", help="architecture: unet or dncnn")
    width: int = option(16, help="channels of the first layer", min=1)
    depth: int = option(2, help="UNet down-samplings", min=0)
    layers: int = option(10, help="DnCNN conv layers", min=2)
    residual: bool = option(
        False, help="add the input to the output (then use --jinv, with objective noise2self)"
    )
    batch_norm: bool = option(False, help="batch normalisation layers")
    grid_size: int = option(4, help="mask grid spacing: one hidden pixel per NxN cell", min=2)
    mask_mode: Literal["interpolate", "zero"] = option(
        "interpolate", help="what replaces a hidden pixel"
    )
    mask_as_input: bool = option(
        False, help="the mask as an extra input channel (objective noise2self only)"
    )
    context_frames: int = option(
        1,
        min=1,
        help="frames of the series seen at once: centre + neighbours; centred "
        "context delays each frame by (K-1)/2 frames",
    )
    causal_context: bool = option(
        False, help="neighbours from earlier frames only (no added latency)"
    )
    register_context: bool = option(
        True,
        help="shift neighbours onto the centre frame by the motion between them (drifting samples)",
    )
    normalize: Normalize = option(
        "meanstd", help="normalisation, fitted on the first frames, then fixed"
    )
    no_scale_integers: bool = option(False, help="do not divide integer input by its dtype maximum")

    def __post_init__(self) -> None:
        try:
            self.model_config()
        except ValueError as exc:
            raise UsageError(str(exc)) from exc

    def masker_config(self) -> MaskerConfig:
        """The masking these options describe."""
        return MaskerConfig(
            self.grid_size,
            self.mask_mode,
            self.mask_as_input,
            self.context_frames,
            self.causal_context,
            self.register_context,
        )

    def model_config(self) -> ModelConfig:
        """The architecture these options describe (one input channel per frame, +mask)."""
        return ModelConfig(
            name=self.model,
            in_channels=self.masker_config().in_channels,
            width=self.width,
            depth=self.depth,
            layers=self.layers,
            residual=self.residual,
            batch_norm=self.batch_norm,
        )

    def fit_normalizer(
        self, frames: np.ndarray, *, source_dtype: np.dtype, valid: np.ndarray | None = None
    ) -> Normalizer:
        """The normalisation these options describe, fitted on ``(N, H, W)`` ``frames``
        (source units)."""
        from n2s_stream.n2s.normalize import fit_normalizer  # numpy and torch: at use only

        return fit_normalizer(
            frames,
            mode=self.normalize,
            scale_integers=not self.no_scale_integers,
            source_dtype=source_dtype,
            valid=valid,
        )


def split_keep_option() -> float:
    """The ``split_keep`` option, the same for the daemon's training and ``train``."""
    return option(
        0.9,
        min=0.05,
        max=0.95,
        help="binomial only: share of each pixel's photons in the network's input (the "
        "rest is the target)",
    )


def check_objective(objective: Objective, network: NetworkOptions, jinv: bool = False) -> None:
    """Neighbor2Neighbor and binomial splitting train without a blind spot: nothing is
    hidden, so a mask input channel would carry nothing (refused rather than trained on
    zeros), and J-invariant inference would show the network inputs it never saw in
    training (each pixel hidden and filled in)."""
    if is_blind(objective):
        return
    if network.mask_as_input:
        raise UsageError(
            f"objective {objective} hides no pixels: mask_as_input applies to noise2self "
            "only (set objective = noise2self to use it)"
        )
    if jinv:
        raise UsageError(
            f"objective {objective} trains without a blind spot: jinv applies to noise2self "
            "only (set objective = noise2self to use it)"
        )


@dataclass(frozen=True)
class TrainConfig:
    """``n2s-stream train``: the seed's ``train_noise2self.py`` flags and more."""

    h5: Path | None = option(
        None, help="noisy input stack (required)", example="/data/scan_0001.h5"
    )
    dataset: str | None = option(
        None,
        example="/entry/data/data",
        help="frame dataset; default: /entry/data/data, /data, /X, Eiger data_NNNNNN links",
    )
    max_samples: int = option(1000, help="frames used at most (spread over the stack)", min=0)
    device: str = option("auto", help="cpu, cuda, cuda:N or auto")
    network: NetworkOptions = section(NetworkOptions)
    patch: int = option(64, help="patch size; 0 = full frames", min=0)
    batch: int = option(8, help="patches per step", min=1)
    epochs: int = option(10, help="passes over the training frames", min=1)
    steps_per_epoch: int = option(0, help="steps per epoch; 0 = one pass over the pixels", min=0)
    max_seconds: float = option(0.0, help="stop after this much training time; 0 = no limit", min=0)
    lr: float = option(3e-3, help="peak learning rate, cosine decay", min=0)
    objective: Objective = option(
        "noise2self",
        help="noise2self (masked loss: blind spot), "
        "neighbor2neighbor (pairs of neighbouring pixels: no "
        "blind spot) or binomial (each frame's photons split in two: no blind spot, "
        "photon counts only)",
    )
    split_keep: float = split_keep_option()
    amp: bool = option(False, help="mixed precision (CUDA only)")
    val_frac: float = option(
        0.0, help="fraction of frames held out for validation", min=0, max=0.999
    )
    save_best: bool = option(False, help="also keep ckpt_best.pt")
    early_stop_patience: int = option(
        0, help="epochs without gain before stopping; 0 = never", min=0
    )
    early_stop_min_delta: float = option(0.0, help="smallest loss gain that counts", min=0)
    seed: int = option(0, help="random seed (same seed, same run)")
    out_dir: Path = option(Path("runs/noise2self"), help="ckpt_last.pt and ckpt_best.pt go here")
    ckpt: Path | None = option(
        None, help="start from these weights", example="runs/noise2self/ckpt_last.pt"
    )
    pretrained: bool = option(
        False,
        help="without --ckpt, start from the shipped pretrained "
        "model (as the daemon does) where the network options fit it",
    )
    pretrained_model: Path | None = option(
        None,
        example="/opt/n2s/starting_model.pt",
        help="start from this model file (python -m n2s_stream.pretrained --out) "
        "instead of the shipped one, as --pretrained does; it must fit the network options",
    )
    pretrained_lr: float = option(
        1e-3,
        min=0,
        help="peak learning rate instead of --lr when "
        "starting from the shipped model (the daemon's rate)",
    )
    progress: bool = option(True, help="show progress bars")

    def __post_init__(self) -> None:
        check_objective(self.objective, self.network)
        if self.pretrained_model is not None and self.ckpt:
            raise UsageError(
                "pretrained_model is where training from scratch begins: give it or --ckpt"
            )

    @property
    def starts_pretrained(self) -> bool:
        """Whether training without ``ckpt`` starts from a pretrained model: the shipped
        one (``pretrained``) or the file ``pretrained_model`` names."""
        return self.pretrained or self.pretrained_model is not None


@dataclass(frozen=True)
class StorageOptions:
    """How denoised frames are stored (formats/output_format.py): dtype and HDF5 codec."""

    output_dtype: OutputDtype = option(
        "float16",
        help="stored type of denoised frames: "
        "float16 (float32 for detectors whose "
        "counts exceed 65504), or float32",
    )
    output_compression: Compression = option(
        "bslz4",
        help="HDF5 codec of denoised frames: bslz4, zstd, none (lossless), or sz3, "
        "zfp (lossy, error-bounded; float32 only)",
    )
    lossy_fraction: float = option(
        0.05,
        min=1e-6,
        max=1.0,
        help="sz3/zfp: largest error, as a fraction of the Poisson noise at the series' mean count",
    )

    def check(self, require_reconstructable: bool) -> None:
        """Refuse combinations that cannot be stored (UsageError)."""
        if require_reconstructable and self.output_compression in LOSSY:
            raise UsageError(
                "require_reconstructable keeps exact counts: choose a lossless "
                f"output_compression, not {self.output_compression}"
            )
        self.output_format()

    def output_format(self) -> OutputFormat:
        """The stored form of denoised frames these options ask for."""
        try:
            return OutputFormat(self.output_dtype, self.output_compression, self.lossy_fraction)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc


@dataclass(frozen=True)
class DenoiseConfig:
    """``n2s-stream denoise``: the seed's ``denoise_h5_stack.py`` flags and more."""

    h5: Path | None = option(None, help="input HDF5 file (required)", example="/data/scan_0001.h5")
    ckpt: Path | None = option(
        None,
        help="checkpoint from n2s-stream train (required)",
        example="runs/noise2self/ckpt_best.pt",
    )
    out: Path | None = option(
        None,
        example="/data/denoised/",
        help="output file, or folder (gets scan_0001_n2s.h5); default: beside the input",
    )
    dataset: str | None = option(
        None, help="frame dataset (default: discovered as for train)", example="/entry/data/data"
    )
    device: str = option("auto", help="cpu, cuda, cuda:N or auto")
    batch: int = option(8, help="frames per forward pass", min=1)
    amp: bool = option(False, help="mixed precision (CUDA only)")
    jinv: bool = option(
        False, help="J-invariant inference (grid_size**2 passes; never sees the pixel)"
    )
    preserve_flux: bool = option(
        False,
        help="scale each denoised frame to its raw total on the measured pixels "
        "(no intensity added or removed; benchmarks/fidelity.py)",
    )
    require_reconstructable: bool = option(
        False, help="write in the input's dtype and counts; needs an exact normalisation"
    )
    storage: StorageOptions = section(StorageOptions)
    context_frames: int | None = option(
        None,
        min=1,
        help="check that the checkpoint sees this many frames (it records K; "
        "default: the checkpoint's)",
    )
    progress: bool = option(True, help="show a progress bar")
    engine: Engine = option(
        "torch",
        help="torch, or onnxruntime: CPU forward passes by "
        "ONNX Runtime (pip install 'n2s-stream[onnx]')",
    )

    def __post_init__(self) -> None:
        self.storage.check(self.require_reconstructable)


@dataclass(frozen=True)
class SimulateConfig:
    """``n2s-stream simulate``: a test detector writing a growing file or sending ZeroMQ."""

    dir: Path | None = option(
        None,
        example="acq",
        help="folder to write into (with --pva-serve: a copy of what was served, and its truth)",
    )
    zmq_bind: str | None = option(
        None, help="send over ZeroMQ instead: PUSH bound here", example="tcp://127.0.0.1:9999"
    )
    pva_serve: str | None = option(
        None,
        example="SIM:Pva1:Image",
        help="serve the frames as an NTNDArray PV instead (as "
        "NDPluginPva: a stale value first, uniqueId from 1 "
        "per series)",
    )
    codec: Literal["none", "lz4", "bslz4", "zlib", "blosc"] = option(
        "none", help="NTNDArray compression (--pva-serve)"
    )
    start_delay: float = option(
        3.0,
        min=0,
        help="seconds the PV serves its stale value before the first frame (--pva-serve)",
    )
    acquire_pv: str | None = option(
        None,
        example="SIM:cam1:Acquire",
        help="also serve an Acquire PV: 1 during each acquisition (--pva-serve)",
    )
    keep_counter: bool = option(False, help="uniqueId counts on across acquisitions (--pva-serve)")
    gap_every: int = option(
        0, min=0, help="skip every Nth uniqueId, as if PVA dropped it (--pva-serve)"
    )
    protocol: ZmqProtocol = option("native", help="ZeroMQ protocol")
    series: int = option(1, help="series sent back to back (ZeroMQ, PVA)", min=1)
    first_series: int = option(1, help="number of the first series (ZeroMQ, PVA)", min=0)
    encoding: Literal["raw", "bslz4", "lz4"] = option(
        "bslz4", help="payload encoding of the native protocol"
    )
    frames: int = option(100, help="frames per series", min=1)
    shape: str = option("128x128", help="frame shape HxW")
    dose: float = option(20.0, help="mean counts at the brightest pixel", min=0)
    rate: float = option(0.0, help="frames/s; 0 = as fast as possible", min=0)
    drift: float = option(0.5, help="scene drift, pixels per frame (file layouts)", min=0)
    layout: Literal["areadetector", "eiger", "plain"] = option(
        "areadetector",
        help="file layout: areadetector, eiger (master + bitshuffle data "
        "file + pixel mask) or plain (/data)",
    )
    name: str = option("scan_0001", help="series (file) name")
    seed: int = option(0, help="random seed (same seed, same run)")

    def frame_shape(self) -> tuple[int, int]:
        """``shape`` as ``(height, width)``."""
        try:
            height, width = (int(part) for part in self.shape.lower().split("x"))
        except ValueError as exc:
            raise UsageError(f"--shape {self.shape!r}: expected HxW, e.g. 256x256") from exc
        if height < 8 or width < 8:
            raise UsageError(f"--shape {self.shape!r}: frames must be at least 8x8")
        return height, width


@dataclass(frozen=True)
class DemoConfig:
    """``n2s-stream demo``: simulator and daemon end to end."""

    dir: Path = option(Path("demo-output"), help="working folder for frames and outputs")
    seconds: float = option(60.0, help="acquisition length", min=1)
    context_frames: int = option(
        1, min=1, help="K > 1: a second daemon with K-frame temporal context, side by side"
    )
    source: Literal["directory", "pva"] = option(
        "directory",
        help="how frames travel: a growing HDF5 file, or an NTNDArray PV "
        "(EPICS PVAccess, on loopback; the daemon serves the denoised PV)",
    )


@dataclass(frozen=True)
class MergeConfig:
    """``n2s-stream merge``: one virtual dataset over the shards of a fanned-out series."""

    shards: tuple[Path, ...] = option((), help="output files of the workers", positional=True)
    out: Path | None = option(
        None, help="merged file to write (required)", example="merged/scan_0001.h5"
    )


# ---- the daemon, one section per stage ------------------------------------------------------
@dataclass(frozen=True)
class DirectoryOptions:
    """The directory source (sources/directory.py)."""

    root: Path | None = option(
        None,
        name="watch",
        example="/data/acq",
        help="acquisition directory to follow (or give zmq)",
    )
    pattern: str = option("*", help="file name glob among .h5/.hdf5/.hdf/.nxs files")
    poll: float = option(
        0.0,
        min=0,
        help="poll every N s instead of inotify (chosen anyway on NFS, GPFS, Lustre); 0 = inotify",
    )
    settle_seconds: float = option(
        5.0, min=0, help="a file that has not grown this long is finished"
    )
    process_existing: bool = option(True, help="also process files already there at start")
    dataset: str | None = option(
        None, help="frame dataset (default: discovered as for train)", example="/entry/data/data"
    )
    decode_threads: int = option(
        2,
        min=1,
        help="threads that decode compressed frames (bitshuffle-LZ4) while others are denoised",
    )


@dataclass(frozen=True)
class ZmqOptions:
    """The ZeroMQ source (sources/zmq.py) and the republishing sink."""

    endpoint: str | None = option(
        None, name="zmq", example="tcp://eiger:9999", help="ZeroMQ feed to follow (or give watch)"
    )
    protocol: ZmqProtocol = option(
        "native", help="native, dectris-stream1 (SIMPLON v1) or dectris-stream2 (CBOR)"
    )
    socket: Literal["pull", "sub"] = option(
        "pull", help="pull (the detector PUSHes) or sub (it PUBlishes)"
    )
    hwm: int = option(1000, min=0, help="receive high-water mark, in messages (0: none)")
    max_message_mb: int = option(
        256, min=1, help="larger messages are refused (too_large); 4x it: cut off by ZeroMQ"
    )
    decode_threads: int = option(
        2,
        min=1,
        help="threads that decode (decompress) frame payloads while the next messages are "
        "received; frames still go downstream in the order they came",
    )
    out: str | None = option(
        None,
        example="tcp://127.0.0.1:9800",
        help="PUB bound here: denoised frames (native, float32) for live viewers",
    )
    tee: str | None = option(
        None,
        example="tcp://127.0.0.1:9801",
        help="PUSH bound here: every raw message, untouched, for the facility's writer",
    )
    shared_feed: bool = option(
        False,
        name="shared_feed",
        help="one of several workers PULLing one feed: the frames "
        "dealt to the others are not missing",
    )


@dataclass(frozen=True)
class PvaOptions:
    """EPICS PVAccess: the source (sources/pva.py) and the served denoised PV (sinks/pva.py);
    discovery and ports from the EPICS_PVA_* / EPICS_PVAS_* variables."""

    pv: str | None = option(
        None,
        name="pva",
        example="13SIM1:Pva1:Image",
        help="areaDetector NTNDArray PV to follow (or give watch / zmq)",
    )
    series_gap: float = option(10.0, min=0.1, help="seconds without frames that end an acquisition")
    queue_size: int = option(
        100, min=1, help="PVA monitor queue (record[queueSize=N]): updates held for a burst"
    )
    acquire_pv: str | None = option(
        None,
        example="13SIM1:cam1:Acquire",
        help="the driver's Acquire PV: 1 opens a series, 0 ends it once the frames stop (--pva)",
    )
    serve: str | None = option(
        None,
        example="13SIM1:N2S:Image",
        help="serve the denoised frames as this NTNDArray PV (any "
        "source; loopback unless EPICS_PVAS_INTF_ADDR_LIST says)",
    )
    serve_codec: Literal["none", "lz4", "bslz4"] = option(
        "none", help="compression of the served PV (as NDPluginCodec)"
    )


@dataclass(frozen=True)
class BlueskyOptions:
    """The Bluesky source (sources/bluesky/): the documents of a bluesky 0MQ proxy."""

    endpoint: str | None = option(
        None,
        name="bluesky",
        example="tcp://bluesky-proxy:5578",
        help="follow the documents of a bluesky 0MQ proxy's output "
        "(Publishers serialising JSON or msgpack)",
    )
    prefix: str = option("", help="follow only Publishers with this prefix (empty: all)")
    data_key: str | None = option(
        None, help="the detector's data key (default: every image stream of a run)"
    )
    path_map: tuple[str, ...] = option(
        (),
        example="/det/data=/mnt/det",
        help="DETECTOR_PREFIX=LOCAL_PREFIX: where the daemon "
        "sees the files the detector's host names",
    )
    root: Path | None = option(
        None,
        example="/data/detector",
        help="without path_map: announced files must lie under this "
        "folder (one of the two is required)",
    )
    max_message_mb: int = option(16, min=1, help="larger documents are refused")
    idle_end_seconds: float = option(
        600.0,
        min=1,
        help="a run with no document for this "
        "long has its series ended with what its file holds "
        "(its stop may be lost); it resumes if the run does",
    )


@dataclass(frozen=True)
class TrainingOptions:
    """Online training (runtime/trainer.py) and where its model starts."""

    train: bool = option(True, help="keep training online; --no-train: inference only")
    ckpt: Path | None = option(
        None,
        example="runs/noise2self/ckpt_best.pt",
        help="start from an offline checkpoint (n2s-stream train) when the state dir has none",
    )
    model_from: Path | None = option(
        None,
        example="/shared/n2s-state-trainer",
        help="fan-out worker: no training, adopt the training "
        "worker's checkpoints (its state dir) as they appear",
    )
    cold_start: bool = option(
        True,
        help="from scratch, a calibrated classical denoiser "
        "writes until the network's held-out loss beats it",
    )
    pretrained: bool = option(
        True,
        help="from scratch, the network starts from "
        "the shipped pretrained model (n2s_stream/pretrained) where "
        "the network options fit it",
    )
    pretrained_model: Path | None = option(
        None,
        example="/opt/n2s/starting_model.pt",
        help="with pretrained, start from this model file "
        "(python -m n2s_stream.pretrained --out) instead of the shipped one; "
        "it must fit the network options",
    )
    patch: int = option(64, min=4, help="training patch side")
    batch: int = option(8, min=1, help="patches per training step")
    lr: float = option(1e-3, min=0, help="learning rate of online training")
    objective: Objective = option(
        "binomial",
        help="binomial (each frame's photons split in two: no blind spot; frames that "
        "are not photon counts train by neighbor2neighbor instead), "
        "neighbor2neighbor (pairs of neighbouring pixels: no blind spot) or "
        "noise2self (masked loss: blind spot); held-out scores are masked, but by "
        "photon splits while binomial training splits photons",
    )
    split_keep: float = split_keep_option()
    publish_every: int = option(50, min=1, help="training steps between model versions")
    checkpoint_every: float = option(
        60.0, min=0, help="seconds between checkpoints (also one at every stop)"
    )
    buffer_frames: int = option(256, min=2, help="newest frames kept for training")
    buffer_mb: int = option(512, min=1, help="... and at most this many MiB of them")
    average_steps: int = option(
        200,
        min=0,
        help="published weights are a moving average "
        "of the trained ones over about this many steps (steadier "
        "versions); 0 or 1: the trained weights as they are",
    )
    recent_frames: int = option(
        0,
        min=0,
        help="half of each training batch is cropped from "
        "the newest this many frames, to follow a changing scene "
        "(0: uniform over the buffer)",
    )
    seed: int = option(0, help="random seed (same seed, same run)")

    def __post_init__(self) -> None:
        if self.pretrained_model is not None and (not self.pretrained or self.ckpt):
            raise UsageError(
                "pretrained_model is where a network without a checkpoint begins: it "
                "needs pretrained and no ckpt"
            )


@dataclass(frozen=True)
class InferenceOptions:
    """The inference loop (runtime/inference.py), its engine and its series bookkeeping."""

    device: str = option("auto", help="cpu, cuda, cuda:N or auto")
    threads: int = option(0, min=0, help="torch intra-op threads; 0 = torch's choice")
    queue_size: int = option(
        64, min=1, help="frames waiting for inference; a full queue holds the source back"
    )
    queue_mb: int = option(
        256, min=1, help="... and at most this many MiB of them (detector-sized frames)"
    )
    drop_when_full: bool = option(
        False, help="drop frames (logged, counted) instead of holding the source back"
    )
    max_batch: int = option(
        0, min=0, help="frames per forward pass when they queue; 0 = 8 on CUDA, 1 on CPU"
    )
    jinv: bool = option(
        False, help="J-invariant inference (grid_size**2 passes; objective noise2self only)"
    )
    preserve_flux: bool = option(
        False,
        help="scale each live denoised frame to its raw total on the measured pixels "
        "(no intensity added or removed; refined frames: refine_preserve_flux)",
    )
    precision: Precision = option(
        "float32",
        help="forward-pass arithmetic: float32, or "
        "autocast to float16 / bfloat16 (measure "
        "its quality first: detector_scale.py)",
    )
    tile: int = option(
        0,
        min=0,
        help="frames larger than this (pixels a side) go through "
        "the network in overlapping tiles; 0 = whole frames",
    )
    tile_overlap: int = option(
        32,
        min=0,
        help="context pixels on each side of a tile (the "
        "network's reach: results then equal a "
        "whole-frame pass)",
    )
    engine: Engine = option(
        "torch",
        help="torch; onnxruntime: CPU forward passes by ONNX "
        "Runtime (pip install 'n2s-stream[onnx]'); "
        "passthrough: frames written as they came, no "
        "network (commissioning a data path)",
    )
    compile: bool = option(
        False, help="torch.compile the inference model (~20 s per frame shape on 2 CPU cores)"
    )
    onnx_reload_seconds: float = option(
        10.0, min=0, help="onnxruntime: take new weights (a new export) at most this often"
    )
    context_flush_seconds: float = option(
        2.0, min=0, help="a frame waits at most this long for later neighbours"
    )
    series_idle_close: float = option(
        300.0, min=0, help="close an output after this long without frames; 0 = never"
    )
    stall_seconds: float = option(
        300.0,
        min=1,
        help="a forward pass or write that does not "
        "return for this long counts as a dead "
        "worker: no watchdog, exit 1",
    )

    def __post_init__(self) -> None:
        if self.engine != "torch" and self.compile:
            raise UsageError(f"compile applies to the torch engine, not to {self.engine}")
        if self.tile and self.tile <= 2 * self.tile_overlap:
            raise UsageError(
                f"tile {self.tile} must exceed twice tile_overlap ({self.tile_overlap})"
            )


@dataclass(frozen=True)
class OutputOptions:
    """What happens to denoised frames (sinks/)."""

    out: Path = option(Path("denoised"), help="output directory; names mirror the input's")
    require_reconstructable: bool = option(
        False, help="write in the source's dtype (needs an exact normalisation)"
    )
    min_free_mb: float = option(
        64.0, min=0, help="hold writing (and so reading) below this much free output space"
    )
    sinks: tuple[str, ...] = option(
        (), help="more sinks, as module:factory (called with the SinkContext)"
    )
    storage: StorageOptions = section(StorageOptions)
    flush_seconds: float = option(
        1.0, min=0, help="SWMR readers see each frame within this bound (0: flush every frame)"
    )
    encode_threads: int = option(
        2, min=1, help="threads that encode output chunks while the next frames are denoised"
    )

    def __post_init__(self) -> None:
        self.storage.check(self.require_reconstructable)

    @property
    def min_free_bytes(self) -> int:
        """``min_free_mb`` in bytes: what every writer of outputs leaves free on its disk."""
        return int(self.min_free_mb * 2**20)


@dataclass(frozen=True)
class RefineOptions:
    """Refined output (runtime/refine.py): finished series denoised again with the newest model.

    Once the daemon is idle, into ``/entry/refined/data`` of the series' output."""

    enabled: bool = option(
        True,
        name="refine",
        help="denoise each finished series again "
        "with the newest model when idle "
        "(/entry/refined/data)",
    )
    tta: Literal[1, 2, 4, 8] = option(
        8,
        help="refined frames average this many flips and "
        "rotations of the input (test-time "
        "augmentation)",
    )
    idle_seconds: float = option(
        2.0, min=0, help="refine only after this long without frames to denoise"
    )
    max_gb: float = option(
        16.0,
        min=0,
        help="GiB of raw frames kept for refining, all series together (state_dir/refine); "
        "waiting spools are kept first come first served, a series that does not fit is "
        "not refined",
    )
    preserve_flux: bool = option(
        True,
        help="scale each refined frame to its raw total on the measured pixels (no "
        "intensity added or removed: smaller ring and spot biases at about the same PSNR)",
    )


@dataclass(frozen=True)
class TiledOptions:
    """The Tiled sink (sinks/tiled.py): outputs registered in a Tiled server."""

    uri: str | None = option(
        None,
        name="tiled",
        example="http://tiled:8000/api/v1",
        help="register each output in this Tiled server (external HDF5 "
        "data, under a container for its run)",
    )
    api_key_file: Path | None = option(
        None, help="file holding the API key (else TILED_API_KEY; never on the command line)"
    )
    path_map: tuple[str, ...] = option(
        (),
        example="/data/denoised=/tiled/denoised",
        help="LOCAL_PREFIX=SERVER_PREFIX: where the server sees the outputs",
    )
    update_seconds: float = option(
        2.0, min=0.1, help="update the registered shape at most this often while a series grows"
    )


@dataclass(frozen=True)
class ServiceOptions:
    """The process around the stages: state, metrics and the preview page."""

    state_dir: Path = option(Path("n2s-state"), help="checkpoints and ledger; local disk")
    metrics_port: int = option(
        9750, min=-1, max=65535, help="Prometheus and preview port; 0 = any free port, -1 = none"
    )
    metrics_addr: str = option(
        "127.0.0.1", help="metrics bind address (loopback unless you mean it)"
    )
    stop_timeout: float = option(
        60.0,
        min=1,
        help="SIGTERM: seconds to write what is queued; "
        "the rest is counted and, from a directory, "
        "read again at the next start (keep it "
        "under the unit's TimeoutStopSec)",
    )


@dataclass(frozen=True)
class DaemonConfig:
    """The streaming daemon (``n2s-stream --watch DIR``): TOML table ``[daemon]``,
    environment ``N2S_<OPTION>`` (e.g. ``N2S_WATCH=/acq``)."""

    directory: DirectoryOptions = section(DirectoryOptions)
    zmq: ZmqOptions = section(ZmqOptions, prefix="zmq_")
    pva: PvaOptions = section(PvaOptions, prefix="pva_")
    bluesky: BlueskyOptions = section(BlueskyOptions, prefix="bluesky_")
    network: NetworkOptions = section(NetworkOptions)
    training: TrainingOptions = section(TrainingOptions)
    inference: InferenceOptions = section(InferenceOptions)
    output: OutputOptions = section(OutputOptions)
    refine: RefineOptions = section(RefineOptions, prefix="refine_")
    tiled: TiledOptions = section(TiledOptions, prefix="tiled_")
    service: ServiceOptions = section(ServiceOptions)

    def __post_init__(self) -> None:
        check_objective(self.training.objective, self.network, self.inference.jinv)

    @property
    def source(self) -> str | None:
        """The source to follow (a key of ``sources.SOURCES``), None unless exactly one is
        given."""
        chosen = self.sources_given()
        return chosen[0] if len(chosen) == 1 else None

    def sources_given(self) -> list[str]:
        """Every source whose selecting option is set."""
        given = {
            "directory": self.directory.root,
            "zmq": self.zmq.endpoint,
            "pva": self.pva.pv,
            "bluesky": self.bluesky.endpoint,
        }
        return [name for name, value in given.items() if value is not None]

    def following(self) -> str:
        """What the daemon follows, for logs and status lines."""
        return str(self.directory.root or self.zmq.endpoint or self.pva.pv or self.bluesky.endpoint)

"""Typed options of every command, and how they are layered.

Each command has one frozen dataclass. Values come, lowest precedence first, from the
defaults here, a TOML file (``--config``, one table per command, e.g. ``[train]``),
``N2S_<COMMAND>_<OPTION>`` environment variables, and the command line. Unknown keys are
rejected with their name; types are checked when the object is built.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from n2s_stream.errors import UsageError
from n2s_stream.models import ModelConfig
from n2s_stream.n2s.masking import MaskerConfig
from n2s_stream.n2s.normalize import NORMALIZE_MODES

ENGINES = ("torch", "onnxruntime")  # what runs the daemon's forward passes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


@dataclass(frozen=True)
class TrainConfig:
    """Options of ``n2s-stream train`` (the seed's ``train_noise2self.py`` flags and more)."""

    h5: Path | None = None
    dataset: str | None = None
    max_samples: int = 1000
    device: str = "auto"
    model: str = "unet"
    width: int = 16
    depth: int = 2
    layers: int = 10
    residual: bool = False
    batch_norm: bool = False
    grid_size: int = 4
    mask_mode: str = "interpolate"
    mask_as_input: bool = False
    context_frames: int = 1  # frames of the series the network sees (centre + neighbours)
    causal_context: bool = False  # neighbours from the past only
    patch: int = 64
    batch: int = 8
    epochs: int = 10
    steps_per_epoch: int = 0  # 0: one pass over the training pixels per epoch
    max_seconds: float = 0.0  # 0: no time budget
    lr: float = 3e-3
    amp: bool = False
    val_frac: float = 0.0
    save_best: bool = False
    early_stop_patience: int = 0  # 0: never stop early
    early_stop_min_delta: float = 0.0
    normalize: str = "meanstd"
    no_scale_integers: bool = False
    seed: int = 0
    out_dir: Path = Path("runs/noise2self")
    ckpt: Path | None = None  # start from these weights instead of from scratch
    progress: bool = True

    def __post_init__(self) -> None:
        try:
            self.model_config()
            self.masker_config()
        except ValueError as exc:
            raise UsageError(f"train: {exc}") from exc
        if self.normalize not in NORMALIZE_MODES:
            raise UsageError(f"train: normalize must be one of {NORMALIZE_MODES}")
        if self.batch < 1 or self.epochs < 1 or self.patch < 0 or self.max_samples < 0:
            raise UsageError("train: batch and epochs must be >= 1, patch and max_samples >= 0")
        if not 0.0 <= self.val_frac < 1.0:
            raise UsageError(f"train: val_frac must be in [0, 1), got {self.val_frac}")

    def model_config(self) -> ModelConfig:
        """The architecture these options describe (one input channel per image, +mask)."""
        return ModelConfig(
            name=self.model,
            in_channels=self.masker_config().in_channels,
            width=self.width,
            depth=self.depth,
            layers=self.layers,
            residual=self.residual,
            batch_norm=self.batch_norm,
        )

    def masker_config(self) -> MaskerConfig:
        """The masking these options describe."""
        return MaskerConfig(self.grid_size, self.mask_mode, self.mask_as_input,
                            self.context_frames, self.causal_context)


@dataclass(frozen=True)
class DenoiseConfig:
    """Options of ``n2s-stream denoise`` (the seed's ``denoise_h5_stack.py`` flags and more)."""

    h5: Path | None = None
    ckpt: Path | None = None
    out: Path | None = None
    dataset: str | None = None
    device: str = "auto"
    batch: int = 8
    amp: bool = False
    jinv: bool = False
    require_reconstructable: bool = False
    progress: bool = True
    engine: str = "torch"  # "onnxruntime": forward passes by ONNX Runtime (CPU, extra [onnx])


@dataclass(frozen=True)
class DaemonConfig:
    """Options of the streaming daemon (``n2s-stream --watch DIR``), TOML table ``[daemon]``,
    environment ``N2S_<OPTION>`` (e.g. ``N2S_WATCH=/acq``)."""

    watch: Path | None = None
    zmq: str | None = None  # e.g. tcp://detector:9999 (instead of watch)
    zmq_protocol: str = "native"  # native, dectris-stream1, dectris-stream2
    zmq_socket: str = "pull"  # pull (detector PUSHes) or sub (detector PUBlishes)
    zmq_hwm: int = 1000  # receive high-water mark, in messages
    zmq_max_message_mb: int = 256  # larger messages are refused (too_large); 4x it: cut off
    zmq_out: str | None = None  # PUB bound here: denoised frames (native) for live viewers
    zmq_tee: str | None = None  # PUSH bound here: raw messages forwarded untouched
    shared_feed: bool = False  # one of several workers PULLing one feed: gaps are not missing
    out: Path = Path("denoised")
    state_dir: Path = Path("n2s-state")
    device: str = "auto"
    metrics_port: int = 9750  # -1: no metrics endpoint; 0: any free port
    metrics_addr: str = "127.0.0.1"
    # directory source
    pattern: str = "*"
    poll: float = 0.0  # seconds; 0 = inotify (polling is chosen anyway on NFS/GPFS/Lustre)
    settle_seconds: float = 5.0  # a file that has not grown this long is finished
    process_existing: bool = True
    dataset: str | None = None
    # model (ignored when resuming from the state dir or starting from --ckpt)
    ckpt: Path | None = None
    model: str = "unet"
    width: int = 16
    depth: int = 2
    layers: int = 10
    residual: bool = False
    grid_size: int = 4
    mask_mode: str = "interpolate"
    mask_as_input: bool = False
    context_frames: int = 1  # frames of a series the network sees; centred: waits (K-1)/2
    causal_context: bool = False  # neighbours from the past only: no wait for later frames
    context_flush_seconds: float = 2.0  # a frame waits at most this long for later neighbours
    normalize: str = "meanstd"
    no_scale_integers: bool = False
    # online training
    train: bool = True
    cold_start: bool = True  # from scratch: a calibrated classical denoiser writes frames
    #                          until the network's held-out loss beats it
    model_from: Path | None = None  # fan-out: adopt the checkpoints of the training worker
    patch: int = 64
    batch: int = 8
    lr: float = 1e-3
    publish_every: int = 50  # training steps between model versions
    checkpoint_every: float = 60.0  # seconds between checkpoints in the state dir
    buffer_frames: int = 256
    buffer_mb: int = 512
    # inference and output
    queue_size: int = 64  # frames waiting for inference; a full queue stalls the source
    max_batch: int = 0  # frames per forward pass when they queue up; 0: 8 on CUDA, 1 on CPU
    drop_when_full: bool = False  # drop (counted, logged) instead of holding the source back
    series_idle_close: float = 300.0  # close an output after this long without frames
    min_free_mb: float = 64.0  # hold writing (and so reading) below this free output space
    jinv: bool = False
    compile: bool = False  # torch.compile the inference model (faster; compiles at start
    #                        and at each new frame shape, ~20 s each on 2 CPU cores)
    engine: str = "torch"  # "onnxruntime": forward passes by ONNX Runtime (CPU, extra [onnx])
    onnx_reload_seconds: float = 10.0  # onnxruntime: new weights (a new export) at most this often
    require_reconstructable: bool = False
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    seed: int = 0

    def __post_init__(self) -> None:
        try:
            self.model_config()
            self.masker_config()
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        if self.normalize not in NORMALIZE_MODES:
            raise UsageError(f"normalize must be one of {NORMALIZE_MODES}")
        if self.zmq_protocol not in ("native", "dectris-stream1", "dectris-stream2"):
            raise UsageError(f"zmq_protocol {self.zmq_protocol!r}: expected native, "
                             "dectris-stream1 or dectris-stream2")
        if self.engine not in ENGINES:
            raise UsageError(f"engine {self.engine!r}: expected one of {', '.join(ENGINES)}")
        if self.engine == "onnxruntime" and self.compile:
            raise UsageError("compile applies to the torch engine, not to onnxruntime")
        if self.max_batch < 0:
            raise UsageError(f"max_batch {self.max_batch}: must be >= 0 (0 = by device)")
        if self.zmq_max_message_mb < 1:
            raise UsageError(f"zmq_max_message_mb {self.zmq_max_message_mb}: must be >= 1")
        if self.zmq_socket not in ("pull", "sub"):
            raise UsageError(f"zmq_socket {self.zmq_socket!r}: expected pull or sub")
        if self.queue_size < 1 or self.buffer_frames < 2 or self.publish_every < 1:
            raise UsageError("queue_size >= 1, buffer_frames >= 2, publish_every >= 1 needed")

    def model_config(self) -> ModelConfig:
        """Architecture of a model started from scratch."""
        return ModelConfig(name=self.model, in_channels=self.masker_config().in_channels,
                           width=self.width, depth=self.depth, layers=self.layers,
                           residual=self.residual)

    def masker_config(self) -> MaskerConfig:
        """Masking of a model started from scratch."""
        return MaskerConfig(self.grid_size, self.mask_mode, self.mask_as_input,
                            self.context_frames, self.causal_context)


def daemon_env_options(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Daemon options given as ``N2S_<OPTION>``; other N2S_ variables are not ours."""
    environ = os.environ if environ is None else environ
    names = {f.name for f in fields(DaemonConfig)}
    return {key[4:].lower(): value for key, value in environ.items()
            if key.startswith("N2S_") and key[4:].lower() in names}


def build(cls: type[T], layers: list[tuple[str, Mapping[str, Any]]]) -> T:
    """Build ``cls`` from mappings applied in order (later wins); each is named for errors.

    Raises `UsageError` naming the source and key of an unknown option or a bad value.
    """
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for source, mapping in layers:
        for key, raw in mapping.items():
            name = key.replace("-", "_")
            if name not in hints:
                raise UsageError(f"{source}: unknown option {key!r}")
            values[name] = _coerce(raw, hints[name], f"{source}: option {key!r}")
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    text = str(hint)
    optional = "None" in text
    if value is None:
        if optional:
            return None
        raise UsageError(f"{where}: a value is required")
    try:
        if "Path" in text:
            return Path(value)
        if "bool" in text:
            return _to_bool(value)
        if "int" in text and "float" not in text:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if "float" in text:
            return float(value)
        if "str" in text:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}: invalid value {value!r} (expected {text})") from exc
    return value


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def read_toml_table(path: Path, table: str) -> dict[str, Any]:
    """The ``[table]`` of a TOML file (empty if absent); errors name the file."""
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: config file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: invalid TOML: {exc}") from exc
    section = document.get(table, {})
    if not isinstance(section, dict):
        raise UsageError(f"{path}: [{table}] must be a table")
    return section


def env_options(command: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Options given as ``N2S_<COMMAND>_<OPTION>`` environment variables."""
    environ = os.environ if environ is None else environ
    prefix = f"N2S_{command.upper()}_"
    return {
        key[len(prefix) :].lower(): value for key, value in environ.items()
        if key.startswith(prefix)
    }


def as_toml(config: object, table: str) -> str:
    """The effective options as a TOML table, for output files and logs."""
    lines = [f"[{table}]"]
    for field in fields(config):  # type: ignore[arg-type]
        value = getattr(config, field.name)
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines.append(f"{field.name} = {text}")
    return "\n".join(lines) + "\n"


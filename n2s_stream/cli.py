"""Command line: parse arguments, layer them over config file and environment, run.

Exit status: 0 success, 2 usage or config error, 1 runtime failure; every deliberate
error is printed as one line naming what and why.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

from n2s_stream import __version__
from n2s_stream.config import (
    ENGINES,
    DaemonConfig,
    DenoiseConfig,
    TrainConfig,
    build,
    daemon_env_options,
    env_options,
    read_toml_table,
)
from n2s_stream.errors import N2SError, UsageError
from n2s_stream.models import MODEL_NAMES
from n2s_stream.n2s.masking import MASK_MODES
from n2s_stream.n2s.normalize import NORMALIZE_MODES

log = logging.getLogger("n2s_stream")

COMMANDS = ("train", "denoise", "simulate", "demo", "check-config", "merge")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML file; its [<command>] table is read")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")


def _train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train a denoiser on a noisy HDF5 stack (self-supervised)",
                       argument_default=argparse.SUPPRESS)
    _common(p)
    p.add_argument("--h5", type=Path, help="input HDF5 file")
    p.add_argument("--dataset", help="frame dataset path (default: discovered)")
    p.add_argument("--max-samples", type=int, help="frames used for training (default 1000)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--model", choices=MODEL_NAMES, help="architecture (default unet)")
    p.add_argument("--width", type=int, help="channels of the first level (default 16)")
    p.add_argument("--depth", type=int, help="UNet down-samplings (default 2)")
    p.add_argument("--layers", type=int, help="DnCNN conv layers (default 10)")
    p.add_argument("--residual", action="store_true", help="add the input to the output")
    p.add_argument("--batch-norm", action="store_true", help="batch normalisation layers")
    p.add_argument("--grid-size", type=int, help="mask grid spacing (default 4)")
    p.add_argument("--mask-mode", choices=MASK_MODES, help="fill of hidden pixels")
    p.add_argument("--mask-as-input", action="store_true", help="mask as an extra input channel")
    p.add_argument("--context-frames", type=int,
                   help="frames of the series seen at once: centre + neighbours (default 1)")
    p.add_argument("--causal-context", action="store_true",
                   help="neighbours from earlier frames only")
    p.add_argument("--patch", type=int, help="patch size; 0 = full frames (default 64)")
    p.add_argument("--batch", type=int, help="patches per step (default 8)")
    p.add_argument("--epochs", type=int, help="epochs (default 10)")
    p.add_argument("--steps-per-epoch", type=int, help="default: one pass over the pixels")
    p.add_argument("--max-seconds", type=float, help="stop after this much training time")
    p.add_argument("--lr", type=float, help="peak learning rate, cosine decay (default 3e-3)")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--val-frac", type=float, help="fraction of frames held out for validation")
    p.add_argument("--save-best", action="store_true", help="also keep ckpt_best.pt")
    p.add_argument("--early-stop-patience", type=int, help="epochs without gain before stop")
    p.add_argument("--early-stop-min-delta", type=float, help="smallest loss gain that counts")
    p.add_argument("--normalize", choices=NORMALIZE_MODES, help="default meanstd")
    p.add_argument("--no-scale-integers", action="store_true",
                   help="do not divide integer input by its dtype maximum")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--out-dir", type=Path, help="checkpoint folder (default runs/noise2self)")
    p.add_argument("--ckpt", type=Path, help="start from this checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")


def _denoise_parser(sub: Any) -> None:
    p = sub.add_parser("denoise", help="denoise an HDF5 stack with a trained checkpoint",
                       argument_default=argparse.SUPPRESS)
    _common(p)
    p.add_argument("--h5", type=Path, help="input HDF5 file")
    p.add_argument("--ckpt", type=Path, help="checkpoint from n2s-stream train")
    p.add_argument("--out", type=Path, help="output file or folder (default: <input>_n2s.h5)")
    p.add_argument("--dataset", help="frame dataset path (default: discovered)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--batch", type=int, help="frames per forward pass (default 8)")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--jinv", action="store_true",
                   help="J-invariant inference (grid_size**2 passes; never sees the pixel)")
    p.add_argument("--require-reconstructable", action="store_true",
                   help="write in the input's dtype and counts; needs an exact normalisation")
    p.add_argument("--engine", choices=ENGINES,
                   help="torch (default) or onnxruntime: CPU forward passes by ONNX Runtime "
                        "(pip install 'n2s-stream[onnx]')")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")


def _simulate_parser(sub: Any) -> None:
    p = sub.add_parser("simulate", help="test detector: write noisy frames (truth kept aside)"
                       " or send them over ZeroMQ")
    p.add_argument("--dir", type=Path, help="folder to write into")
    p.add_argument("--zmq-bind", help="send over ZeroMQ instead: PUSH bound here")
    p.add_argument("--protocol", default="native",
                   choices=("native", "dectris-stream1", "dectris-stream2"))
    p.add_argument("--series", type=int, default=1, help="series sent back to back (ZeroMQ)")
    p.add_argument("--encoding", default="bslz4", choices=("raw", "bslz4", "lz4"),
                   help="payload encoding of the native protocol")
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--shape", default="128x128", help="HxW (default 128x128)")
    p.add_argument("--dose", type=float, default=20.0, help="mean counts at the brightest pixel")
    p.add_argument("--rate", type=float, default=0.0, help="frames/s; 0 = as fast as possible")
    p.add_argument("--layout", default="areadetector", choices=("areadetector", "eiger", "plain"))
    p.add_argument("--name", default="scan_0001", help="series name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="INFO")


def _demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="simulate a detector and watch denoising quality improve")
    p.add_argument("--dir", type=Path, default=Path("demo-output"), help="working folder")
    p.add_argument("--seconds", type=float, default=60.0, help="acquisition length")
    p.add_argument("--context-frames", type=int, default=1,
                   help="K > 1: a second daemon with K-frame temporal context, side by side")
    p.add_argument("--log-level", default="WARNING")


DAEMON_HELP = {
    "watch": "acquisition directory to follow",
    "out": "output directory (default ./denoised)",
    "state_dir": "checkpoints and ledger (default ./n2s-state)",
    "device": "cpu, cuda, cuda:N or auto (default)",
    "metrics_port": "Prometheus port (default 9750; 0 any free port; -1 none)",
    "metrics_addr": "metrics bind address (default 127.0.0.1, loopback only)",
    "poll": "poll the directory every N s instead of inotify (auto on NFS/GPFS/Lustre)",
    "pattern": "file name glob (default *)",
    "settle_seconds": "a file that has not grown this long is finished (default 5)",
    "process_existing": "process files already present at start (default yes)",
    "ckpt": "start from an offline checkpoint (n2s-stream train)",
    "train": "keep training online (default yes); --no-train: inference only",
    "cold_start": "from scratch, write a calibrated classical denoiser's result until the "
                  "network's held-out loss beats it (default yes)",
    "context_frames": "frames of a series the network sees at once (default 1); centred "
                      "context delays each frame by (K-1)/2 frames",
    "causal_context": "context from earlier frames only: no added latency",
    "compile": "torch.compile the inference model (opt-in; ~20 s compile per frame shape)",
    "engine": "torch (default) or onnxruntime: CPU forward passes by ONNX Runtime, 1.3-1.5x "
              "faster here (pip install 'n2s-stream[onnx]')",
    "onnx_reload_seconds": "onnxruntime: take new weights (a new export, 0.1-0.5 s) at most "
                           "this often (default 10)",
    "shared_feed": "one of several workers PULLing one feed: others' frames are not missing",
    "publish_every": "training steps between model versions (default 50)",
    "checkpoint_every": "seconds between checkpoints (default 60)",
    "queue_size": "frames waiting for inference before the source is held back",
    "threads": "torch intra-op threads (default: torch's choice)",
}


def _daemon_options(parser: argparse.ArgumentParser) -> None:
    """One option per `DaemonConfig` field, so file, environment and CLI stay one-to-one."""
    group = parser.add_argument_group("daemon (n2s-stream --watch DIR ...)")
    group.add_argument("--config", type=Path, help="TOML file ([daemon] table)")
    group.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    hints = get_type_hints(DaemonConfig)
    for field in fields(DaemonConfig):
        flag = "--" + field.name.replace("_", "-")
        hint = str(hints[field.name])
        help_text = DAEMON_HELP.get(field.name, f"(default {field.default})")
        if "bool" in hint:
            group.add_argument(flag, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            kind = (Path if "Path" in hint else int if "int" in hint
                    else float if "float" in hint else str)
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)


def _merge_parser(sub: Any) -> None:
    p = sub.add_parser("merge", help="join the shards of a fanned-out series (virtual dataset)")
    p.add_argument("shards", type=Path, nargs="+", help="output files of the workers")
    p.add_argument("--out", type=Path, required=True, help="merged file to write")
    p.add_argument("--log-level", default="INFO")


def _check_config_parser(sub: Any) -> None:
    p = sub.add_parser("check-config", help="validate a config file and print it resolved")
    p.add_argument("file", type=Path)
    p.add_argument("--log-level", default="WARNING")


def make_parser() -> argparse.ArgumentParser:
    """The full command-line parser."""
    parser = argparse.ArgumentParser(
        prog="n2s-stream",
        description="Self-supervised (Noise2Self) denoising of detector frames. Without a "
                    "command, runs the streaming daemon.",
    )
    parser.add_argument("--version", action="version", version=f"n2s-stream {__version__}")
    _daemon_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _check_config_parser(sub)
    _merge_parser(sub)
    _train_parser(sub)
    _denoise_parser(sub)
    _simulate_parser(sub)
    _demo_parser(sub)
    return parser


def _layered(cls: type, command: str, args: argparse.Namespace) -> Any:
    """Defaults < config file < N2S_<COMMAND>_* environment < command line."""
    cli = {k: v for k, v in vars(args).items() if k not in ("command", "config", "log_level")}
    layers: list[tuple[str, dict[str, Any]]] = []
    config_file = getattr(args, "config", None)
    if config_file is not None:
        layers.append((str(config_file), read_toml_table(config_file, command)))
    layers.append(("environment", env_options(command)))
    layers.append(("command line", cli))
    return build(cls, layers)


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError as exc:
        raise UsageError(f"--shape {text!r}: expected HxW, e.g. 256x256") from exc
    if height < 8 or width < 8:
        raise UsageError(f"--shape {text!r}: frames must be at least 8x8")
    return height, width


def _daemon_config(args: argparse.Namespace) -> DaemonConfig:
    cli = {k: v for k, v in vars(args).items() if k not in ("command", "config", "log_level")}
    layers: list[tuple[str, dict[str, Any]]] = []
    if args.config is not None:
        layers.append((str(args.config), read_toml_table(args.config, "daemon")))
    layers.append(("environment", daemon_env_options()))
    layers.append(("command line", cli))
    return build(DaemonConfig, layers)


def _check_config(path: Path) -> None:
    """Every table of the file must build; prints the resolved options."""
    from n2s_stream.config import as_toml

    for table, cls in (("daemon", DaemonConfig), ("train", TrainConfig),
                       ("denoise", DenoiseConfig)):
        print(as_toml(build(cls, [(str(path), read_toml_table(path, table))]), table))
    unknown = set(_toml_tables(path)) - {"daemon", "train", "denoise"}
    if unknown:
        raise UsageError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}")
    print(f"{path}: OK")


def _toml_tables(path: Path) -> list[str]:
    from n2s_stream.config import tomllib

    with open(path, "rb") as handle:
        return list(tomllib.load(handle))


def _run(args: argparse.Namespace) -> int:
    if args.command is None:
        from n2s_stream.daemon import Daemon

        return Daemon(_daemon_config(args)).run()
    if args.command == "check-config":
        _check_config(args.file)
    elif args.command == "merge":
        from n2s_stream.merge import merge_shards

        result = merge_shards(args.shards, args.out)
        print(f"{result.out}: {result.n_frames} frames from {len(args.shards)} shards"
              + (f", missing {result.missing}" if result.missing else ""))
    elif args.command == "train":
        from n2s_stream.offline import train

        result = train(_layered(TrainConfig, "train", args))
        print(f"checkpoints: {result.last}" + (f", {result.best}" if result.best else ""))
    elif args.command == "denoise":
        from n2s_stream.offline import denoise

        result = denoise(_layered(DenoiseConfig, "denoise", args))
        print(f"wrote {result.n_frames} frames to {result.out}")
    elif args.command == "simulate" and args.zmq_bind:
        from n2s_stream.simulate import ZmqSimulateConfig, simulate_zmq

        sent = simulate_zmq(ZmqSimulateConfig(
            endpoint=args.zmq_bind, protocol=args.protocol, frames=args.frames,
            series=args.series, shape=_parse_shape(args.shape), dose=args.dose, rate=args.rate,
            encoding=args.encoding, seed=args.seed))
        print(f"sent {sent} frames to {args.zmq_bind}")
    elif args.command == "simulate":
        from n2s_stream.simulate import SimulateConfig, simulate

        if args.dir is None:
            raise UsageError("simulate: give --dir DIR or --zmq-bind ENDPOINT")
        path = simulate(SimulateConfig(
            dir=args.dir, frames=args.frames, shape=_parse_shape(args.shape), dose=args.dose,
            rate=args.rate, layout=args.layout, name=args.name, seed=args.seed,
        ))
        print(f"wrote {args.frames} frames to {path}")
    elif args.command == "demo":
        from n2s_stream.demo import run_demo

        run_demo(args.dir, seconds=args.seconds, context_frames=args.context_frames)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``n2s-stream``; returns the exit status."""
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    name = f"n2s-stream {args.command}" if args.command else "n2s-stream"
    try:
        return _run(args)
    except UsageError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except N2SError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130

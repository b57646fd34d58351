"""The model's own speed on this machine: forward frames/s and achieved GFLOP/s per frame
size, against the machine's measured float32 matmul peak, for a few execution variants
(float32, channels_last, bfloat16 autocast, torch.compile, and ONNX Runtime where the
optional extra is installed: ``pip install -e '.[onnx]'``). The ceiling the daemon is
compared with.

    python benchmarks/model_speed.py                 # 256, 512, 1024, 2048
    python benchmarks/model_speed.py --sizes 64 --seconds 0.5   # smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from common import RESULTS, calls_per_second, with_provenance
from torch.utils.flop_counter import FlopCounterMode

from n2s_stream.models import build_model, count_parameters
from n2s_stream.n2s.specs import ModelConfig


def matmul_peak_gflops(n: int = 2048, seconds: float = 2.0) -> float:
    """float32 GFLOP/s of torch.mm on n x n matrices: the machine's practical peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - started) / 1e9


def forward_flops(model: torch.nn.Module, size: int) -> int:
    """FLOPs of one forward pass on a (1, 1, size, size) frame (torch's flop counter)."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.randn(1, 1, size, size))
    return int(counter.get_total_flops())


def onnxruntime_fps(model: torch.nn.Module, size: int, seconds: float) -> float:
    """Forward passes per second of the model exported to ONNX and run by ONNX Runtime's
    CPU provider with torch's thread count (its output checked against torch's); exporting
    is not timed."""
    import onnxruntime

    x = torch.randn(1, 1, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/model.onnx"
        torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"], dynamo=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    with torch.inference_mode():
        expected = model(x).numpy()
    difference = float(abs(session.run(None, feed)[0] - expected).max())
    if difference > 1e-3:  # a fast wrong answer is no answer
        raise RuntimeError(f"ONNX Runtime output differs from torch's by {difference:g}")
    return calls_per_second(lambda: session.run(None, feed), seconds)


def frames_per_second(model: torch.nn.Module, size: int, variant: str, seconds: float) -> float:
    """Forward passes per second, one frame at a time, in ``variant``."""
    if variant == "onnxruntime":
        return onnxruntime_fps(model, size, seconds)
    x = torch.randn(1, 1, size, size)
    if variant in ("channels_last", "compiled"):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if variant == "compiled":  # torch.compile (inductor); compiling is not timed
        model = torch.compile(model)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if variant == "bf16" else nullcontext()
    with torch.inference_mode(), context:
        model(x)
        return calls_per_second(lambda: model(x), seconds)


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["float32", "channels_last", "bf16", "compiled", "onnxruntime"],
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "model_speed.json")
    args = parser.parse_args()
    if "onnxruntime" in args.variants and importlib.util.find_spec("onnxruntime") is None:
        print("onnxruntime not installed (pip install -e '.[onnx]'): variant left out")
        args.variants.remove("onnxruntime")
    config = ModelConfig()
    model = build_model(config).eval()
    peak = matmul_peak_gflops()
    print(
        f"default UNet ({count_parameters(model)} parameters), {torch.get_num_threads()} "
        f"threads; float32 matmul peak {peak:.1f} GFLOP/s"
    )
    print(
        f"{'size':>6} {'variant':>14} {'frames/s':>9} {'GFLOP/frame':>12} {'GFLOP/s':>8} "
        f"{'of peak':>8}"
    )
    rows = []
    for size in args.sizes:
        flops = forward_flops(model, size)
        for variant in args.variants:
            fps = frames_per_second(build_model(config).eval(), size, variant, args.seconds)
            rows.append(
                {
                    "size": size,
                    "variant": variant,
                    "fps": fps,
                    "gflop_per_frame": flops / 1e9,
                    "gflops": fps * flops / 1e9,
                    "fraction_of_peak": fps * flops / 1e9 / peak,
                }
            )
            r = rows[-1]
            print(
                f"{size:6d} {variant:>14} {fps:9.2f} {r['gflop_per_frame']:12.2f} "
                f"{r['gflops']:8.1f} {r['fraction_of_peak']:8.0%}",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            with_provenance(
                {
                    "benchmark": "model_speed",
                    "machine": platform.machine(),
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "matmul_peak_gflops": peak,
                    "model": config.to_dict(),
                    "rows": rows,
                    "settings": vars(args) | {"out": str(args.out)},
                }
            ),
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

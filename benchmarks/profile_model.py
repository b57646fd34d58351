"""Where the model's time goes: torch.profiler over the daemon's two kinds of work.

1. inference: the default UNet's forward pass on one frame, as the daemon runs it on CPU
   (channels_last, ``torch.inference_mode``), per ``--sizes``;
2. training: one masked Noise2Self step as the trainer takes it (``training.train_step``:
   mask, forward, masked MSE, backward, Adam) on a batch of patches, in three variants:
   the contiguous layout with torch's default Adam, channels_last, and channels_last with
   the fused Adam kernel; timed in alternating rounds so the machine's speed levels
   (machine_noise.py) fall on each.

Prints the operators with the most self CPU time for each, and the training steps/s of
each variant; writes ``benchmarks/results/profile_model.json``.

    python benchmarks/profile_model.py                        # 256 and 1024, batch 8 of 64x64
    python benchmarks/profile_model.py --sizes 64 --passes 2 --rounds 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, calls_per_second, daemon_model, with_provenance
from torch.profiler import ProfilerActivity, profile

from n2s_stream.config import TrainConfig
from n2s_stream.models import build_model
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.specs import ModelConfig
from n2s_stream.n2s.training import train_step


def top_operators(work: Callable[[], object], passes: int, top: int) -> dict:
    """Profile ``passes`` calls of ``work``; the ``top`` operators by self CPU time, each
    with its share of the total, and the mean wall time of one call."""
    work()  # oneDNN sets up its kernels on the first call
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(passes):
            work()
    seconds = (time.perf_counter() - started) / passes
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "seconds_per_call": seconds,
        "operators": [
            {"name": e.key, "share": e.self_cpu_time_total / total, "calls": e.count // passes}
            for e in events[:top]
        ],
    }


def inference_work(size: int) -> Callable[[], object]:
    """The daemon's forward pass on one ``size`` x ``size`` frame."""
    model = daemon_model()
    x = torch.randn(1, 1, size, size)

    def work() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return work


TRAINING_VARIANTS = {
    "contiguous": (False, False),
    "channels_last": (True, False),
    "channels_last+fused_adam": (True, True),
}


def training_work(batch: int, patch: int, variant: str) -> Callable[[], object]:
    """One trainer step on ``batch`` random ``patch`` x ``patch`` patches, in a variant of
    ``TRAINING_VARIANTS`` (layout, Adam kernel)."""
    channels_last, fused = TRAINING_VARIANTS[variant]
    defaults = TrainConfig()
    model = build_model(ModelConfig())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=defaults.lr, fused=fused or None)
    masker = Masker()
    patches = torch.rand(batch, 1, patch, patch)
    rng = np.random.default_rng(0)
    return lambda: train_step(model, optimizer, masker, patches, rng=rng)


def print_operators(title: str, result: dict) -> None:
    """A workload's heading and its operators."""
    print(f"\n{title}: {result['seconds_per_call'] * 1000:.1f} ms per call (profiled)")
    for op in result["operators"]:
        print(f"  {op['share']:6.1%}  {op['calls']:4d} calls  {op['name']}")


def main() -> None:
    """Profile inference per size and a training step in both layouts; print, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch", type=int, default=TrainConfig().batch)
    parser.add_argument("--patch", type=int, default=TrainConfig().patch)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=20, help="profiled calls per workload")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6, help="alternating timing rounds")
    parser.add_argument("--round-seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "profile_model.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report: dict = {
        "benchmark": "profile_model",
        "machine": f"{platform.machine()}, {args.threads} torch threads, torch {torch.__version__}",
        "settings": vars(args) | {"out": str(args.out)},
        "inference": {},
    }
    for size in args.sizes:
        passes = max(2, args.passes * 256 * 256 // (size * size))
        report["inference"][size] = top_operators(inference_work(size), passes, args.top)
        print_operators(f"inference, {size}x{size} frame", report["inference"][size])
    layouts = {
        variant: training_work(args.batch, args.patch, variant) for variant in TRAINING_VARIANTS
    }
    report["training"] = {}
    for layout, work in layouts.items():
        report["training"][layout] = top_operators(work, args.passes, args.top)
        print_operators(
            f"training step, batch {args.batch} of {args.patch}x{args.patch}, {layout}",
            report["training"][layout],
        )
    rates: dict[str, list[float]] = {layout: [] for layout in layouts}
    for _ in range(args.rounds):
        for layout, work in layouts.items():
            rates[layout].append(calls_per_second(work, args.round_seconds))
    ratios = {
        f"{variant} / contiguous": [v / c for c, v in zip(rates["contiguous"], values, strict=True)]
        for variant, values in rates.items()
        if variant != "contiguous"
    }
    report["training_steps_per_second"] = rates
    report["training_ratios"] = ratios
    print(f"\ntraining steps/s in {args.rounds} alternating rounds of {args.round_seconds:g} s:")
    for name, values in rates.items():
        print(f"  {name:>36}: " + " ".join(f"{v:6.1f}" for v in values))
    for name, values in ratios.items():
        print(f"  {name:>36}: " + " ".join(f"{v:6.2f}" for v in values))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(with_provenance(report), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

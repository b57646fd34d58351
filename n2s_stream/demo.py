"""``n2s-stream demo``: a simulated detector, a denoiser learning from it, quality live.

Until the streaming daemon lands this demo trains offline on a simulated series; it prints
one table row per epoch so a new user watches PSNR against the hidden truth rise from
the noisy input's level, then writes the denoised series.
"""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from n2s_stream.config import DenoiseConfig, TrainConfig
from n2s_stream.inference import denoise_normalized
from n2s_stream.n2s.masking import Masker
from n2s_stream.offline import EpochReport, denoise, train
from n2s_stream.quality import psnr
from n2s_stream.simulate import SimulateConfig, simulate, truth_path
from n2s_stream.stack import open_stack

DEMO_FRAMES = 48
DEMO_SHAPE = (128, 128)
DEMO_DOSE = 20.0
EVAL_FRAMES = 8


def run_demo(work_dir: Path, *, seconds: float = 40.0) -> None:
    """Simulate, train for ``seconds`` while printing quality, then denoise the series."""
    work_dir = Path(work_dir)
    started = time.monotonic()
    source = simulate(SimulateConfig(dir=work_dir / "acq", frames=DEMO_FRAMES, shape=DEMO_SHAPE,
                                     dose=DEMO_DOSE))
    with h5py.File(truth_path(source), "r") as handle:
        truth = handle["clean"][:EVAL_FRAMES] * DEMO_DOSE  # counts
    with open_stack(source) as stack:
        noisy = stack.read(0, EVAL_FRAMES).astype(np.float32)
    print(f"simulated {DEMO_FRAMES} frames {DEMO_SHAPE[0]}x{DEMO_SHAPE[1]}, Poisson dose "
          f"{DEMO_DOSE:g} counts, into {source}")
    print(f"{'elapsed':>8} {'epoch':>5} {'steps':>6} {'train loss':>10} {'val loss':>9} "
          f"{'PSNR noisy':>10} {'PSNR n2s':>9}")
    noisy_psnr = psnr(truth, noisy, data_range=DEMO_DOSE)
    config = TrainConfig(
        h5=source, device="cpu", width=16, depth=2, patch=48, batch=8, epochs=100,
        steps_per_epoch=60, max_seconds=seconds, val_frac=0.1, save_best=True,
        out_dir=work_dir / "runs", progress=False,
    )

    def report(epoch: EpochReport, model: nn.Module) -> None:
        from n2s_stream.checkpoint import load_checkpoint

        normalizer = load_checkpoint(work_dir / "runs" / "ckpt_last.pt").normalizer
        denoised = normalizer.inverse(denoise_normalized(
            model, Masker(config.masker_config()), normalizer.forward(noisy), jinv=False,
            device=torch.device("cpu"),
        ))
        print(f"{time.monotonic() - started:7.1f}s {epoch.epoch:5d} {epoch.step:6d} "
              f"{epoch.train_loss:10.4f} {epoch.val_loss or 0:9.4f} {noisy_psnr:9.2f}dB "
              f"{psnr(truth, denoised, data_range=DEMO_DOSE):7.2f}dB", flush=True)

    result = train(config, on_epoch=report)
    out = denoise(DenoiseConfig(h5=source, ckpt=result.best or result.last,
                                out=work_dir / "out", device="cpu", progress=False))
    with h5py.File(out.out, "r") as handle:
        denoised = handle["/entry/data/data"][:EVAL_FRAMES]
    print(f"wrote {out.n_frames} denoised frames to {out.out}: PSNR {noisy_psnr:.2f} dB noisy "
          f"-> {psnr(truth, denoised, data_range=DEMO_DOSE):.2f} dB denoised")

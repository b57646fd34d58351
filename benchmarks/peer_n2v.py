"""CAREamics Noise2Void (and N2V2) on given noisy stacks, for ``peer_quality.py`` to score.

Runs inside the peer's own virtual environment (``make bench-peers`` makes ``.venv-peers``:
CAREamics pins an older torch than n2s-stream), so it needs only numpy and careamics: it
reads the noisy stacks from an ``.npz`` (one array per dose), trains N2V on each stack for a
fixed wall-clock budget, denoises the same stack and writes the results to another ``.npz``
plus a JSON of training facts. The scoring against the clean tiles happens in the caller.
``--variants n2v n2v2`` runs both: N2V2 (Hoeck et al. 2022; ``use_n2v2=True``: blur-pool
UNet without the top skip, median pixel replacement) is the variant CAREamics recommends
against N2V's checkerboard artefacts.

    .venv-peers/bin/python benchmarks/peer_n2v.py --data noisy.npz --out denoised.npz \
        --budget 90 --variants n2v n2v2
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from careamics import CAREamist
from careamics.config import create_n2v_config
from lightning.pytorch.callbacks import Callback


class StopAfter(Callback):
    """Stop training once a wall-clock budget is spent (checked after every batch), so the
    peer gets the same training time as n2s-stream on the same machine."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = 0.0
        self.steps = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1
        if time.perf_counter() - self.started > self.seconds:
            trainer.should_stop = True


def train_and_denoise(
    noisy: np.ndarray, budget: float, patch: int, batch: int, work_dir: Path, n2v2: bool = False
) -> tuple[np.ndarray, dict]:
    """N2V (or N2V2) as its documentation sets it up for a 2-D stack (``axes="SYX"``),
    trained for ``budget`` seconds, then applied to the whole stack."""
    config = create_n2v_config(
        experiment_name="peer_n2v2" if n2v2 else "peer_n2v",
        data_type="array",
        axes="SYX",
        patch_size=[patch, patch],
        batch_size=batch,
        num_epochs=10_000,
        use_n2v2=n2v2,
    )
    stop = StopAfter(budget)
    careamist = CAREamist(config, work_dir=work_dir, callbacks=[stop], enable_progress_bar=False)
    started = time.perf_counter()
    careamist.train(train_data=noisy)
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    predictions, _ = careamist.predict(noisy, axes="SYX", batch_size=16)
    denoised = np.concatenate([np.asarray(p).reshape(-1, *noisy.shape[-2:]) for p in predictions])
    facts = {
        "train_seconds": train_seconds,
        "steps": stop.steps,
        "predict_seconds": time.perf_counter() - started,
        "patch": patch,
        "batch": batch,
    }
    return denoised.astype(np.float32), facts


def main() -> None:
    """Denoise every stack in ``--data``; write ``--out`` (.npz) and its ``.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=90.0, help="training seconds per stack")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--variants", nargs="+", choices=["n2v", "n2v2"], default=["n2v"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    stacks = dict(np.load(args.data))
    denoised, facts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            for name, noisy in stacks.items():
                key = f"{variant}__{name}"
                denoised[key], facts[key] = train_and_denoise(
                    noisy.astype(np.float32),
                    args.budget,
                    args.patch,
                    args.batch,
                    Path(tmp) / key,
                    n2v2=variant == "n2v2",
                )
                print(
                    f"{key}: {facts[key]['steps']} steps in {facts[key]['train_seconds']:.0f} s",
                    flush=True,
                )
    np.savez(args.out, **denoised)
    import careamics

    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "careamics": careamics.__version__,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "stacks": facts,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

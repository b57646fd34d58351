"""The commands besides the daemon: offline `train` and `denoise` (`offline`), the
simulated detector (`simulate`), the demo (`demo`), and `merge` (one virtual dataset over
the outputs of several fan-out workers)."""

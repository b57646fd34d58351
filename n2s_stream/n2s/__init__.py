"""Pure computation, no I/O and no threads: the Noise2Self math (masking, loss,
normalisation, temporal context and its registration, tiling, test-time augmentation,
un-blinding, Neighbor2Neighbor), the training step and its losses (`training`), the
optimiser and weight averaging (`optim`), the patches training learns from (`patches`),
the device and mixed precision (`device`), the one denoise path of
offline and live use (`denoising`), quality scores (`quality`), and the torch-free
descriptions of all of these that the config names (`specs`)."""

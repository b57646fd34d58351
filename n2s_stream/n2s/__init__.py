"""Pure tensor math of Noise2Self: masking, loss and normalisation. No I/O, no threads."""

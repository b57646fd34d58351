"""Fault injection: kills, a full disk, a read-only state dir, bad input, real systemd."""

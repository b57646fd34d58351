"""Tests of pure functions and single classes, in-process: no daemon subprocess, no peers."""

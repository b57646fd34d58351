"""Tests of the daemon and commands as subprocesses, with real sockets, files and peers."""

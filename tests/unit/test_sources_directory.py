"""Directory source details that need no daemon process."""

from __future__ import annotations

from pathlib import Path

from n2s_stream.sources.directory import NETWORK_FILESYSTEMS, filesystem_type

MOUNTS = """\
/dev/sda1 / ext4 rw 0 0
server:/export /data nfs4 rw 0 0
fs1 /gpfs/beamline gpfs rw 0 0
/dev/sdb1 /data/local xfs rw 0 0
"""


def test_network_file_systems_are_detected_by_longest_mount_prefix():
    assert filesystem_type(Path("/data/acq/run1"), MOUNTS) == "nfs4"
    assert filesystem_type(Path("/data/local/x"), MOUNTS) == "xfs"
    assert filesystem_type(Path("/gpfs/beamline/acq"), MOUNTS) == "gpfs"
    assert filesystem_type(Path("/home/user"), MOUNTS) == "ext4"
    assert {"nfs4", "gpfs", "lustre"} <= set(NETWORK_FILESYSTEMS)


def test_next_file_of_a_numbered_series():
    from n2s_stream.sources.directory import series_successor

    assert series_successor(Path("/a/scan_0006.h5"), Path("/a/scan_0007.h5"))
    assert series_successor(Path("/a/s_0009_master.h5"), Path("/a/s_0010_master.h5"))
    assert not series_successor(Path("/a/scan_0007.h5"), Path("/a/scan_0006.h5"))
    assert not series_successor(Path("/a/scan_0006.h5"), Path("/b/scan_0007.h5"))
    assert not series_successor(Path("/a/scan_0006.h5"), Path("/a/other_0007.h5"))

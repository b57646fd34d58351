"""The HDF5 reader: dataset discovery, shapes, filters, and one-line errors for bad files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import h5py
import hdf5plugin
import numpy as np
import pytest

from n2s_stream.errors import InputError
from n2s_stream.formats.stack import open_stack
from tests.helpers.daemon import write_stack

FRAMES = np.arange(6 * 5 * 7, dtype=np.uint16).reshape(6, 5, 7)


@pytest.mark.parametrize("dataset", ["/entry/data/data", "/data", "/X"])
def test_discovers_default_datasets(tmp_path, dataset):
    path = write_stack(tmp_path / "a.h5", FRAMES, dataset)
    with open_stack(path) as stack:
        assert stack.dataset_name == dataset
        assert stack.shape == (6, 5, 7) and stack.dtype == np.uint16
        assert np.array_equal(stack.read(0, 6), FRAMES)


def test_discovery_order_prefers_nexus(tmp_path):
    path = tmp_path / "both.h5"
    with h5py.File(path, "w") as handle:
        handle["/X"] = FRAMES[:2]
        handle["/data"] = FRAMES[:3]
        handle["/entry/data/data"] = FRAMES
    with open_stack(path) as stack:
        assert len(stack) == 6
    with open_stack(path, dataset="/X") as stack:
        assert len(stack) == 2


def test_four_d_is_flattened_and_two_d_is_one_frame(tmp_path):
    four = write_stack(tmp_path / "4d.h5", FRAMES.reshape(2, 3, 5, 7))
    with open_stack(four) as stack:
        assert stack.shape == (6, 5, 7)
        assert np.array_equal(stack.read(2, 5), FRAMES[2:5])  # spans the outer axis
        assert np.array_equal(stack.read_frames(np.array([1, 4])), FRAMES[[1, 4]])
    two = write_stack(tmp_path / "2d.h5", FRAMES[0])
    with open_stack(two) as stack:
        assert stack.shape == (1, 5, 7)
        assert np.array_equal(stack.read(0, 1)[0], FRAMES[0])


def test_chunked_iteration_covers_stack(tmp_path):
    path = write_stack(tmp_path / "a.h5", FRAMES)
    with open_stack(path) as stack:
        chunks = list(stack.iter_chunks(4))
    assert [start for start, _ in chunks] == [0, 4]
    assert np.array_equal(np.concatenate([c for _, c in chunks]), FRAMES)


def test_float_dtype(tmp_path):
    path = write_stack(tmp_path / "f.h5", FRAMES.astype(np.float64) / 3)
    with open_stack(path) as stack:
        assert stack.dtype == np.float64


def test_bitshuffle_lz4_eiger_master_with_two_data_files(tmp_path):
    """An Eiger filewriter series: master links data_000001/2, bitshuffle-LZ4 chunks."""
    for k, part in ((1, FRAMES[:4]), (2, FRAMES[4:])):
        with h5py.File(tmp_path / f"s_data_00000{k}.h5", "w") as handle:
            handle.create_dataset(
                "/entry/data/data",
                data=part,
                chunks=(1, 5, 7),
                **hdf5plugin.Bitshuffle(nelems=0, cname="lz4"),
            )
    with h5py.File(tmp_path / "s_master.h5", "w") as handle:
        for k in (1, 2):
            handle[f"/entry/data/data_00000{k}"] = h5py.ExternalLink(
                f"s_data_00000{k}.h5", "/entry/data/data"
            )
    with h5py.File(tmp_path / "s_data_000001.h5", "r") as handle:
        assert "32008" in handle["/entry/data/data"]._filters  # really bitshuffle
    with open_stack(tmp_path / "s_master.h5") as stack:
        assert stack.shape == (6, 5, 7)
        assert np.array_equal(stack.read(0, 6), FRAMES)  # bit-exact
        assert np.array_equal(stack.read(3, 5), FRAMES[3:5])  # across files


def _expect(path, reason, *words, dataset=None):
    with pytest.raises(InputError) as info:
        open_stack(path, dataset)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message
    assert info.value.reason == reason


def test_missing_dataset(tmp_path):
    path = write_stack(tmp_path / "a.h5", FRAMES, "/entry/other")
    _expect(path, "no_dataset", "no frame dataset", "/entry/data/data", "/X")
    _expect(path, "no_dataset", "'/nope'", dataset="/nope")


def test_wrong_rank(tmp_path):
    path = write_stack(tmp_path / "a.h5", np.zeros((2, 2, 2, 3, 4), np.uint8))
    _expect(path, "rank", "rank 5")


def test_non_numeric(tmp_path):
    path = write_stack(tmp_path / "a.h5", np.array([[b"ab", b"cd"]]))
    _expect(path, "dtype", "not numeric")


def test_truncated_file(tmp_path):
    path = write_stack(tmp_path / "a.h5", np.zeros((50, 64, 64), np.uint16))
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 3)
    _expect(path, "unreadable", "truncated or corrupt")


def test_truncated_data_is_a_read_error_naming_frames(tmp_path):
    path = tmp_path / "chunked.h5"
    write_stack(
        path,
        np.random.default_rng(0).integers(0, 1000, (40, 64, 64), np.uint16),
        chunks=(1, 64, 64),
        compression="gzip",
    )
    # Zero the tail of the file: metadata intact, late chunks corrupt.
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.seek(size // 2)
        handle.write(b"\0" * (size - size // 2))
    with open_stack(path) as stack, pytest.raises(InputError) as info:
        stack.read(0, 40)
    assert info.value.reason == "read_error" and "cannot read frames" in str(info.value)


def test_not_hdf5_missing_and_directory(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not hdf5" * 10)
    _expect(junk, "not_hdf5", "not an HDF5 file")
    _expect(tmp_path / "absent.h5", "missing", "no such file")
    _expect(tmp_path, "not_hdf5", "directory")


def test_missing_linked_data_file(tmp_path):
    with h5py.File(tmp_path / "m_master.h5", "w") as handle:
        handle["/entry/data/data_000001"] = h5py.ExternalLink("gone.h5", "/entry/data/data")
    _expect(tmp_path / "m_master.h5", "missing", "data_000001")


def test_unreadable_permissions(tmp_path):
    """Checked in a process whose file permissions apply (as root: without the
    capabilities that let root read anything)."""
    path = write_stack(tmp_path / "a.h5", FRAMES)
    path.chmod(0)
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root reads any file and setpriv is not available")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    code = (
        "import sys; from n2s_stream.formats.stack import open_stack\n"
        "try:\n    open_stack(sys.argv[1])\n"
        "except Exception as exc:\n    print(exc.reason, '|', exc)\n"
    )
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.strip() == f"unreadable | {path}: permission denied", proc.stderr


def test_eiger_pixel_mask_is_read(tmp_path):
    with h5py.File(tmp_path / "p_data_000001.h5", "w") as handle:
        handle["/entry/data/data"] = FRAMES
    with h5py.File(tmp_path / "p_master.h5", "w") as handle:
        handle["/entry/data/data_000001"] = h5py.ExternalLink(
            "p_data_000001.h5", "/entry/data/data"
        )
        mask = np.zeros((5, 7), np.uint32)
        mask[2, 3] = 1
        handle["/entry/instrument/detector/detectorSpecific/pixel_mask"] = mask
    with open_stack(tmp_path / "p_master.h5") as stack:
        assert stack.linked
        assert stack.pixel_mask is not None and stack.pixel_mask.sum() == 1
        assert stack.pixel_mask[2, 3]

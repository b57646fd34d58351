"""NTNDArray decoding (areaDetector over PVAccess): real p4p values, every codec, and the
refusals (lossy, colour, sizes checked before decompressing)."""

from __future__ import annotations

import zlib

import lz4.block
import numpy as np
import pytest

from n2s_stream.formats.codecs import MessageError, bslz4_encode
from n2s_stream.formats.ntndarray import decode, encode

p4p = pytest.importorskip("p4p", reason="optional extra [pva] not installed")
from p4p.nt import NTNDArray  # noqa: E402

FRAME = np.random.default_rng(0).poisson(30, (24, 40)).astype(np.uint16)  # (H, W)
USHORT = 6  # pvData ScalarType of uint16


def _value(
    frame=FRAME,
    codec="",
    payload=None,
    parameters=USHORT,
    unique_id=7,
    uncompressed=None,
    colour_mode=None,
):
    """An NTNDArray as NDPluginPva sends it: dimension[0] is x."""
    value = NTNDArray().wrap(frame)
    value["uniqueId"] = unique_id
    value["dataTimeStamp.secondsPastEpoch"] = 1_700_000_000
    value["dataTimeStamp.nanoseconds"] = 500_000_000
    value["attribute"] = [
        {"name": "Exposure", "value": 0.25},
        {"name": "Label", "value": "not a number"},
        *([{"name": "ColorMode", "value": colour_mode}] if colour_mode is not None else []),
    ]
    if codec:
        value["value"] = ("ubyteValue", np.frombuffer(payload, dtype=np.uint8))
        value["codec.name"] = codec
        value["codec.parameters"] = parameters
        value["compressedSize"] = len(payload)
        value["uncompressedSize"] = FRAME.nbytes if uncompressed is None else uncompressed
    return value


def _blosc(frame):
    blosc = pytest.importorskip("blosc")
    return blosc.compress(frame.tobytes(), typesize=frame.itemsize)


def _bitshuffle_plain(frame):
    import bitshuffle

    return bitshuffle.compress_lz4(frame, 0).tobytes()


@pytest.mark.parametrize(
    "codec, payload",
    [
        ("", None),
        ("lz4", lz4.block.compress(FRAME.tobytes(), store_size=False)),
        ("bslz4", bslz4_encode(FRAME)),  # with the HDF5-filter header
        ("bslz4", None),  # without it (filled below)
        ("zlib", zlib.compress(FRAME.tobytes())),
        ("blosc", None),
    ],
    ids=["none", "lz4", "bslz4-header", "bslz4-plain", "zlib", "blosc"],
)
def test_every_codec_gives_the_frame_back(codec, payload, request):
    if request.node.callspec.id == "bslz4-plain":
        payload = _bitshuffle_plain(FRAME)
    if codec == "blosc":
        payload = _blosc(FRAME)
    frame = decode(_value(codec=codec, payload=payload))
    assert frame.data.dtype == np.uint16 and frame.data.shape == (24, 40)
    np.testing.assert_array_equal(frame.data, FRAME)
    assert frame.unique_id == 7 and frame.timestamp == pytest.approx(1_700_000_000.5)
    assert frame.attributes == {"Exposure": 0.25, "Label": "not a number"}


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"codec": "jpeg", "payload": b"\xff\xd8\xff"}, "lossy_codec"),
        ({"codec": "lz5", "payload": b"x"}, "unknown_encoding"),
        ({"codec": "lz4", "payload": b"\x00" * 10, "uncompressed": 10**9}, "size_mismatch"),
        ({"codec": "lz4", "payload": b"\x00" * 10, "parameters": 42}, "dtype"),
        ({"codec": "zlib", "payload": b"not zlib"}, "corrupt"),
        ({"frame": np.zeros((8, 8, 3), np.uint8)}, "color"),
        ({"colour_mode": 1}, "color"),  # Bayer: 2-D, but not monochrome
        ({"frame": np.zeros(16, np.uint16)}, "rank"),
    ],
    ids=["jpeg", "unknown", "declared-size", "type-code", "corrupt", "colour", "bayer", "rank"],
)
def test_what_cannot_be_denoised_is_refused_with_its_reason(kwargs, reason):
    with pytest.raises(MessageError) as caught:
        decode(_value(**kwargs))
    assert caught.value.reason == reason


def test_a_huge_declared_frame_is_refused_before_anything_is_decompressed():
    value = _value(codec="lz4", payload=b"\x00" * 10)
    value["dimension"] = [{"size": 100_000}, {"size": 100_000}]
    with pytest.raises(MessageError) as caught:
        decode(value)
    assert caught.value.reason == "too_large"


@pytest.mark.parametrize("codec", ["none", "lz4", "bslz4", "zlib", "blosc"])
def test_encode_is_what_decode_reads(codec):
    """The daemon's served PV (float32) and the simulator (uint16) publish with `encode`."""
    if codec == "blosc":
        pytest.importorskip("blosc")
    for frame in (FRAME, FRAME.astype(np.float32) / 7):
        value = encode(
            frame,
            12,
            timestamp=1_700_000_000.25,
            codec=codec,
            attributes={"Exposure": 0.5, "N2SModelVersion": 3, "Sample": "Si"},
        )
        got = decode(value)
        assert got.data.dtype == frame.dtype
        np.testing.assert_array_equal(got.data, frame)
        assert got.unique_id == 12 and got.timestamp == pytest.approx(1_700_000_000.25)
        assert got.attributes == {
            "ColorMode": 0,
            "Exposure": 0.5,
            "N2SModelVersion": 3,
            "Sample": "Si",
        }

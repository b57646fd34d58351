"""ZeroMQ message formats: round trips bit-exact, and a corpus of garbage, each refused
with its reason."""

from __future__ import annotations

import json

import cbor2
import numpy as np
import pytest

from n2s_stream.formats import protocols as p
from n2s_stream.formats.codecs import MessageError, bslz4_decode, bslz4_encode

RNG = np.random.default_rng(0)
FRAME16 = RNG.poisson(30, (48, 64)).astype(np.uint16)
FRAME32 = RNG.poisson(3000, (48, 64)).astype(np.uint32)


@pytest.mark.parametrize("frame", [FRAME16, FRAME32, FRAME16.astype(np.float32)])
def test_bslz4_round_trip_is_bit_exact(frame):
    blob = bslz4_encode(frame)
    assert len(blob) < frame.nbytes or frame.dtype.kind == "f"
    assert np.array_equal(bslz4_decode(blob, frame.shape, frame.dtype), frame)


@pytest.mark.parametrize("encoding", ["raw", "bslz4", "lz4"])
def test_native_round_trip(encoding):
    decoder = p.NativeDecoder()
    (image,) = decoder.decode(p.native_frame("scan_01", 7, FRAME16, encoding))
    assert image.series == "scan_01" and image.index == 7
    assert np.array_equal(image.data, FRAME16)
    assert decoder.decode(p.native_end("scan_01")) == [p.End("scan_01")]


def test_stream1_round_trip_with_pixel_mask():
    mask = np.zeros(FRAME32.shape, np.uint32)
    mask[24, :] = 1
    decoder = p.Stream1Decoder()
    assert decoder.decode(p.stream1_header(3, mask)) == []
    (image,) = decoder.decode(p.stream1_image(3, 0, FRAME32))
    assert image.series == "series_000003" and np.array_equal(image.data, FRAME32)
    assert image.pixel_mask is not None and image.pixel_mask[24].all()
    assert image.pixel_mask.sum() == 64
    assert decoder.decode(p.stream1_end(3)) == [p.End("series_000003")]
    assert decoder.masks == {}  # forgotten at the end: a service sees thousands of series


def test_stream1_shape_is_x_y():
    decoder = p.Stream1Decoder()
    decoder.decode(p.stream1_header(1))
    parts = p.stream1_image(1, 0, FRAME16)
    assert json.loads(parts[1])["shape"] == [64, 48]  # Dectris: [x, y]
    assert decoder.decode(parts)[0].data.shape == (48, 64)


@pytest.mark.parametrize("compression", ["bslz4", "lz4", None])
def test_stream2_round_trip(compression):
    mask = np.zeros(FRAME16.shape, np.uint32)
    mask[0, 0] = 4
    decoder = p.Stream2Decoder()
    assert decoder.decode(p.stream2_start(9, FRAME16.shape, mask)) == []
    (image,) = decoder.decode(p.stream2_image(9, 5, FRAME16, compression))
    assert image.index == 5 and np.array_equal(image.data, FRAME16)
    assert image.pixel_mask is not None and image.pixel_mask.sum() == 1
    assert decoder.decode(p.stream2_end(9)) == [p.End("series_000009")]
    assert decoder.masks == {}


@pytest.mark.parametrize("protocol", ["native", "dectris-stream1", "dectris-stream2"])
def test_parse_reads_headers_now_and_leaves_the_pixels_for_later(protocol):
    """The receiving thread parses; the costly decompression is a `Payload` that a pool
    decodes (and only then finds a corrupt payload)."""
    decoder = p.make_decoder(protocol)
    if protocol == "native":
        message = p.native_frame("scan_01", 3, FRAME16, "bslz4")
    elif protocol == "dectris-stream1":
        decoder.parse(p.stream1_header(1))
        message = p.stream1_image(1, 3, FRAME16)
    else:
        decoder.parse(p.stream2_start(1, FRAME16.shape))
        message = p.stream2_image(1, 3, FRAME16, "bslz4")
    (payload,) = decoder.parse(message)
    assert isinstance(payload, p.Payload) and payload.index == 3
    assert np.array_equal(payload.decode().data, FRAME16)
    cut = p.Payload(payload.series, 3, payload.blob[:20], "bslz4", FRAME16.shape, FRAME16.dtype)
    with pytest.raises(MessageError) as caught:
        cut.decode()
    assert caught.value.reason in ("corrupt", "size_mismatch", "truncated")


def _native_header(**changes):
    header = {
        "htype": "n2s-frame-1",
        "series": "s",
        "frame": 0,
        "dtype": "<u2",
        "shape": [48, 64],
        "encoding": "raw",
    } | changes
    return json.dumps(header).encode()


GARBAGE = [
    ("native", [], "truncated"),
    ("native", [b"{not json"], "bad_json"),
    ("native", [b"[1, 2]"], "bad_json"),
    ("native", [b'{"htype": "n2s-zzz"}'], "unknown_htype"),
    ("native", [_native_header()], "truncated"),
    ("native", [_native_header(), FRAME16.tobytes()[:-2]], "size_mismatch"),
    ("native", [_native_header(encoding="zip"), b"x"], "unknown_encoding"),
    ("native", [_native_header(dtype="<c8"), b"x"], "dtype"),
    ("native", [_native_header(dtype="nonsense"), b"x"], "dtype"),
    ("native", [_native_header(shape=[1_000_000, 1_000_000]), b"x"], "too_large"),
    ("native", [_native_header(shape=[48]), b"x"], "shape"),
    ("native", [_native_header(frame="7"), b"x"], "bad_header"),
    ("native", [_native_header(frame=-1), b"x"], "bad_header"),
    ("native", [_native_header(series="../../etc/passwd"), b"x"], "bad_series_name"),
    ("native", [_native_header(series="a/b"), b"x"], "bad_series_name"),
    ("native", [_native_header(series="café"), b"x"], "bad_series_name"),
    ("native", [_native_header(encoding="bslz4"), b"\x00" * 40], "size_mismatch"),
    (
        "native",
        [_native_header(encoding="bslz4"), bslz4_encode(FRAME16)[:12] + b"\xff" * 50],
        "corrupt",
    ),
    ("dectris-stream1", p.stream1_image(4, 0, FRAME16), "image_before_header"),
    ("dectris-stream1", [b'{"htype": "dimage-1.0", "series": "x", "frame": 0}'], "bad_header"),
    ("dectris-stream1", [b'{"htype": "dzzz"}'], "unknown_htype"),
    ("dectris-stream2", [b"\xff\xfe junk"], "bad_cbor"),
    ("dectris-stream2", [cbor2.dumps([1, 2])], "bad_cbor"),
    (
        "dectris-stream2",
        [cbor2.dumps({"type": "image", "series_id": 1, "image_id": 0})],
        "image_before_header",
    ),
    ("dectris-stream2", [cbor2.dumps({"type": "nope", "series_id": 1})], "unknown_htype"),
]


@pytest.mark.parametrize("protocol,parts,reason", GARBAGE)
def test_garbage_is_refused_with_its_reason(protocol, parts, reason):
    decoder = p.make_decoder(protocol)
    with pytest.raises(MessageError) as info:
        decoder.decode(parts)
    assert info.value.reason == reason
    assert "\n" not in str(info.value)


def test_stream1_truncated_and_unknown_encoding_after_header():
    decoder = p.Stream1Decoder()
    decoder.decode(p.stream1_header(2))
    parts = p.stream1_image(2, 0, FRAME16)
    with pytest.raises(MessageError) as info:
        decoder.decode(parts[:2])
    assert info.value.reason == "truncated"
    bad = json.loads(parts[1]) | {"encoding": "bs16-zstd<"}
    with pytest.raises(MessageError) as info:
        decoder.decode([parts[0], json.dumps(bad).encode(), parts[2]])
    assert info.value.reason == "unknown_encoding"


def test_lz4_hdf5_framing_across_blocks():
    from n2s_stream.formats.codecs import lz4_hdf5_decode, lz4_hdf5_encode

    big = RNG.poisson(50, (256, 300)).astype(np.uint16)  # 150 kB: three 64 kB blocks
    blob = lz4_hdf5_encode(big)
    assert np.array_equal(lz4_hdf5_decode(blob, big.shape, big.dtype), big)
    with pytest.raises(MessageError) as info:
        lz4_hdf5_decode(blob[:-10], big.shape, big.dtype)
    assert info.value.reason == "corrupt"

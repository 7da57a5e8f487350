"""Encoding: raw RGB pixels to PNG/JPEG/WebP, with sha256 and size; error rows pass through."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from koala_batch.encode import EncodeImages, encode_image
from koala_batch.layout import EXTENSIONS

WIDTH, HEIGHT = 64, 48  # not square: a swapped width/height shows


def gradient(seed: int = 0) -> np.ndarray:
    """A smooth image (lossy codecs keep it close) with a little seeded texture."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    noise = np.random.default_rng(seed).integers(0, 8, (HEIGHT, WIDTH, 3))
    image = np.stack([x * 255 // WIDTH, y * 255 // HEIGHT, (x + y) * 255 // (WIDTH + HEIGHT)], -1)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_png_round_trip_is_lossless():
    pixels = gradient()
    image = decode(encode_image(pixels, "png", 95))
    assert image.format == "PNG"
    assert image.size == (WIDTH, HEIGHT)
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), pixels)


@pytest.mark.parametrize(("image_format", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_lossy_round_trip_keeps_size_format_and_content(image_format, pil_format):
    pixels = gradient()
    image = decode(encode_image(pixels, image_format, 95))
    assert image.format == pil_format
    assert image.size == (WIDTH, HEIGHT)
    decoded = np.asarray(image.convert("RGB")).astype(int)
    assert np.abs(decoded - pixels.astype(int)).mean() < 6
    # And not some other picture: far from the colour-inverted image.
    assert np.abs(decoded - (255 - pixels.astype(int))).mean() > 50


@pytest.mark.parametrize("image_format", ["jpeg", "webp"])
def test_quality_applies_to_lossy_formats(image_format):
    pixels = np.random.default_rng(1).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    assert len(encode_image(pixels, image_format, 10)) < len(encode_image(pixels, image_format, 95))


def test_encoding_is_deterministic():
    pixels = gradient()
    for image_format in ("png", "jpeg", "webp"):
        assert encode_image(pixels, image_format, 90) == encode_image(pixels, image_format, 90)


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="gif"):
        encode_image(gradient(), "gif", 95)


def test_extensions_cover_every_format():
    assert EXTENSIONS == {"png": "png", "jpeg": "jpg", "webp": "webp"}


# ---------------------------------------------------------------------------------------
# EncodeImages


def generated_table(pixels: list[np.ndarray | None]) -> pa.Table:
    """What the generate stage emits: work rows with raw pixels (b"" for error rows)."""
    return pa.table(
        {
            "key": pa.array([f"{i:032x}-0" for i in range(len(pixels))]),
            "status": pa.array(["ok" if p is not None else "error" for p in pixels]),
            "error": pa.array(
                [None if p is not None else "prompt is null" for p in pixels], pa.string()
            ),
            "pixels": pa.array(
                [p.tobytes() if p is not None else b"" for p in pixels], pa.binary()
            ),
        }
    )


@pytest.mark.parametrize("image_format", ["png", "jpeg", "webp"])
def test_encode_stage_adds_image_sha256_and_bytes(image_format):
    images = [gradient(0), None, gradient(2)]
    stage = EncodeImages(image_format, 90, WIDTH, HEIGHT)
    out = stage(generated_table(images))

    assert "pixels" not in out.column_names
    assert out.column_names[:3] == ["key", "status", "error"]
    assert out.schema.field("image").type == pa.binary()
    assert out.schema.field("sha256").type == pa.string()
    assert out.schema.field("bytes").type == pa.int64()
    encoded = out.column("image").to_pylist()
    digests = out.column("sha256").to_pylist()
    sizes = out.column("bytes").to_pylist()
    for row in (0, 2):
        assert digests[row] == hashlib.sha256(encoded[row]).hexdigest()
        assert sizes[row] == len(encoded[row])
        assert encoded[row] == encode_image(images[row], image_format, 90)
        assert decode(encoded[row]).size == (WIDTH, HEIGHT)
    assert digests[0] != digests[2]


def test_encode_stage_png_decodes_to_the_generated_pixels():
    images = [gradient(3), gradient(4)]
    out = EncodeImages("png", 95, WIDTH, HEIGHT)(generated_table(images))
    for data, pixels in zip(out.column("image").to_pylist(), images, strict=True):
        assert np.array_equal(np.asarray(decode(data)), pixels)


def test_encode_stage_leaves_error_rows_without_image():
    out = EncodeImages("png", 95, WIDTH, HEIGHT)(generated_table([None, gradient(), None]))

    assert out.column("image").to_pylist()[0] is None
    assert out.column("image").to_pylist()[2] is None
    assert out.column("sha256").to_pylist()[0] is None
    assert out.column("bytes").to_pylist()[0] == 0
    assert out.column("status").to_pylist() == ["error", "ok", "error"]
    assert out.column("error").to_pylist()[0] == "prompt is null"
    assert out.column("image").to_pylist()[1] is not None


def test_encode_stage_with_only_error_rows():
    out = EncodeImages("webp", 95, WIDTH, HEIGHT)(generated_table([None, None]))
    assert out.num_rows == 2
    assert out.column("image").null_count == 2
    assert out.column("bytes").to_pylist() == [0, 0]

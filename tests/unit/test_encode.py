"""Encoding: raw RGB pixels to PNG/JPEG/WebP bytes with their sha256."""

from __future__ import annotations

import hashlib
import io
import threading

import numpy as np
import pytest
from PIL import Image

from koala_batch.output.layout import EXTENSIONS
from koala_batch.stages.encode import ImageEncoder, encode_image

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
# ImageEncoder


@pytest.mark.parametrize("image_format", ["png", "jpeg", "webp"])
def test_encoder_gives_the_bytes_and_their_sha256(image_format):
    pixels = gradient(2)
    encoded = ImageEncoder(image_format, 90)(pixels)

    assert encoded.data == encode_image(pixels, image_format, 90)
    assert encoded.sha256 == hashlib.sha256(encoded.data).hexdigest()
    assert decode(encoded.data).size == (WIDTH, HEIGHT)
    assert ImageEncoder(image_format, 90)(gradient(3)).sha256 != encoded.sha256


def test_encoder_png_is_lossless():
    pixels = gradient(4)
    assert np.array_equal(np.asarray(decode(ImageEncoder("png", 95)(pixels).data)), pixels)


def test_encoder_refuses_an_unknown_format_when_built():
    with pytest.raises(ValueError, match="gif"):
        ImageEncoder("gif", 95)


def test_encode_all_keeps_the_order_of_the_batch():
    batch = [gradient(seed) for seed in range(5)]
    encoder = ImageEncoder("png", 95, threads=3)
    assert [e.data for e in encoder.encode_all(batch)] == [
        encode_image(pixels, "png", 95) for pixels in batch
    ]
    assert encoder.encode_all([]) == []


def test_encode_all_encodes_the_batch_in_parallel():
    # Three images meet at a barrier that a one-at-a-time encoder never passes.
    meeting = threading.Barrier(3, timeout=10)

    class MeetingEncoder(ImageEncoder):
        def __call__(self, pixels):
            meeting.wait()
            return super().__call__(pixels)

    assert (
        len(MeetingEncoder("png", 95, threads=3).encode_all([gradient(s) for s in range(3)])) == 3
    )
    with pytest.raises(threading.BrokenBarrierError):
        MeetingEncoder("png", 95, threads=1).encode_all([gradient(0), gradient(1)])


def test_encoder_refuses_no_threads():
    with pytest.raises(ValueError, match="threads"):
        ImageEncoder("png", 95, threads=0)

"""Encoding stage: raw RGB pixels to PNG, JPEG or WebP bytes, with their sha256.

Runs as CPU tasks beside the generators, so GPUs never wait on compression.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
from PIL import Image

from koala_batch.schemas import STATUS_OK, Col, require_columns


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    """Encode one HxWx3 uint8 image; quality applies to JPEG and WebP."""
    image = Image.fromarray(pixels, mode="RGB") if pixels.ndim == 3 else Image.fromarray(pixels)
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
    elif image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    elif image_format == "webp":
        image.save(buffer, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unknown image format {image_format!r}")
    return buffer.getvalue()


class EncodeImages:
    """Task stage: rows with `pixels` in, rows with encoded `image`, `sha256`, `bytes` out."""

    def __init__(self, image_format: str, quality: int, width: int, height: int):
        self.image_format = image_format
        self.quality = quality
        self.shape = (height, width, 3)

    def __call__(self, table: pa.Table) -> pa.Table:
        require_columns(table, (Col.STATUS, Col.PIXELS), "encode")
        statuses = table.column(Col.STATUS).to_pylist()
        raw = table.column(Col.PIXELS).to_pylist()
        encoded: list[bytes | None] = []
        digests: list[str | None] = []
        sizes: list[int] = []
        for status, pixels in zip(statuses, raw, strict=True):
            if status != STATUS_OK:
                encoded.append(None)
                digests.append(None)
                sizes.append(0)
                continue
            array = np.frombuffer(pixels, dtype=np.uint8).reshape(self.shape)
            data = encode_image(array, self.image_format, self.quality)
            encoded.append(data)
            digests.append(hashlib.sha256(data).hexdigest())
            sizes.append(len(data))
        table = table.drop_columns([Col.PIXELS])
        table = table.append_column(Col.IMAGE, pa.array(encoded, pa.binary()))
        table = table.append_column(Col.SHA256, pa.array(digests, pa.string()))
        return table.append_column(Col.BYTES, pa.array(sizes, pa.int64()))

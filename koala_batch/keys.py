"""Row ids, sample keys and seeds: pure functions of the job seed, the id and the image index.

Nothing here depends on batch size, actor count, retries or the order rows arrive in,
so every run of a spec names and seeds every image the same way.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

# Seeds are 0 to 2**63-1: every reader of a manifest or sidecar (Arrow's int64, pandas,
# Hugging Face `datasets`, JSON parsers that go through C longs) takes them, where an
# unsigned 64-bit value above 2**63 overflows them. torch.Generator.manual_seed takes them.
SEED_MODULUS = 2**63


def derived_row_id(source: str, row_index: int) -> str:
    """Stable id of a row of a table without an id column: its file and row index."""
    return f"{source}#{row_index}"


def sample_key(row_id: str, image_index: int) -> str:
    """WebDataset key of one image: a hash of the id (never the raw id) and the index.

    Hex digits and one dash only, so it is a safe file name and webdataset splits the
    extension where expected.
    """
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{digest}-{image_index}"


def derived_seed(job_seed: int, row_id: str, image_index: int) -> int:
    """Seed of one image from the job seed, the row id and the image index, in
    [0, SEED_MODULUS): 8 bytes of a sha256 with the top bit dropped."""
    material = f"{job_seed}\x00{row_id}\x00{image_index}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "big") % SEED_MODULUS


def image_seed(row_seed: int | None, job_seed: int, row_id: str, image_index: int) -> int:
    """Seed of image `image_index`: row seed + index (mod SEED_MODULUS) when the row has
    one, else derived."""
    if row_seed is None:
        return derived_seed(job_seed, row_id, image_index)
    return (row_seed + image_index) % SEED_MODULUS


# What `shard_name` returns, and so the only shard names koala-batch owns.
SHARD_NAME_PATTERN = r"\d{12}-[0-9a-f]{8}"


def shard_name(first_ordinal: int, rows: list[tuple[str, str, str]]) -> str:
    """Name of a shard: its smallest work ordinal (ordering) and a hash of its rows, each
    (key, status, made_from).

    Disjoint shards never share a smallest ordinal, and a retried write of the same rows
    gets the same name, so writes are idempotent. A retry of failed images that makes
    the same keys again with another outcome (or from a changed input row) gets another
    name, so it commits beside the error rows it replaces instead of being taken for them.
    """
    lines = sorted("\x00".join(row) for row in rows)
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:8]
    return f"{first_ordinal:012d}-{digest}"


def made_from_digest(
    prompt: str | None,
    negative_prompt: str | None,
    seed: int,
    steps: int,
    guidance_scale: float,
    width: int,
    height: int,
) -> str:
    """Hex digest of what one image is generated from: the row's values that reach the
    pipeline call. A key names an id and an image index; this says whether the row under
    that id still asks for the image that was committed. (The spec's settings are the
    job fingerprint's.)"""
    material = json.dumps(
        [prompt, negative_prompt, seed, steps, float(guidance_scale), width, height],
        ensure_ascii=False,
    )
    return hashlib.blake2b(material.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def made_from_bytes(digests) -> list[bytes]:
    """`made_from_digest` values (hex) as the 16 bytes a KeySet keeps."""
    return [bytes.fromhex(digest) for digest in digests]


def key_digest(key: str) -> bytes:
    """16-byte digest of a key: what resume compares, in a compact fixed-size form."""
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()


class KeySet:
    """A set of keys as a sorted array of 16-byte digests, each key optionally with the
    16-byte digest of what its image is made from (`made_from`, aligned).

    Resume ships the committed keys to every read task; ten million keys are 160 MB here
    (shared zero-copy by Ray's object store) instead of a Python set several times larger.
    """

    def __init__(self, digests: np.ndarray | None = None, made_from: np.ndarray | None = None):
        if digests is None:
            digests = np.empty(0, "S16")
        self.digests, first = np.unique(digests, return_index=True)
        self.made_from = made_from[first] if made_from is not None else None

    @classmethod
    def from_keys(cls, keys, made_from=None) -> KeySet:
        """From key strings (and, aligned, their `made_from` hex digests)."""
        digests = np.array([key_digest(key) for key in keys], dtype="S16")
        if made_from is None:
            return cls(digests)
        return cls(digests, np.array(made_from_bytes(made_from), dtype="S16"))

    def __len__(self) -> int:
        return len(self.digests)

    def __contains__(self, key: str) -> bool:
        return bool(self.contains_many([key])[0])

    def _positions(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each wanted digest would sit, and whether it is there."""
        if not len(self.digests) or not len(wanted):
            return np.zeros(len(wanted), dtype=np.int64), np.zeros(len(wanted), dtype=bool)
        positions = np.searchsorted(self.digests, wanted)
        clipped = np.minimum(positions, len(self.digests) - 1)
        return clipped, (positions < len(self.digests)) & (self.digests[clipped] == wanted)

    def contains_many(self, keys: list[str]) -> np.ndarray:
        """A boolean per key: whether it is in the set."""
        return self._positions(np.array([key_digest(key) for key in keys], dtype="S16"))[1]

    def overlap(self, other: KeySet) -> int:
        """How many keys the two sets share."""
        return len(np.intersect1d(self.digests, other.digests, assume_unique=True))

    def difference(self, other: KeySet) -> KeySet:
        """The keys of this set that `other` lacks (with their `made_from`)."""
        keep = ~other._positions(self.digests)[1]
        made = self.made_from[keep] if self.made_from is not None else None
        return KeySet(self.digests[keep], made)

    def union(self, other: KeySet) -> KeySet:
        """The keys of either set (`made_from` dropped)."""
        return KeySet(np.concatenate([self.digests, other.digests]))

    def changed(self, other: KeySet) -> KeySet:
        """The keys of both sets whose `made_from` differs between them (this set's
        `made_from` kept); none unless both sets carry it."""
        if self.made_from is None or other.made_from is None:
            return KeySet()
        positions, present = other._positions(self.digests)
        differs = present & (other.made_from[positions] != self.made_from)
        return KeySet(self.digests[differs], self.made_from[differs])

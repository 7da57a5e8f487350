"""Row ids, sample keys and seeds: pure functions of the job seed, the id and the image index.

Nothing here depends on batch size, actor count, retries or the order rows arrive in,
so every run of a spec names and seeds every image the same way.
"""

from __future__ import annotations

import hashlib

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


def shard_name(first_ordinal: int, keys: list[str]) -> str:
    """Name of a shard: its smallest work ordinal (ordering) and a hash of its keys.

    Disjoint shards never share a smallest ordinal, and a retried write of the same rows
    gets the same name, so writes are idempotent.
    """
    digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:8]
    return f"{first_ordinal:012d}-{digest}"


def key_digest(key: str) -> bytes:
    """16-byte digest of a key: what resume compares, in a compact fixed-size form."""
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()


class KeySet:
    """A set of keys as a sorted array of 16-byte digests.

    Resume ships the committed keys to every read task; ten million keys are 160 MB here
    (shared zero-copy by Ray's object store) instead of a Python set several times larger.
    """

    def __init__(self, digests: np.ndarray | None = None):
        self.digests = np.unique(digests) if digests is not None else np.empty(0, "S16")

    @classmethod
    def from_keys(cls, keys) -> KeySet:
        return cls(np.array([key_digest(key) for key in keys], dtype="S16"))

    def __len__(self) -> int:
        return len(self.digests)

    def __contains__(self, key: str) -> bool:
        return bool(self.contains_many([key])[0])

    def contains_many(self, keys: list[str]) -> np.ndarray:
        """A boolean per key: whether it is in the set."""
        if not len(self.digests) or not keys:
            return np.zeros(len(keys), dtype=bool)
        wanted = np.array([key_digest(key) for key in keys], dtype="S16")
        positions = np.searchsorted(self.digests, wanted)
        found = self.digests[np.minimum(positions, len(self.digests) - 1)]
        return (positions < len(self.digests)) & (found == wanted)

    def overlap(self, other: KeySet) -> int:
        """How many keys the two sets share."""
        return len(np.intersect1d(self.digests, other.digests, assume_unique=True))

"""The output formats, one class each, and the registry that names them.

Adding a format: a module here with its class (see `base.OutputFormat`), and one line in
`FORMATS` (and the name in `spec.OutputSpec.format`); CONTRIBUTING walks through it.
"""

from __future__ import annotations

from koala_batch.output.formats.base import CardRecipes, OutputFormat, Problems
from koala_batch.output.formats.files import ImageFiles
from koala_batch.output.formats.parquet import ParquetShards
from koala_batch.output.formats.webdataset import WebDataset
from koala_batch.output.layout import OutputListing, ShardRecord

FORMATS: dict[str, OutputFormat] = {
    output_format.name: output_format
    for output_format in (WebDataset(), ParquetShards(), ImageFiles())
}


def shard_damage(listing: OutputListing, shard: str, record: ShardRecord) -> str | None:
    """Why a committed shard cannot be trusted (its manifest records no known format, or
    its format's `damage`), or None. Costs nothing beyond the listing; `record` is the
    manifest's `layout.shard_record`."""
    if record.output_format not in FORMATS:
        return f"its manifest records no known output format ({record.output_format})"
    if not record.has_data_file:
        return None
    return FORMATS[record.output_format].damage(listing, shard, record)


__all__ = ["FORMATS", "CardRecipes", "OutputFormat", "Problems", "shard_damage"]

"""The output formats, one class each, and the registry that names them.

Adding a format: a module here with its class (see `base.OutputFormat`), and one line in
`FORMATS` (and the name in `spec.OutputSpec.format`); CONTRIBUTING walks through it.
"""

from __future__ import annotations

from koala_batch.output.formats.base import CardRecipes, OutputFormat, Problems
from koala_batch.output.formats.files import ImageFiles
from koala_batch.output.formats.parquet import ParquetShards
from koala_batch.output.formats.webdataset import WebDataset

FORMATS: dict[str, OutputFormat] = {
    output_format.name: output_format
    for output_format in (WebDataset(), ParquetShards(), ImageFiles())
}

__all__ = ["FORMATS", "CardRecipes", "OutputFormat", "Problems"]

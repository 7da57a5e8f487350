"""Rebuild parti-sample.parquet: 64 PartiPrompts rows, every 25th prompt of the TSV.

Source: PartiPrompts (google-research/parti, PartiPrompts.tsv), Apache-2.0; see
PartiPrompts-LICENSE beside this file. Usage:
    python jobs/data/make_sample.py path/to/PartiPrompts.tsv
"""

import csv
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def main(tsv_path: str) -> None:
    with open(tsv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    picked = [(index, row) for index, row in enumerate(rows) if index % 25 == 0][:64]
    table = pa.table(
        {
            "id": [f"parti-{index:04d}" for index, _ in picked],
            "prompt": [row["Prompt"] for _, row in picked],
            "category": [row["Category"] for _, row in picked],
            "challenge": [row["Challenge"] for _, row in picked],
        }
    )
    pq.write_table(table, Path(__file__).with_name("parti-sample.parquet"), row_group_size=16)


if __name__ == "__main__":
    main(sys.argv[1])

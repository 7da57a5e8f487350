"""Expand stage: input rows in, one work row per image out, less those already committed."""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from koala_batch.inputs.rows import RowExpander
from koala_batch.keys import KeySet
from koala_batch.schemas import BUCKET_COLUMNS, Col
from koala_batch.spec import JobSpec


class ExpandImages(RowExpander):
    """Expand stage: input rows in, one work row per (row, image index) out.

    Rows whose key is already committed are left out (resume). With per-row parameter
    columns, the rows come out sorted by their bucket (`schemas.BUCKET_COLUMNS`, then
    whether they have a negative prompt), so that rows that may share a pipeline call
    arrive together (see `runtime.job.build_dataset`).
    """

    def __init__(self, spec: JobSpec, committed_keys: KeySet | Iterable[str] | None = None):
        super().__init__(spec)
        if committed_keys is None:
            committed_keys = KeySet()
        elif not isinstance(committed_keys, KeySet):
            committed_keys = KeySet.from_keys(committed_keys)
        self.committed_keys = committed_keys

    def __call__(self, table: pa.Table) -> pa.Table:
        work = self.expand(table)
        committed = self.committed_keys.contains_many(work.column(Col.KEY).to_pylist())
        if committed.any():
            work = work.filter(pa.array(~committed))
        if any(self.input.parameter_columns.values()):
            work = sort_by_bucket(work)
        return work


def sort_by_bucket(work: pa.Table) -> pa.Table:
    """Work rows ordered by their pipeline-call bucket (the generation parameters, then
    whether they have a negative prompt), stably: within a bucket, rows keep their order."""
    has_negative = pc.is_valid(work.column(Col.NEGATIVE_PROMPT))
    keyed = work.append_column("__has_negative", has_negative)
    order = pc.sort_indices(
        keyed, sort_keys=[(name, "ascending") for name in (*BUCKET_COLUMNS, "__has_negative")]
    )
    return work.take(order)

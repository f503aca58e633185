"""``edgewise worker export``: the hard-example store as Parquet or CSV, in batches."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from cloud_worker.errors import ExportError
from cloud_worker.store import COLUMNS, iter_rows
from edgewise.files import atomic_path

Format = Literal["parquet", "csv"]


def export(
    store_path: Path,
    out: Path,
    fmt: Format,
    *,
    on_total: Callable[[int], None] | None = None,
    on_rows: Callable[[int], None] | None = None,
    batch: int = 1000,
) -> int:
    """Write every stored example to ``out``; returns how many. Written to a temporary file,
    fsynced, then renamed and the directory fsynced: a failed export leaves no half file."""
    total, batches = iter_rows(store_path, batch)
    if on_total is not None:
        on_total(total)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        return (_parquet if fmt == "parquet" else _csv)(tmp, batches, on_rows)


def _csv(path: Path, batches: Any, on_rows: Callable[[int], None] | None) -> int:
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        for rows in batches:
            for row in rows:
                row = dict(row)
                row["input"] = row["input"].hex()  # bytes as hex in a text format
                writer.writerow(row)
            n += len(rows)
            if on_rows is not None:
                on_rows(len(rows))
    return n


def _parquet(path: Path, batches: Any, on_rows: Callable[[int], None] | None) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ExportError(
            "Parquet export needs pyarrow: pip install 'edgewise[parquet]' (or use --format csv)"
        ) from None
    types = {str: pa.string(), int: pa.int64(), float: pa.float64(), bytes: pa.binary()}
    schema = pa.schema([(name, types[t]) for name, t in COLUMNS.items()])
    schema = schema.with_metadata({"edgewise": json.dumps({"shape": "JSON list per row"})})
    n = 0
    with pq.ParquetWriter(str(path), schema) as writer:
        for rows in batches:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            n += len(rows)
            if on_rows is not None:
                on_rows(len(rows))
    return n

"""Result tables: rows of metrics and timings written as CSV or JSON, printed as text, and the
papers' published results read back from ``data/paper_results.csv``."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .outputs import atomic_write


def write_results(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write result rows (one dict per run) as CSV or JSON, chosen by the file suffix; the file is
    replaced whole (``outputs.atomic_write``), so an interrupted run leaves the previous table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        text = json.dumps([dict(row) for row in rows], indent=2, default=_builtin) + "\n"
    elif path.suffix == ".csv":
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=_columns(rows))
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    else:
        raise ValueError(f"{path}: results are written as .csv or .json, not {path.suffix or 'no suffix'}")
    return atomic_write(path, text)


def format_table(rows: Sequence[Mapping[str, Any]], digits: int = 4) -> str:
    """Fixed-width text table of result rows: text left-aligned, numbers right-aligned."""
    columns = _columns(rows)
    cells = [[_cell(row.get(c, ""), digits) for c in columns] for row in rows]
    widths = [max([len(c), *(len(row[i][0]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    for row in cells:
        lines.append("  ".join(t.rjust(w) if number else t.ljust(w) for (t, number), w in zip(row, widths)))
    return "\n".join(line.rstrip() for line in lines)


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every key of every row, in order of first appearance."""
    return list(dict.fromkeys(key for row in rows for key in row))


def _cell(value: Any, digits: int) -> tuple[str, bool]:
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}", True
    return str(value), isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _builtin(value: Any) -> Any:
    """JSON fallback: numpy scalars become Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def read_paper_results(path: str | Path) -> tuple[list[dict[str, Any]], str]:
    """Rows of a published-results CSV (numeric cells as floats) and its ``#`` comment lines (the sources).

    ``data/paper_results.csv`` holds one value per row: ``table, method, category, metric, value, source``;
    ``paper_means`` and ``paper_per_category`` turn its rows into the paper's tables."""
    lines = Path(path).read_text().splitlines()
    notes = "\n".join(line.lstrip("# ") for line in lines if line.startswith("#"))
    rows = csv.DictReader(line for line in lines if line.strip() and not line.startswith("#"))
    return [{key: _number(value) for key, value in row.items()} for row in rows], notes


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def paper_means(rows: Sequence[Mapping[str, Any]], table: str) -> dict[str, dict[str, float]]:
    """One published table's means: ``{method: {metric: value}}``, methods in the table's order."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        if row["table"] == table and row["category"] == "mean":
            out.setdefault(row["method"], {})[row["metric"]] = row["value"]
    return out


def paper_per_category(rows: Sequence[Mapping[str, Any]], table: str, metric: str) -> dict[str, dict[str, float]]:
    """One metric of a published per-category table: ``{method: {category: value}}`` ("mean" included)."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        if row["table"] == table and row["metric"] == metric:
            out.setdefault(row["method"], {})[row["category"]] = row["value"]
    return out

"""Result tables: CSV/JSON rows, the text table, and the paper's published results in data/paper_results.csv."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from patchcore_lite.datasets import MVTEC_CATEGORIES
from patchcore_lite.tools.tables import (
    format_table,
    paper_means,
    paper_per_category,
    read_paper_results,
    write_results,
)

PAPER = Path(__file__).resolve().parents[1] / "data" / "paper_results.csv"

ROWS = [
    {"name": "bottle", "image_auroc": 0.99875, "aupro": 0.9},
    {"name": "grid", "image_auroc": np.float32(0.5), "images": 78},
]


def test_write_results_round_trip(tmp_path):
    with write_results(ROWS, tmp_path / "r.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["bottle", "grid"]
    assert float(rows[0]["image_auroc"]) == 0.99875 and rows[1]["aupro"] == "" and rows[1]["images"] == "78"
    rows = json.loads(write_results(ROWS, tmp_path / "sub" / "r.json").read_text())
    assert rows == [
        {"name": "bottle", "image_auroc": 0.99875, "aupro": 0.9},
        {"name": "grid", "image_auroc": 0.5, "images": 78},
    ]
    with pytest.raises(ValueError, match=".csv or .json"):
        write_results(ROWS, tmp_path / "r.txt")


def test_format_table_aligns_columns():
    lines = format_table(ROWS).splitlines()
    assert lines[0].split() == ["name", "image_auroc", "aupro", "images"]
    assert set(lines[1]) == {"-", " "}
    assert lines[2].split() == ["bottle", "0.9988", "0.9000"]
    # Numbers are right-aligned under their header: the column's last characters line up.
    assert lines[2].index("0.9988") + 6 == lines[0].index("image_auroc") + len("image_auroc")
    assert lines[3].endswith("78") and len(lines[3]) == len(lines[0])


def test_read_paper_results_parses_numbers_and_keeps_the_sources(tmp_path: Path):
    path = tmp_path / "paper.csv"
    path.write_text("# Source: a paper, Table 1.\n# second line\nmethod,image_auroc\nA,99.0\nB,n/a\n")
    rows, notes = read_paper_results(path)
    assert rows == [{"method": "A", "image_auroc": 99.0}, {"method": "B", "image_auroc": "n/a"}]
    assert notes == "Source: a paper, Table 1.\nsecond line"


def test_paper_tables_pivot_the_rows(tmp_path: Path):
    path = tmp_path / "paper.csv"
    path.write_text("table,method,category,metric,value,source\nT1,A,mean,image_auroc,99,x\nT1,A,mean,pro,93,x\n"
                    "S1,A,mean,image_auroc,98,x\nS1,A,bottle,image_auroc,97,x\nS1,B,mean,image_auroc,90,x\n")
    rows, _ = read_paper_results(path)
    assert paper_means(rows, "T1") == {"A": {"image_auroc": 99.0, "pro": 93.0}}
    assert paper_per_category(rows, "S1", "image_auroc") == {"A": {"mean": 98.0, "bottle": 97.0}, "B": {"mean": 90.0}}


def test_the_papers_per_category_tables_average_to_their_means():
    """The transcription of Tables S1 and S2: every category present, each method's categories average to its
    printed mean (rounded to one decimal: within 0.25), and PatchCore's rows agree with Tables 1-2."""
    rows, notes = read_paper_results(PAPER)
    assert "Roth et al." in notes
    for table, metric in (("Table S1", "image_auroc"), ("Table S2", "pixel_auroc")):
        per = paper_per_category(rows, table, metric)
        assert len(per) >= 10
        for method, values in per.items():
            categories = [c for c in values if c != "mean"]
            assert categories in ([], list(MVTEC_CATEGORIES)), method
            if categories:
                assert abs(np.mean([values[c] for c in categories]) - values["mean"]) <= 0.25, (table, method)
        means = paper_means(rows, "Table 1-2")
        for ratio in ("1%", "10%", "25%"):
            assert per[f"PatchCore-{ratio}"]["mean"] == means[f"PatchCore-{ratio}"][metric]

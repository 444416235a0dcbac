"""Result tables and the atomic JSON writer."""

from __future__ import annotations

import json

from densepred.evaluation.base import atomic_write_json, gather_by_image_id
from densepred.evaluation.table import format_metrics, format_per_class, format_table


def test_format_table_aligns_columns():
    table = format_table(["", "PQ", "N"], [["All", 41.456, 133], ["Things", float("nan"), 80]], title="Panoptic")
    assert table.splitlines() == [
        "Panoptic",
        "|        |    PQ |   N |",
        "|:-------|------:|----:|",
        "| All    | 41.46 | 133 |",
        "| Things |   nan |  80 |",
    ]


def test_metrics_and_per_class_tables():
    assert format_metrics({"mIoU": 50.0, "pACC": 75.125}).splitlines()[-1] == "| 50.00 | 75.12 |"
    lines = format_per_class({"cat": {"IoU": 1.0, "ACC": 2.0}, "dog": {"IoU": 3.0, "ACC": 4.0}}).splitlines()
    assert lines[0] == "| category |  IoU |  ACC |" and lines[-1] == "| dog      | 3.00 | 4.00 |"


def test_atomic_json_writes_nan_as_null_and_leaves_no_temporary_file(tmp_path):
    path = atomic_write_json(tmp_path / "sub" / "m.json", {"PQ": float("nan"), "per_class": [1.5, float("nan")]})
    assert json.loads(path.read_text()) == {"PQ": None, "per_class": [1.5, None]}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]


def test_gather_without_process_group_sorts_by_image_id():
    assert list(gather_by_image_id({5: "a", 2: "b", 9: "c"}).items()) == [(2, "b"), (5, "a"), (9, "c")]

"""Result tables, the atomic JSON writer evaluators use, and gathering without a process group."""

from __future__ import annotations

import json

from densepred.evaluation.base import gather_by_image_id
from densepred.evaluation.table import format_table
from densepred.utils.io import atomic_write_json


def test_format_table_aligns_columns():
    table = format_table(["", "PQ", "N"], [["All", 41.456, 133], ["Things", float("nan"), 80]], title="Panoptic")
    assert table.splitlines() == [
        "Panoptic",
        "|        |    PQ |   N |",
        "|:-------|------:|----:|",
        "| All    | 41.46 | 133 |",
        "| Things |   nan |  80 |",
    ]


def test_atomic_json_writes_nan_as_null_and_leaves_no_temporary_file(tmp_path):
    path = atomic_write_json(tmp_path / "sub" / "m.json", {"PQ": float("nan"), "per_class": [1.5, float("nan")]})
    assert json.loads(path.read_text()) == {"PQ": None, "per_class": [1.5, None]}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]


def test_gather_without_process_group_sorts_by_image_id():
    assert list(gather_by_image_id({5: "a", 2: "b", 9: "c"}).items()) == [(2, "b"), (5, "a"), (9, "c")]

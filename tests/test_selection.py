"""out_features / out_indices alignment and verification (transformers' rules, stricter errors)."""

import pytest

from densepred.backbones import get_aligned_output_features_output_indices as align
from densepred.backbones import verify_out_features_out_indices as verify

ABC = ["a", "b", "c"]


@pytest.mark.parametrize(
    ("out_features", "out_indices", "expected"),
    [
        # the transformers test cases
        (None, None, (["c"], [2])),
        (["a", "c"], None, (["a", "c"], [0, 2])),
        (None, [0, 2], (["a", "c"], [0, 2])),
        (None, [-3, -1], (["a", "c"], [-3, -1])),
        # tuples accepted, returned as lists; both given and consistent
        (None, (0, 2), (["a", "c"], [0, 2])),
        (("b",), None, (["b"], [1])),
        (["a", "c"], [0, -1], (["a", "c"], [0, -1])),
        (["b", "c"], (1, 2), (["b", "c"], [1, 2])),
    ],
)
def test_alignment(out_features, out_indices, expected):
    assert align(out_features, out_indices, ABC) == expected


@pytest.mark.parametrize(
    ("out_features", "out_indices", "needle"),
    [
        (["a", "d"], None, "['d']"),  # unknown stage
        (["a", "a"], None, "duplicates"),
        (["c", "a"], None, "use ['a', 'c']"),  # out of stage order
        ("a", None, "got str 'a'"),  # a bare string is not a list of names
        ([], None, "empty"),
        ([0], None, "must hold str values"),
        (None, [3], "[3] out of range"),
        (None, [-4], "[-4] out of range"),  # transformers: IndexError
        (None, 1, "got int 1"),  # transformers: TypeError
        (None, [0, -3], "twice"),  # the same stage through a negative index
        (None, [2, 0], "use [0, 2]"),
        (None, [-1, 0], "use [0, -1]"),
        (None, [0.5], "must hold int values"),
        (None, [True], "must hold int values"),
        (["a", "b"], [0], "select different stages"),
        (["a", "b"], [0, 2], "(= ['a', 'c'])"),
    ],
)
def test_invalid_selection_names_value_and_stages(out_features, out_indices, needle):
    with pytest.raises(ValueError) as info:
        align(out_features, out_indices, ABC)
    message = str(info.value)
    assert needle in message
    assert "valid stage names" in message and "'c'" in message


def test_negative_index_range_message_on_five_stages():
    stages = ["stem", "stage1", "stage2", "stage3", "stage4"]
    with pytest.raises(ValueError, match=r"\[-6\] out of range for 5 stages \(valid: -5\.\.4\)"):
        align(None, [-6], stages)
    assert align(None, [-5], stages) == (["stem"], [-5])


def test_verify_accepts_valid_and_rejects_bad_stage_names():
    verify(["a"], [0], ABC)
    verify(None, None, ABC)
    with pytest.raises(ValueError, match="non-empty"):
        verify(None, None, [])
    with pytest.raises(ValueError, match="unique"):
        verify(None, None, ["a", "a"])

"""Which stages a backbone returns: the Hugging Face `out_features` / `out_indices` rules.

`stage_names` lists every stage a backbone can return, in order (native models: "stem", "stage1", ...).
A selection is given by names (`out_features`), by positions (`out_indices`), by both, or by neither:

- neither       -> the last stage;
- one of them   -> the other is derived from it;
- both          -> they must name the same stages.

Negative indices are allowed and kept as given; tuples are accepted. Duplicates, unknown names,
out-of-range indices and selections out of stage order are refused. Unlike transformers (which raises
IndexError or TypeError for some of these), every invalid input raises a ValueError that names the
bad value and lists the valid stage names.
"""

from __future__ import annotations

from collections.abc import Sequence


def _valid(stage_names: Sequence[str]) -> str:
    return f"valid stage names (index: name) are {dict(enumerate(stage_names))}"


def _as_list(value, key: str, item_type: type, stage_names: Sequence[str]) -> list | None:
    if value is None:
        return None
    if isinstance(value, (str, int)) or not isinstance(value, Sequence):
        raise ValueError(
            f"{key} must be a list or tuple, got {type(value).__name__} {value!r}; "
            f"e.g. {key}=[{value!r}]. The {_valid(stage_names)}."
        )
    items = list(value)
    for item in items:
        if not isinstance(item, item_type) or isinstance(item, bool):
            raise ValueError(
                f"{key} must hold {item_type.__name__} values, got {item!r} in {items}. The {_valid(stage_names)}."
            )
    if not items:
        raise ValueError(f"{key} is empty: select at least one stage. The {_valid(stage_names)}.")
    return items


def verify_out_features_out_indices(
    out_features: Sequence[str] | None,
    out_indices: Sequence[int] | None,
    stage_names: Sequence[str] | None,
) -> None:
    """Raise ValueError unless `out_features` / `out_indices` form a valid selection of `stage_names`."""
    if not stage_names:
        raise ValueError("stage_names must be a non-empty list of stage names")
    stage_names = list(stage_names)
    if len(set(stage_names)) != len(stage_names):
        raise ValueError(f"stage_names must be unique, got {stage_names}")
    n = len(stage_names)

    features = _as_list(out_features, "out_features", str, stage_names)
    if features is not None:
        unknown = [f for f in features if f not in stage_names]
        if unknown:
            raise ValueError(f"out_features {features} names unknown stages {unknown}; the {_valid(stage_names)}.")
        if len(set(features)) != len(features):
            raise ValueError(f"out_features {features} contains duplicates; the {_valid(stage_names)}.")
        ordered = [s for s in stage_names if s in features]
        if features != ordered:
            raise ValueError(
                f"out_features {features} must follow the stage order: use {ordered}; the {_valid(stage_names)}."
            )

    indices = _as_list(out_indices, "out_indices", int, stage_names)
    if indices is not None:
        bad = [i for i in indices if not -n <= i < n]
        if bad:
            raise ValueError(
                f"out_indices {indices} has indices {bad} out of range for {n} stages "
                f"(valid: {-n}..{n - 1}); the {_valid(stage_names)}."
            )
        positive = [i % n for i in indices]
        if len(set(positive)) != len(positive):
            raise ValueError(
                f"out_indices {indices} selects a stage twice (as positions {positive}); the {_valid(stage_names)}."
            )
        if positive != sorted(positive):
            ordered = [i for _, i in sorted(zip(positive, indices, strict=True))]
            raise ValueError(
                f"out_indices {indices} must follow the stage order: use {ordered}; the {_valid(stage_names)}."
            )

    if features is not None and indices is not None:
        named = [stage_names[i] for i in indices]
        if features != named:
            raise ValueError(
                f"out_features {features} and out_indices {indices} (= {named}) select different stages; "
                f"give only one of them or make them agree. The {_valid(stage_names)}."
            )


def get_aligned_output_features_output_indices(
    out_features: Sequence[str] | None,
    out_indices: Sequence[int] | None,
    stage_names: Sequence[str],
) -> tuple[list[str], list[int]]:
    """Return `(out_features, out_indices)` as aligned lists, deriving whichever is missing.

    >>> get_aligned_output_features_output_indices(None, (-3, -1), ["a", "b", "c"])
    (['a', 'c'], [-3, -1])
    """
    verify_out_features_out_indices(out_features, out_indices, stage_names)
    stage_names = list(stage_names)
    if out_features is None and out_indices is None:
        return [stage_names[-1]], [len(stage_names) - 1]
    if out_indices is None:
        features = list(out_features)
        return features, [stage_names.index(f) for f in features]
    indices = list(out_indices)
    return [stage_names[i] for i in indices], indices

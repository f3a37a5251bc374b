"""select_layers: the published top-percentage rule, its tie-breaking and its input checks."""

from __future__ import annotations

import math

import pytest
from conftest import tiny_model, token_rows

from aletheia_lora import LayerScores, gradient_probe, select_layers


def _scores(values):
    return {i: float(v) for i, v in enumerate(values)}


def test_returns_ascending_top_half_by_default():
    scores = _scores([0.1, 5.0, 0.3, 4.0, 0.2, 3.0])
    assert select_layers(scores) == [1, 3, 5]


def test_result_is_ascending_not_ranked():
    # Highest score is the last layer; the result is still sorted by index.
    scores = _scores([2.0, 1.0, 3.0, 10.0])
    assert select_layers(scores, top_pct=50) == [2, 3]


@pytest.mark.parametrize(
    ("n", "top_pct", "expected_k"),
    [
        (8, 50, 4),
        (10, 25, 2),  # floor(2.5)
        (3, 50, 1),  # floor(1.5)
        (7, 99, 6),  # floor(6.93)
        (4, 100, 4),
        (32, 12.5, 4),
        (5, 1, 1),  # floor(0.05) = 0, but at least one layer
        (1, 50, 1),
    ],
)
def test_budget_is_floor_with_minimum_one(n, top_pct, expected_k):
    scores = _scores(range(n))  # strictly increasing: the top k are the last k indices
    chosen = select_layers(scores, top_pct=top_pct)
    assert len(chosen) == expected_k
    assert chosen == list(range(n - expected_k, n))


def test_ties_broken_by_lower_index():
    scores = {0: 1.0, 1: 2.0, 2: 2.0, 3: 2.0, 4: 1.0}
    assert select_layers(scores, top_k=1) == [1]
    assert select_layers(scores, top_k=2) == [1, 2]
    assert select_layers(scores, top_k=4) == [0, 1, 2, 3]
    all_equal = {i: 0.5 for i in range(6)}
    assert select_layers(all_equal, top_pct=50) == [0, 1, 2]


def test_top_k_overrides_top_pct():
    scores = _scores([5, 1, 4, 2, 3, 0])
    assert select_layers(scores, top_pct=100, top_k=2) == [0, 2]
    assert select_layers(scores, top_pct=10, top_k=5) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("top_k", [0, -1, 7, 2.5])
def test_bad_top_k(top_k):
    with pytest.raises(ValueError, match="top_k"):
        select_layers(_scores(range(6)), top_k=top_k)


@pytest.mark.parametrize("top_pct", [0, -10, 100.5, 150, 0.0])
def test_top_pct_outside_range_names_the_value(top_pct):
    with pytest.raises(ValueError) as err:
        select_layers(_scores(range(4)), top_pct=top_pct)
    assert "top_pct" in str(err.value)
    assert repr(top_pct) in str(err.value)


def test_empty_scores_rejected():
    with pytest.raises(ValueError):
        select_layers({})
    with pytest.raises(ValueError):
        select_layers(LayerScores())


def test_nan_scores_rejected():
    with pytest.raises(ValueError):
        select_layers({0: 1.0, 1: math.nan, 2: 0.5})
    with pytest.raises(ValueError):
        select_layers(LayerScores({0: math.nan, 1: 1.0}))


def test_plain_dict_and_non_contiguous_indices():
    scores = {10: 0.5, 3: 2.0, 7: 1.0, 21: 3.0}
    assert select_layers(scores, top_pct=50) == [3, 21]
    assert select_layers(scores, top_k=3) == [3, 7, 21]
    assert all(type(i) is int for i in select_layers(scores, top_k=3))


def test_integer_scores_accepted():
    assert select_layers({0: 1, 1: 3, 2: 2, 3: 0}, top_pct=50) == [1, 2]


def test_layer_scores_and_equivalent_plain_dict_agree():
    values = {0: 0.7, 1: 0.2, 2: 0.9, 3: 0.4, 4: 0.1}
    ls = LayerScores(values, meta={"method": "onepass"})
    for pct in (20, 40, 60, 100):
        assert select_layers(ls, top_pct=pct) == select_layers(dict(values), top_pct=pct)


def test_selection_from_probe_is_reproducible():
    model = tiny_model("llama", 4, seed=3)
    rows = token_rows(8, seed=5)
    first = gradient_probe(model, rows, probe_batches=3, seed=11)
    second = gradient_probe(model, rows, probe_batches=3, seed=11)
    assert dict(first) == dict(second)
    assert select_layers(first, top_pct=50) == select_layers(second, top_pct=50)
    assert len(select_layers(first, top_pct=50)) == 2
    # The chosen layers are exactly the two highest scores.
    chosen = select_layers(first, top_pct=50)
    others = [i for i in first if i not in chosen]
    assert min(first[i] for i in chosen) >= max(first[i] for i in others)

"""Selection strategies: top (unchanged), last, random, depth-aware with and without a speed target."""

from __future__ import annotations

import itertools
import random

import pytest
from conftest import tiny_model, token_rows

from aletheia_lora import AletheiaConfig, prepare_model, select_layers
from aletheia_lora.costmodel import CostModel, cost_model, uniform_cost_model
from aletheia_lora.selection import STRATEGIES, depth_candidates


def _random_scores(n, seed):
    rng = random.Random(seed)
    return {i: rng.uniform(0, 10) for i in range(n)}


def _varied_cost(n, seed=0):
    """Blocks of different forward/backward cost, the same LoRA cost (the case depth-aware is exact for)."""
    rng = random.Random(seed)
    forward = [rng.uniform(1, 3) for _ in range(n)]
    backward = [f * rng.uniform(0.8, 1.5) for f in forward]
    return CostModel(forward=forward, backward=backward, lora=[0.7] * n, head=2.0, head_backward=2.0)


@pytest.mark.parametrize("seed", range(5))
def test_top_is_the_published_rule(seed):
    scores = _random_scores(12, seed)
    for pct in (10, 25, 50, 99, 100):
        k = max(1, int(12 * pct / 100))
        expected = sorted(sorted(scores, key=lambda i: (-scores[i], i))[:k])
        assert select_layers(scores, pct) == expected
        assert select_layers(scores, pct, strategy="top", model=object(), seed=seed + 1) == expected


def test_last():
    assert select_layers(_random_scores(10, 0), top_pct=30, strategy="last") == [7, 8, 9]
    assert select_layers({10: 1.0, 3: 5.0, 7: 2.0, 21: 0.5}, top_k=2, strategy="last") == [10, 21]


def test_random_is_deterministic_by_seed_and_of_size_k():
    scores = _random_scores(32, 1)
    draws = [select_layers(scores, top_k=8, strategy="random", seed=s) for s in range(6)]
    for seed, draw in enumerate(draws):
        assert draw == select_layers(scores, top_k=8, strategy="random", seed=seed)
        assert len(draw) == len(set(draw)) == 8
        assert draw == sorted(draw) and set(draw) <= set(scores)
        assert all(type(i) is int for i in draw)
    assert len({tuple(d) for d in draws}) == len(draws)  # different seeds, different draws
    sparse = {3: 1.0, 9: 2.0, 40: 0.1, 41: 0.2}
    assert set(select_layers(sparse, top_k=3, strategy="random", seed=5)) <= set(sparse)


def test_unknown_strategy_lists_the_choices():
    with pytest.raises(ValueError) as err:
        select_layers({0: 1.0, 1: 2.0}, strategy="bottom")
    for name in STRATEGIES:
        assert name in str(err.value)


def test_target_speedup_needs_depth_aware_and_a_sensible_value():
    with pytest.raises(ValueError, match="depth-aware"):
        select_layers({0: 1.0, 1: 2.0}, strategy="top", target_speedup=1.5)
    for bad in (0.5, -1, float("nan"), True):
        with pytest.raises(ValueError, match="target_speedup"):
            select_layers({0: 1.0, 1: 2.0}, strategy="depth-aware", target_speedup=bad)


def test_uniform_fallback_skips_an_inflated_bottom_layer():
    # The SmolLM2 story: layer 0's score is inflated. "top" takes it and so back-propagates through
    # every block; depth-aware gives up a little score for a much shorter backward pass.
    scores = {0: 10.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 6.0, 5: 7.0, 6: 8.0, 7: 9.0}
    assert select_layers(scores, top_k=4) == [0, 5, 6, 7]
    assert select_layers(scores, top_k=4, strategy="depth-aware") == [4, 5, 6, 7]
    # uniform: forward 8 + backward (8 - m) + LoRA 4 -> m=0: 34/20, m=4: 30/16
    rows = {c.layers: (c.captured, c.cost) for c in depth_candidates(scores, 4)}
    assert rows[(0, 5, 6, 7)] == (34.0, 20.0)
    assert rows[(4, 5, 6, 7)] == (30.0, 16.0)
    # a dominant bottom layer is still worth its cost
    assert select_layers({**scores, 0: 100.0}, top_k=4, strategy="depth-aware") == [0, 5, 6, 7]


@pytest.mark.parametrize("seed", range(6))
def test_depth_aware_maximises_score_per_cost_over_every_lowest_layer(seed):
    n, k = 10, 4
    scores = _random_scores(n, seed)
    cost = _varied_cost(n, seed)
    chosen = select_layers(scores, top_k=k, strategy="depth-aware", cost=cost)
    best = None
    for m in range(n - k + 1):  # brute force, written out independently of the library
        above = sorted(range(m, n), key=lambda i: (-scores[i], i))[:k]
        ratio = sum(scores[i] for i in above) / cost.step_cost(above)
        if best is None or ratio > best[0] + 1e-12:
            best = (ratio, sorted(above))
    assert chosen == best[1]
    assert len(chosen) == k


@pytest.mark.parametrize(("seed", "target"), itertools.product(range(4), (1.1, 1.3, 1.6, 2.0)))
def test_depth_aware_with_target_takes_the_most_score_that_is_fast_enough(seed, target):
    n, k = 8, 5
    scores = _random_scores(n, seed)
    cost = _varied_cost(n, seed)
    reachable = [  # every subset of at most k layers, brute force
        (sum(scores[i] for i in s), s)
        for size in range(1, k + 1)
        for s in itertools.combinations(range(n), size)
        if cost.speedup(s) >= target
    ]
    if not reachable:
        with pytest.raises(ValueError, match="out of reach"):
            select_layers(scores, top_k=k, strategy="depth-aware", cost=cost, target_speedup=target)
        return
    chosen = select_layers(scores, top_k=k, strategy="depth-aware", cost=cost, target_speedup=target)
    assert cost.speedup(chosen) >= target
    assert len(chosen) <= k
    assert sum(scores[i] for i in chosen) == pytest.approx(max(r[0] for r in reachable), rel=1e-12)


def test_unreachable_target_says_the_maximum():
    scores = _random_scores(8, 3)
    cost = uniform_cost_model(8)
    fastest = max(cost.speedup(s) for size in (1, 2) for s in itertools.combinations(range(8), size))
    assert fastest == cost.speedup([7]) == 24 / 10
    with pytest.raises(ValueError) as err:
        select_layers(scores, top_k=2, strategy="depth-aware", cost=cost, target_speedup=3.0)
    message = str(err.value)
    assert "target_speedup=3.0 is out of reach" in message
    assert "2.40x" in message and "[7]" in message


def test_target_with_top_pct_100_has_no_count_ceiling():
    scores = {i: 1.0 for i in range(8)}
    cost = uniform_cost_model(8)  # all layers 24, top half 16 (1.5x), top 5 layers 18 (1.33x)
    assert select_layers(scores, 100, strategy="depth-aware", cost=cost, target_speedup=1.3) == [
        3,
        4,
        5,
        6,
        7,
    ]
    assert select_layers(scores, 50, strategy="depth-aware", cost=cost, target_speedup=1.3) == [4, 5, 6, 7]
    assert select_layers(scores, 100, strategy="depth-aware", cost=cost, target_speedup=1.0) == list(range(8))


def test_depth_aware_with_a_model_and_checks_the_layer_range(llama):
    scores = {0: 5.0, 1: 1.0, 2: 2.0, 3: 3.0}
    chosen = select_layers(scores, top_k=2, strategy="depth-aware", model=llama)
    assert chosen == sorted(chosen) and len(chosen) == 2
    cost = cost_model(llama)
    assert chosen == select_layers(scores, top_k=2, strategy="depth-aware", cost=cost)
    with pytest.raises(ValueError, match="cost model covers 4 layers"):
        select_layers({**scores, 9: 1.0}, top_k=2, strategy="depth-aware", cost=cost)


def test_config_and_prepare_model_carry_the_strategy():
    with pytest.raises(ValueError, match="strategy"):
        AletheiaConfig(strategy="best")
    with pytest.raises(ValueError, match="target_speedup"):
        AletheiaConfig(target_speedup=1.5)  # strategy "top"
    model = tiny_model("llama", 4, seed=1)
    _, plan = prepare_model(model, token_rows(4), AletheiaConfig(probe_batches=2, top_k=2, strategy="last"))
    assert plan.selected_layers == [2, 3]
    data = plan.to_dict()
    assert data["config"]["strategy"] == "last" and data["config"]["target_speedup"] is None
    _, plan = prepare_model(
        tiny_model("llama", 4, seed=1),
        token_rows(4),
        probe_batches=2,
        top_pct=100,
        strategy="depth-aware",
        target_speedup=1.3,
    )
    assert cost_model(model).speedup(plan.selected_layers) >= 1.3


def test_prepare_model_costs_depth_aware_with_the_ranks_it_trains():
    expected_cost = cost_model(tiny_model("llama", num_layers=6), r=4, mlp_r=32)
    _, plan = prepare_model(
        tiny_model("llama", num_layers=6),
        token_rows(4),
        probe_batches=2,
        strategy="depth-aware",
        r=4,
        mlp_r=32,
    )
    assert plan.config.strategy == "depth-aware"
    assert plan.selected_layers == select_layers(plan.scores, 50, strategy="depth-aware", cost=expected_cost)

"""stats.py: rank correlations, permutation p-values, seed spread and cost-matched random controls."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest

from aletheia_lora.stats import (
    blocked_difference,
    blocked_permutation_pvalue,
    kendall_tau_b,
    matched_choices,
    matched_random,
    permutation_pvalues,
    spearman,
    spread,
    tied_ranks,
)


def test_tied_ranks_and_rank_correlations_by_hand():
    assert tied_ranks([10, 20, 20, 30]) == [1, 2.5, 2.5, 4]
    assert tied_ranks([3, 1, 3, 3]) == [3, 1, 3, 3]
    assert spearman([1, 2, 3], [2, 4, 9]) == pytest.approx(1.0)
    assert kendall_tau_b([1, 2, 3], [9, 4, 2]) == pytest.approx(-1.0)
    # ties in y: ranks y = [1, 4, 2.5, 2.5, 5]; sxy = 6.5, sxx = 10, syy = 9.5
    x, y = [1, 2, 3, 4, 5], [1, 3, 2, 2, 5]
    assert spearman(x, y) == pytest.approx(6.5 / math.sqrt(95))
    # concordant - discordant = 5; 10 pairs untied in x, 9 in y
    assert kendall_tau_b(x, y) == pytest.approx(5 / math.sqrt(90))
    # ties on both sides: rho = 3.75 / 4.5; tau-b = 4 / sqrt(5 * 5)
    assert spearman([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(3.75 / 4.5)
    assert kendall_tau_b([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(kendall_tau_b([1, 2, 3], [5, 5, 5]))


def test_rank_correlations_agree_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    import random

    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(3, 12)
        x = [rng.randint(0, 4) for _ in range(n)]
        y = [rng.choice([0.5, 1.0, 2.0, rng.random()]) for _ in range(n)]
        if len(set(x)) < 2 or len(set(y)) < 2:
            continue
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
        assert kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y).statistic)


def test_permutation_pvalues_are_small_for_a_perfect_ranking_and_large_for_its_reverse():
    x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    good = permutation_pvalues(x, [2 * v for v in x], permutations=2000)
    bad = permutation_pvalues(x, [-v for v in x], permutations=2000)
    assert good["spearman"] < 0.01 and good["kendall"] < 0.01
    assert bad["spearman"] > 0.99 and bad["kendall"] > 0.99


def test_matched_random_keeps_the_size_and_never_goes_below_the_lowest_layer():
    for selected, n in (([5, 9, 11], 16), ([0, 3], 4), ([7], 8), ([2, 3, 6, 7], 8), ([12, 13, 14, 15], 16)):
        for seed, k in itertools.product(range(5), range(4)):
            drawn = matched_random(selected, n, k, seed)
            assert len(drawn) == len(set(drawn)) == len(selected)
            assert drawn == sorted(drawn) and min(drawn) == min(selected) and max(drawn) < n
    # the draw is a function of (seed, k): repeatable, and different across seeds and across draws
    assert matched_random([5, 9, 11], 16, 0, 1) == matched_random([11, 9, 5], 16, 0, 1)
    by_seed = {tuple(matched_random([4, 9, 11, 13], 24, 0, seed)) for seed in range(6)}
    by_draw = {tuple(matched_random([4, 9, 11, 13], 24, k, 0)) for k in range(6)}
    assert len(by_seed) > 3 and len(by_draw) > 3
    with pytest.raises(ValueError, match="outside"):
        matched_random([3, 8], 8, 0, 0)
    with pytest.raises(ValueError, match="distinct"):
        matched_random([3, 3], 8, 0, 0)


def test_matched_choices_counts_the_selections_a_control_can_be():
    assert matched_choices([2, 3], 4) == 1  # every layer from the lowest up: nothing else to draw
    assert matched_choices([5], 16) == 1
    assert matched_choices([1, 3], 4) == 2  # 1 + one of {2, 3}
    assert matched_choices([4, 9, 11, 13], 24) == math.comb(19, 3)
    drawn = {tuple(matched_random([1, 3], 4, k, s)) for k in range(5) for s in range(5)}
    assert drawn == {(1, 2), (1, 3)}


def test_spread_of_seed_values():
    assert spread([1.0, 2.0, 3.0]) == {"n": 3, "mean": 2.0, "sd": 1.0}
    assert spread([4.0]) == {"n": 1, "mean": 4.0, "sd": None}
    assert spread([]) == {"n": 0, "mean": None, "sd": None}


def test_blocked_difference_by_hand():
    # seed 0: arm 1.0, controls 2, 4 (mean 3); seed 1: arm 3.0, controls 4, 6 (mean 5): both 2 lower
    d = blocked_difference([([1.0], [2.0, 4.0]), ([3.0], [4.0, 6.0])])
    # within-block squares: 0 + 2 (seed 0) + 0 + 2 (seed 1) = 4 over df 2 -> s = sqrt(2)
    assert d["difference"] == pytest.approx(2.0) and d["df"] == 2 and d["blocks"] == 2
    assert d["se"] == pytest.approx(math.sqrt(2) * math.sqrt(2 * 1.5) / 2)
    assert d["z"] == pytest.approx(2.0 / d["se"])
    # a seed offset common to arm and controls changes nothing
    shifted = blocked_difference([([1.0], [2.0, 4.0]), ([103.0], [104.0, 106.0])])
    assert shifted["se"] == pytest.approx(d["se"]) and shifted["difference"] == pytest.approx(2.0)
    one = blocked_difference([([1.0], [2.0])])  # no within-block spread to measure
    assert one["difference"] == 1.0 and one["se"] is None and one["z"] is None
    assert blocked_difference([([1.0], [])])["difference"] is None  # a seed without controls is left out


def _brute_force(groups):
    """Every within-block relabelling, by hand: the share whose difference is at least the observed."""

    def diff(labelled):
        return statistics.fmean(statistics.fmean(c) - statistics.fmean(a) for a, c in labelled)

    options = []
    for a, c in groups:
        pooled = a + c
        options.append([
            ([pooled[i] for i in idx], [pooled[i] for i in range(len(pooled)) if i not in idx])
            for idx in itertools.combinations(range(len(pooled)), len(a))
        ])  # fmt: skip
    observed = diff(groups)
    values = [diff(choice) for choice in itertools.product(*options)]
    return sum(v >= observed - 1e-12 for v in values) / len(values)


def test_blocked_permutation_pvalue_is_exact_when_small():
    best = blocked_permutation_pvalue([([1.0], [2.0, 3.0, 4.0])])
    assert best == {"p_value": 0.25, "exact": True, "relabellings": 4, "difference": pytest.approx(2.0)}
    three = [([1.0], [2.0, 3.0, 4.0]), ([1.5], [2.0, 2.5, 9.0]), ([0.5], [0.7, 0.6, 0.8])]
    p = blocked_permutation_pvalue(three)
    assert p["relabellings"] == 4**3 and p["p_value"] == pytest.approx(1 / 64)  # lowest in every seed
    worst = blocked_permutation_pvalue([([9.0], c) for _, c in three])
    assert worst["p_value"] == 1.0
    mixed = [([2.5], [2.0, 3.0, 4.0]), ([1.5, 2.2], [2.0, 2.5, 9.0]), ([0.65], [0.7, 0.6, 0.8])]
    assert blocked_permutation_pvalue(mixed)["p_value"] == pytest.approx(_brute_force(mixed))
    assert blocked_permutation_pvalue([([1.0], [])]) == {
        "p_value": None, "exact": True, "relabellings": 1, "difference": None
    }  # fmt: skip


def test_blocked_permutation_pvalue_draws_when_large_and_agrees_with_exact():
    groups = [([1.0, 1.2], [1.1, 1.6, 1.9, 1.4, 2.0]), ([1.3], [1.2, 1.8, 1.7, 2.1])]
    exact = blocked_permutation_pvalue(groups)
    drawn = blocked_permutation_pvalue(groups, permutations=50, seed=3)
    assert exact["exact"] and exact["relabellings"] == 21 * 5 and not drawn["exact"]
    assert drawn == blocked_permutation_pvalue(groups, permutations=50, seed=3)  # seeded
    # more relabellings than the limit: drawn, close to the exact value (enumerated with a higher limit)
    bigger = [(a * 2, c * 3) for a, c in groups]
    drawn = blocked_permutation_pvalue(bigger, seed=1)
    exact = blocked_permutation_pvalue(bigger, permutations=10**6)
    assert (
        not drawn["exact"] and exact["exact"] and drawn["relabellings"] == math.comb(19, 4) * math.comb(14, 2)
    )
    assert drawn["p_value"] == pytest.approx(exact["p_value"], abs=0.02)

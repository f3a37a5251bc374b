"""The small statistics ``study`` and ``oracle`` report: rank correlations, permutation p-values, seed
spread, and cost-matched random controls. Pure Python (numpy for the many-permutation cases), no torch.

* :func:`tied_ranks`, :func:`spearman`, :func:`kendall_tau_b`, :func:`permutation_pvalues`: does a
  probe signal rank layers as their measured utility does (``oracle``)?
* :func:`matched_random`, :func:`matched_choices`: random layer selections with the same size and the
  same lowest layer as a given one, so the same backward depth and step cost (``study``'s controls).
* :func:`spread`, :func:`blocked_difference`, :func:`blocked_permutation_pvalue`: does an arm beat its
  controls across seeds, by how many standard errors, and how likely is that by chance (``study``)?

The comparison of an arm with its controls is *blocked by seed*: within one seed the arm and its
controls share the data order and the LoRA initialisation, so a seed's effect on the loss is common to
them and is taken out, and only the within-seed spread counts as noise.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

PERMUTATIONS = 10_000  # permutation p-values: at most this many relabellings, enumerated or drawn


# --------------------------------------------------------------------------- rank correlation


def tied_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of ``values`` (1 = smallest); tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's correlation of the tied ranks; NaN when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values but {len(y)} y values.")
    rx, ry = tied_ranks(x), tied_ranks(y)
    mx, my = statistics.fmean(rx) if rx else 0.0, statistics.fmean(ry) if ry else 0.0
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b: (concordant - discordant) / sqrt(pairs untied in x * pairs untied in y); NaN
    when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b: {len(x)} x values but {len(y)} y values.")
    n = len(x)
    sign = lambda v: (v > 0) - (v < 0)  # noqa: E731
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    score = sum(sign(x[i] - x[j]) * sign(y[i] - y[j]) for i, j in pairs)
    untied_x = sum(x[i] != x[j] for i, j in pairs)
    untied_y = sum(y[i] != y[j] for i, j in pairs)
    return score / math.sqrt(untied_x * untied_y) if untied_x and untied_y else math.nan


def permutation_pvalues(
    x: Sequence[float], y: Sequence[float], *, permutations: int = PERMUTATIONS, seed: int = 0
) -> dict[str, float]:
    """One-sided permutation p-values of Spearman's rho and Kendall's tau-b: the chance that ``y`` paired
    with ``x`` at random correlates at least as positively (``(1 + hits) / (1 + permutations)``)."""
    n = len(x)
    rho, tau = spearman(x, y), kendall_tau_b(x, y)
    if n < 3 or math.isnan(rho) or math.isnan(tau):
        return {"spearman": math.nan, "kendall": math.nan}
    perms = np.argsort(np.random.default_rng(seed).random((permutations, n)), axis=1)
    rx, ry = np.asarray(tied_ranks(x)), np.asarray(tied_ranks(y))
    cx, cy = rx - rx.mean(), ry - ry.mean()
    rhos = (cy[perms] @ cx) / math.sqrt(float(cx @ cx) * float(cy @ cy))
    i, j = np.triu_indices(n, 1)
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    sx, sy = np.sign(xs[i] - xs[j]), np.sign(ys[i] - ys[j])  # permuting y keeps its ties: same denominator
    taus = (
        np.sign(ys[perms][:, i] - ys[perms][:, j])
        @ sx
        / math.sqrt(np.count_nonzero(sx) * np.count_nonzero(sy))
    )
    eps = 1e-12  # a permutation equal to the observed pairing counts as at least as good
    return {
        "spearman": float((1 + np.sum(rhos >= rho - eps)) / (1 + permutations)),
        "kendall": float((1 + np.sum(taus >= tau - eps)) / (1 + permutations)),
    }


# --------------------------------------------------------------------------- cost-matched controls


def matched_random(selected: Sequence[int], num_layers: int, k: int, seed: int) -> list[int]:
    """The ``k``-th cost-matched random control of ``selected`` for run seed ``seed``: as many layers as
    ``selected``, its lowest layer among them, the others drawn uniformly without replacement from the
    layers above it (up to ``num_layers - 1``); sorted.

    Keeping the lowest layer keeps the backward pass exactly as deep (backward stops at the lowest
    adapted layer), so a control costs what its arm costs per step; the draw is a function of
    ``(seed, k)`` alone (``random.Random`` seeded with a string, the same on every platform), so two arms
    with the same lowest layer and size get the same controls, and a resumed run draws them again.
    """
    layers = sorted(set(selected))
    if not layers or len(layers) != len(selected):
        raise ValueError(f"matched_random: selected={list(selected)}; give distinct layer indices.")
    if layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"matched_random: selected={layers} lies outside 0..{num_layers - 1}.")
    if k < 0:
        raise ValueError(f"matched_random: k={k}; draws are numbered from 0.")
    floor = layers[0]
    rng = random.Random(f"matched-random:{seed}:{k}")
    return sorted([floor, *rng.sample(range(floor + 1, num_layers), len(layers) - 1)])


def matched_choices(selected: Sequence[int], num_layers: int) -> int:
    """How many selections :func:`matched_random` can draw for ``selected`` (its own included). 1: the
    selection is every layer from its lowest up (or one layer), so there is no matched alternative."""
    floor = min(selected)
    return math.comb(num_layers - floor - 1, len(selected) - 1)


# --------------------------------------------------------------------------- arm against controls


def spread(values: Sequence[float]) -> dict[str, Any]:
    """``{"n", "mean", "sd"}`` of ``values``; ``sd`` is the sample standard deviation (n - 1), None for
    fewer than two values (and ``mean`` None for none)."""
    n = len(values)
    return {
        "n": n,
        "mean": statistics.fmean(values) if n else None,
        "sd": statistics.stdev(values) if n > 1 else None,
    }


Groups = Sequence[tuple[Sequence[float], Sequence[float]]]


def _usable(groups: Groups) -> list[tuple[list[float], list[float]]]:
    return [(list(a), list(c)) for a, c in groups if len(a) and len(c)]


def blocked_difference(groups: Groups) -> dict[str, Any]:
    """How much lower the arm's values are than its controls', in standard errors.

    ``groups``: one ``(arm values, control values)`` pair per block (seed); blocks lacking either side are
    left out. ``difference`` = the mean over blocks of (control mean - arm mean): positive when the arm's
    values are lower (an NLL: better). ``se``: its standard error from the within-block spread, pooled
    over blocks and both sides (block effects cancel; under the null hypothesis the arm varies as a control
    does), ``s^2 = sum of squared deviations from each block's own arm and control means / df``, ``df =
    sum over blocks of (n_arm - 1) + (n_control - 1)``, ``se = s * sqrt(sum over blocks of (1/n_arm +
    1/n_control)) / blocks``. ``z = difference / se``. ``se`` and ``z`` are None when ``df`` is 0 (one arm
    value and one control per block) or the spread is 0."""
    usable = _usable(groups)
    out: dict[str, Any] = {"blocks": len(usable), "difference": None, "se": None, "z": None, "df": 0}
    if not usable:
        return out
    b = len(usable)
    out["difference"] = statistics.fmean(statistics.fmean(c) - statistics.fmean(a) for a, c in usable)
    squares = sum(sum((v - statistics.fmean(side)) ** 2 for v in side) for pair in usable for side in pair)
    df = sum(len(a) - 1 + len(c) - 1 for a, c in usable)
    out["df"] = df
    if df > 0 and squares > 0:
        s = math.sqrt(squares / df)
        out["se"] = s * math.sqrt(sum(1 / len(a) + 1 / len(c) for a, c in usable)) / b
        out["z"] = out["difference"] / out["se"]
    return out


def blocked_permutation_pvalue(
    groups: Groups, *, permutations: int = PERMUTATIONS, seed: int = 0
) -> dict[str, Any]:
    """One-sided permutation p-value that the arm's values are lower than its controls'.

    Null hypothesis: within each block (seed) the arm's values and the controls' are exchangeable (the
    arm's selection is no better than a matched random one). Every relabelling keeps each block's
    numbers of arm and control values; the statistic is :func:`blocked_difference`'s ``difference``;
    ``p`` = the share of relabellings whose difference is at least the observed one.

    Exact (every relabelling enumerated, the observed one included) when there are at most
    ``permutations`` relabellings; otherwise ``permutations`` relabellings drawn with ``seed``, ``p =
    (1 + hits) / (1 + permutations)``. Returns ``{"p_value", "exact", "relabellings", "difference"}``
    (``p_value`` None without a usable block). The smallest p an exact test can give is ``1 /
    relabellings``: with one arm value and K controls per seed over S seeds, ``(K + 1) ** -S``."""
    usable = _usable(groups)
    total = math.prod(math.comb(len(a) + len(c), len(a)) for a, c in usable)
    out: dict[str, Any] = {"p_value": None, "exact": True, "relabellings": total, "difference": None}
    if not usable:
        return out
    b = len(usable)
    pooled = [np.asarray(a + c, dtype=float) for a, c in usable]

    def block_stat(values: np.ndarray, n_arm: int, arm_sum: np.ndarray | float) -> np.ndarray | float:
        n_control = len(values) - n_arm
        return ((values.sum() - arm_sum) / n_control - arm_sum / n_arm) / b

    observed = sum(block_stat(v, len(a), float(sum(a))) for v, (a, _) in zip(pooled, usable))
    out["difference"] = float(observed)
    eps = 1e-12 * max(1.0, abs(observed))  # a relabelling equal to the observed one counts as a hit
    if total <= permutations:
        per_block = [
            [
                block_stat(v, len(a), float(v[list(idx)].sum()))
                for idx in itertools.combinations(range(len(v)), len(a))
            ]
            for v, (a, _) in zip(pooled, usable)
        ]
        hits = sum(sum(combo) >= observed - eps for combo in itertools.product(*per_block))
        out["p_value"] = hits / total
        return out
    rng = np.random.default_rng(seed)
    stats = np.zeros(permutations)
    for v, (a, _) in zip(pooled, usable):
        keys = rng.random((permutations, len(v)))
        arm_idx = np.argsort(keys, axis=1)[:, : len(a)]
        stats += block_stat(v, len(a), v[arm_idx].sum(axis=1))
    out["exact"] = False
    out["p_value"] = float((1 + np.sum(stats >= observed - eps)) / (1 + permutations))
    return out


__all__ = [
    "PERMUTATIONS",
    "blocked_difference",
    "blocked_permutation_pvalue",
    "kendall_tau_b",
    "matched_choices",
    "matched_random",
    "permutation_pvalues",
    "spearman",
    "spread",
    "tied_ranks",
]

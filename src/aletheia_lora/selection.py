"""Layer selection: which blocks get LoRA adapters, given the probe's scores.

The published rule (``strategy="top"``) keeps the ``top_pct`` percent of layers with the
largest scores: ``k = max(1, floor(n * top_pct / 100))`` layers, ties broken by the lower
index, returned in ascending order. ``top_k`` asks for an exact count instead.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping


def budget(num_layers: int, top_pct: float = 50, top_k: int | None = None) -> int:
    """How many layers a budget of ``top_pct`` percent (or exactly ``top_k``) allows."""
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 1 <= top_k <= num_layers:
            raise ValueError(
                f"top_k={top_k!r}; it must be an integer in [1, {num_layers}] (the number of layers)."
            )
        return top_k
    if isinstance(top_pct, bool) or not isinstance(top_pct, numbers.Real) or not 0 < top_pct <= 100:
        raise ValueError(f"top_pct={top_pct!r}; it must be a percentage in (0, 100], e.g. top_pct=50.")
    return max(1, math.floor(num_layers * top_pct / 100))


def select_layers(
    layer_scores: Mapping[int, float],
    top_pct: float = 50,
    *,
    top_k: int | None = None,
) -> list[int]:
    """Keep the highest-scoring layers.

    Args:
        layer_scores: layer index -> score (a :class:`LayerScores` or any mapping).
        top_pct: percentage of layers to keep, in (0, 100] (default 50).
        top_k: keep exactly this many layers instead (overrides ``top_pct``).

    Returns:
        Ascending list of layer indices.
    """
    if not layer_scores:
        raise ValueError("layer_scores is empty; run gradient_probe first (it returns one score per layer).")
    bad = {k: v for k, v in layer_scores.items() if not isinstance(v, numbers.Real) or not math.isfinite(v)}
    if bad:
        raise ValueError(
            f"layer_scores has non-finite or non-numeric scores {bad}; re-run the probe in float32."
        )
    k = budget(len(layer_scores), top_pct, top_k)
    ranked = sorted(layer_scores, key=lambda i: (-layer_scores[i], i))
    return sorted(int(i) for i in ranked[:k])

"""Layer selection: which blocks get LoRA adapters, given the probe's scores.

Every strategy spends a budget of ``k = max(1, floor(n * top_pct / 100))`` layers (``top_k``
asks for an exact count) and returns layer indices in ascending order.

* ``"top"`` (the published rule, default): the ``k`` highest scores, ties to the lower index.
* ``"depth-aware"``: score captured per unit of training cost. The backward pass stops at
  the lowest adapted layer ``m`` (``training.truncate_backward``), so a selection's cost is
  set mostly by ``m``, not by how many layers it adapts. For every possible ``m`` take the
  ``k`` best layers at or above it; keep the one with the largest
  ``captured score / predicted step cost``. With ``target_speedup`` the budget becomes a
  ceiling (*at most* ``k`` layers; ``top_pct=100`` for no ceiling) and the pick is the
  selection with the largest captured score among those predicted to train at least
  ``target_speedup`` times faster than all-layer LoRA.
* ``"random"``: ``k`` layers drawn with ``seed``; ``"last"``: the last ``k`` layers. Baselines.

Costs come from a :class:`~aletheia_lora.costmodel.CostModel`: the one given as ``cost``,
else one counted from ``model``'s shapes, else :func:`~aletheia_lora.costmodel.uniform_cost_model`
(every block costs the same).
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .costmodel import CostModel, cost_model, uniform_cost_model

STRATEGIES = ("top", "depth-aware", "random", "last")


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
    strategy: str = "top",
    seed: int = 0,
    cost: CostModel | None = None,
    model: Any = None,
    target_speedup: float | None = None,
    gradient_checkpointing: bool = False,
) -> list[int]:
    """Choose the layers to adapt.

    Args:
        layer_scores: layer index -> score (a :class:`LayerScores` or any mapping).
        top_pct: percentage of layers to keep, in (0, 100] (default 50).
        top_k: keep exactly this many layers instead (overrides ``top_pct``).
        strategy: ``"top"`` (default), ``"depth-aware"``, ``"random"`` or ``"last"`` (module docs).
        seed: the draw of ``strategy="random"``.
        cost: step-cost model for ``"depth-aware"`` (e.g. a calibrated one).
        model: the model, to count a cost model from its shapes when ``cost`` is not given.
        target_speedup: ``"depth-aware"`` only: the least predicted speedup over all-layer
            LoRA (e.g. 1.5); the budget is then a ceiling. Unreachable: ``ValueError``.
        gradient_checkpointing: predict costs for training with checkpointing.

    Returns:
        Ascending list of layer indices.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; use one of {list(STRATEGIES)}.")
    if not layer_scores:
        raise ValueError("layer_scores is empty; run gradient_probe first (it returns one score per layer).")
    bad = {k: v for k, v in layer_scores.items() if not isinstance(v, numbers.Real) or not math.isfinite(v)}
    if bad:
        raise ValueError(
            f"layer_scores has non-finite or non-numeric scores {bad}; re-run the probe in float32."
        )
    if target_speedup is not None:
        if strategy != "depth-aware":
            raise ValueError(
                f"target_speedup={target_speedup!r} needs strategy='depth-aware' (got strategy={strategy!r})."
            )
        if (
            isinstance(target_speedup, bool)
            or not isinstance(target_speedup, numbers.Real)
            or not (target_speedup >= 1)
        ):
            raise ValueError(
                f"target_speedup={target_speedup!r}; it must be a number >= 1 (1.5 = 1.5x faster than "
                f"all-layer LoRA)."
            )
    k = budget(len(layer_scores), top_pct, top_k)
    layers = sorted(int(i) for i in layer_scores)
    if strategy == "top":
        ranked = sorted(layer_scores, key=lambda i: (-layer_scores[i], i))
        return sorted(int(i) for i in ranked[:k])
    if strategy == "last":
        return layers[-k:]
    if strategy == "random":
        return sorted(random.Random(seed).sample(layers, k))
    return _depth_aware(layer_scores, k, cost, model, target_speedup, gradient_checkpointing)


# --------------------------------------------------------------------------- depth-aware


@dataclass(frozen=True)
class Candidate:
    """One selection depth-aware considered: its layers, their summed score, predicted cost."""

    layers: tuple[int, ...]
    captured: float  # sum of the selected layers' scores
    cost: float  # predicted step cost, in the cost model's unit
    speedup: float  # all-layer LoRA's cost / this cost

    @property
    def lowest(self) -> int:
        return self.layers[0]

    @property
    def score_per_cost(self) -> float:
        return self.captured / self.cost


def resolve_cost(
    layer_scores: Mapping[int, float], cost: CostModel | None = None, model: Any = None
) -> CostModel:
    """The cost model depth-aware uses: ``cost``, else counted from ``model`` (batch 4 x 1024,
    r=16), else uniform over layers ``0..max(layer_scores)``."""
    if cost is None:
        cost = (
            cost_model(model)
            if model is not None
            else uniform_cost_model(max(int(i) for i in layer_scores) + 1)
        )
    out = sorted(int(i) for i in layer_scores if not 0 <= int(i) < cost.num_layers)
    if out:
        raise ValueError(
            f"layer_scores has layers {out} but the cost model covers {cost.num_layers} layers "
            f"(0..{cost.num_layers - 1}); build the cost model from the same model as the scores."
        )
    return cost


def depth_candidates(
    layer_scores: Mapping[int, float],
    k: int | None = None,
    *,
    cost: CostModel | None = None,
    model: Any = None,
    gradient_checkpointing: bool = False,
    up_to: bool = False,
) -> list[Candidate]:
    """Every selection depth-aware weighs, one per allowed lowest layer ``m`` (ascending).

    For each ``m``: the ``k`` best-scoring layers at or above ``m`` (ties to the lower index).
    With ``up_to=True`` also every smaller count. A selection reached from several ``m``
    (when ``m`` itself is not among the best above it) is listed once. ``k=None``: every count.
    """
    cost = resolve_cost(layer_scores, cost, model)
    layers = sorted(int(i) for i in layer_scores)
    everything = cost.step_cost(range(cost.num_layers), gradient_checkpointing=gradient_checkpointing)
    counts = range(1, len(layers) + 1) if k is None else (range(1, k + 1) if up_to else (k,))
    seen: dict[tuple[int, ...], Candidate] = {}
    for pos, _ in enumerate(layers):
        above = sorted(layers[pos:], key=lambda i: (-layer_scores[i], i))
        for count in counts:
            if count > len(above):
                break
            chosen = tuple(sorted(above[:count]))
            if chosen in seen:
                continue
            step = cost.step_cost(chosen, gradient_checkpointing=gradient_checkpointing)
            seen[chosen] = Candidate(
                chosen, math.fsum(float(layer_scores[i]) for i in chosen), step, everything / step
            )
    return sorted(seen.values(), key=lambda c: (c.lowest, len(c.layers), c.layers))


def _depth_aware(layer_scores, k, cost, model, target_speedup, gradient_checkpointing) -> list[int]:
    candidates = depth_candidates(
        layer_scores,
        k,
        cost=cost,
        model=model,
        gradient_checkpointing=gradient_checkpointing,
        up_to=target_speedup is not None,
    )
    if target_speedup is None:  # most score per unit cost; ties: more score, then cheaper
        best = max(candidates, key=lambda c: (c.score_per_cost, c.captured, -c.cost))
        return list(best.layers)
    reaching = [c for c in candidates if c.speedup >= target_speedup * (1 - 1e-12)]
    if not reaching:
        fastest = max(candidates, key=lambda c: c.speedup)
        raise ValueError(
            f"target_speedup={target_speedup} is out of reach: the best any selection of at most {k} "
            f"layers reaches is {fastest.speedup:.2f}x (layers {list(fastest.layers)}); lower "
            f"target_speedup."
        )
    best = max(reaching, key=lambda c: (c.captured, c.speedup, -len(c.layers)))
    return list(best.layers)

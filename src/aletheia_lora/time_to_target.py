"""Time-to-target: when does a fine-tune first reach a quality, and how much sooner than all-layer LoRA?

A *curve* is one run's held-out loss at evaluation points: ``steps``, cumulative ``train_seconds``
(evaluation excluded) and ``heldout_loss``, the first point at step 0 (before training). For one
seed, the reference (all-layer LoRA) sets the targets:

* ``final``: its final held-out loss;
* ``95%`` / ``90%``: the loss after 95% / 90% of its total improvement, ``L0 - q (L0 - L_final)``.

An arm's time to a target is the training time at which its curve first reaches it, linearly
interpolated between the two evaluations around the crossing; ``None`` when it never does. Its
speedup is the reference's time to the same target over the arm's. Plain lists in, plain dicts out,
so anyone can recompute every figure from a record.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

TARGETS = ("final", "95%", "90%")


def crossing_time(seconds: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """The first time ``losses`` reaches ``target`` (``<=``), interpolated linearly in time; None if never."""
    if len(seconds) != len(losses):
        raise ValueError(
            f"{len(seconds)} times but {len(losses)} losses; a curve needs one of each per point."
        )
    for i, (t, loss) in enumerate(zip(seconds, losses)):
        if loss <= target:
            if i == 0:
                return float(t)
            t0, l0 = seconds[i - 1], losses[i - 1]
            return float(t0 + (l0 - target) / (l0 - loss) * (t - t0))
    return None


def targets(reference_losses: Sequence[float]) -> dict[str, float]:
    """The target losses a reference curve (first point: before training) sets."""
    start, final = reference_losses[0], reference_losses[-1]
    out = {"final": final}
    for name in TARGETS[1:]:
        q = float(name.rstrip("%")) / 100
        out[name] = start - q * (start - final)
    return out


def seed_times(curves: dict[str, dict[str, list]], reference: str) -> dict[str, dict[str, Any]]:
    """Per arm of one seed: time to each target and speedup over ``reference`` (None where not reached).

    ``curves``: arm -> {"train_seconds": [...], "heldout_loss": [...]}.
    """
    ref = curves[reference]
    goals = targets(ref["heldout_loss"])
    ref_times = {k: crossing_time(ref["train_seconds"], ref["heldout_loss"], v) for k, v in goals.items()}
    out: dict[str, dict[str, Any]] = {}
    for arm, curve in curves.items():
        times = {k: crossing_time(curve["train_seconds"], curve["heldout_loss"], v) for k, v in goals.items()}
        out[arm] = {
            "targets": goals,
            "time": times,
            "speedup": {
                k: ref_times[k] / t if t and ref_times[k] is not None else None for k, t in times.items()
            },
            "total_seconds": curve["train_seconds"][-1],
            # an arm that never got there ran out of run: its speedup is below this bound
            "speedup_bound": {
                k: ref_times[k] / curve["train_seconds"][-1] if t is None and ref_times[k] else None
                for k, t in times.items()
            },
        }
    return out


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample sd, standard error and n of ``values`` (sd and se None for one value)."""
    values = [float(v) for v in values]
    n = len(values)
    if not n:
        return {"mean": None, "sd": None, "se": None, "n": 0}
    sd = statistics.stdev(values) if n > 1 else None
    return {
        "mean": statistics.fmean(values),
        "sd": sd,
        "se": sd / math.sqrt(n) if sd is not None else None,
        "n": n,
    }


def summarize_arm(per_seed: list[dict[str, Any]], target: str) -> dict[str, Any]:
    """One arm's speedup to ``target`` over seeds: the spread where every seed reached it, else how many did
    and the bound of those that did not. ``faster`` says whether mean - 2 se > 1 (beyond 2 standard errors)."""
    reached = [s["speedup"][target] for s in per_seed if s["speedup"][target] is not None]
    bounds = [s["speedup_bound"][target] for s in per_seed if s["speedup_bound"][target] is not None]
    out = {"reached": len(reached), "seeds": len(per_seed), "bound": max(bounds) if bounds else None}
    if len(reached) == len(per_seed) and reached:
        stats = spread(reached)
        out |= stats
        out["faster"] = stats["se"] is not None and stats["mean"] - 2 * stats["se"] > 1
    return out


def equal_steps(curves: dict[str, dict[str, list]], reference: str) -> dict[str, float]:
    """Per arm: final held-out loss relative to the reference's at the same step count, in percent."""
    ref = curves[reference]["heldout_loss"][-1]
    return {arm: 100 * (c["heldout_loss"][-1] / ref - 1) for arm, c in curves.items()}


def common_grid(
    curves: Sequence[tuple[Sequence[float], Sequence[float]]], points: int = 50
) -> dict[str, list]:
    """Curves of several seeds on one time grid from 0 (linear interpolation, up to the shortest run; a run
    is at its first loss before its first point): the grid, and per grid point the mean, min and max loss.
    For plots: seeds shaded around their mean."""
    end = min(t[-1] for t, _ in curves)
    grid = [end * i / (points - 1) for i in range(points)]

    def at(t: Sequence[float], y: Sequence[float], x: float) -> float:
        if x <= t[0]:  # before its first point (e.g. while a probe runs) a run is where it started
            return y[0]
        for i in range(1, len(t)):
            if x <= t[i]:
                return y[i - 1] + (y[i] - y[i - 1]) * (
                    (x - t[i - 1]) / (t[i] - t[i - 1]) if t[i] > t[i - 1] else 1
                )
        return y[-1]

    values = [[at(t, y, x) for t, y in curves] for x in grid]
    return {
        "seconds": grid,
        "mean": [statistics.fmean(v) for v in values],
        "low": [min(v) for v in values],
        "high": [max(v) for v in values],
    }


__all__ = [
    "TARGETS",
    "common_grid",
    "crossing_time",
    "equal_steps",
    "seed_times",
    "spread",
    "summarize_arm",
    "targets",
]

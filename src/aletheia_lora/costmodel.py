"""What a LoRA training step costs, layer by layer, and how much a layer selection saves.

A training step of a causal LM with LoRA on the selected blocks ``S`` (lowest adapted block
``m``), with the backward pass stopped below ``m`` (``training.truncate_backward``), costs

    step(S) = sum_l F_l + H                 forward through every block, then the LM head
            + H_b + sum_{l >= m} B_l        backward: head, then the blocks down to m only
            + sum_{l in S} L_l              the LoRA matrices of the adapted blocks
            [+ sum_{l >= m} F_l]            with gradient checkpointing: blocks >= m re-run forward

and the predicted speedup of ``S`` is ``step(all layers) / step(S)``. The terms, counted in
FLOPs from the real module shapes (``t = batch_size * seq_len`` tokens):

* ``F_l``, forward of block l: every Linear / Conv1D ``2 * t * in * out``; a 3-D MoE expert
  tensor ``(E, out, in)`` sees each token ``k`` times (``k = config.num_experts_per_tok``;
  without it every expert is counted for every token, an upper bound); attention scores and
  values ``2 * 2 * batch * heads * seq^2 * head_dim``, halved because attention is causal.
* ``B_l``, backward of block l: only the gradient with respect to the activations (the base
  weights are frozen, their gradients are never formed): the same FLOPs as the matmuls'
  forward, and twice the attention forward.
* ``L_l``, LoRA on block l: per adapted Linear, the forward and backward of ``A`` and ``B``
  including their weight gradients, ``3 * 2 * t * r * (in + out)`` FLOPs, times
  ``lora_slowdown`` (below). PEFT adapts a 3-D expert tensor by adding ``B @ A`` to it, so
  there it is ``3 * 2 * E * r * in * out`` (times ``lora_slowdown``) plus the gradient of the
  merged weight, ``2 * t * k * in * out``. Routers are never adapted.
* ``H`` and ``H_b``: the LM head's forward, and its input gradient (same FLOPs).

``lora_slowdown`` (default 60). LoRA's rank-16 matmuls and the elementwise work around them
(scaling, adding to the base output, casts) are memory-bound: a LoRA FLOP takes far longer
than a FLOP of the big frozen matmuls. On one H200 (DESIGN.md's tables, fitted with
:func:`calibrate`) it was 67x for Llama-3.1-8B and 51x for Qwen2.5-1.5B. With raw FLOPs
(``lora_slowdown=1``) adapters look free and the model predicts 1.31x for the top half of
Llama-3.1-8B where 1.53x was measured; with 60 it predicts 1.48x. So ``L_l`` is in
"base-matmul FLOP equivalents", measured at r=16; other ranks or other hardware: calibrate.

Norms, activations, the loss, the optimizer and kernel launches are not counted.
:func:`calibrate` fits the three kinds of work to a few measured step times (three are
enough), after which the model speaks seconds.

Plain data throughout: a :class:`CostModel` is lists of floats you can print, edit or build
by hand (``uniform_cost_model``).
"""

from __future__ import annotations

import itertools
import math
import numbers
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from torch import nn

from .architecture import Target, block_targets, find_blocks, weight_shape

COMPONENTS = ("forward", "backward", "lora")
# How many times longer a LoRA FLOP takes than a FLOP of the frozen matmuls (module docs).
LORA_SLOWDOWN = 60.0


@dataclass
class CostModel:
    """Per-layer cost of one training step, in ``unit`` (``"flop"``, ``"s"`` once calibrated).

    forward[l]:    forward pass of block l (``F_l``).
    backward[l]:   activation-gradient backward of block l (``B_l``), paid for l >= m.
    lora[l]:       extra cost of LoRA on block l (``L_l``), paid for adapted blocks.
    head:          LM head forward; ``head_backward``: its input gradient.
    meta:          how it was built (shapes, batch, ranks, calibration); informational.
    """

    forward: list[float]
    backward: list[float]
    lora: list[float]
    head: float = 0.0
    head_backward: float = 0.0
    unit: str = "flop"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.forward)
        if n == 0 or len(self.backward) != n or len(self.lora) != n:
            raise ValueError(
                f"forward, backward and lora must be non-empty lists of one cost per layer; got lengths "
                f"{len(self.forward)}, {len(self.backward)}, {len(self.lora)}."
            )
        values = [*self.forward, *self.backward, *self.lora, self.head, self.head_backward]
        if any(not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 for v in values):
            raise ValueError("costs must be finite non-negative numbers.")

    @property
    def num_layers(self) -> int:
        return len(self.forward)

    def _layers(self, selected: Iterable[int]) -> list[int]:
        layers = sorted({int(i) for i in selected})
        if not layers:
            raise ValueError("selected is empty; a LoRA selection adapts at least one layer.")
        out = [i for i in layers if not 0 <= i < self.num_layers]
        if out:
            raise ValueError(
                f"layers {out} are out of range: the cost model has {self.num_layers} layers "
                f"(valid: 0..{self.num_layers - 1})."
            )
        return layers

    def breakdown(self, selected: Iterable[int], *, gradient_checkpointing: bool = False) -> dict[str, float]:
        """The step cost of ``selected`` split into ``forward``, ``backward``, ``lora`` and ``recompute``."""
        layers = self._layers(selected)
        m = layers[0]
        return {
            "forward": math.fsum(self.forward) + self.head,
            "backward": self.head_backward + math.fsum(self.backward[m:]),
            "lora": math.fsum(self.lora[i] for i in layers),
            "recompute": math.fsum(self.forward[m:]) if gradient_checkpointing else 0.0,
        }

    def step_cost(self, selected: Iterable[int], *, gradient_checkpointing: bool = False) -> float:
        """Cost of one step with LoRA on ``selected`` (backward stopped at the lowest), in ``unit``."""
        return math.fsum(self.breakdown(selected, gradient_checkpointing=gradient_checkpointing).values())

    def speedup(self, selected: Iterable[int], *, gradient_checkpointing: bool = False) -> float:
        """All-layer LoRA's step cost over ``selected``'s (both with or both without checkpointing)."""
        everything = self.step_cost(range(self.num_layers), gradient_checkpointing=gradient_checkpointing)
        return everything / self.step_cost(selected, gradient_checkpointing=gradient_checkpointing)


def uniform_cost_model(
    num_layers: int, *, forward: float = 1.0, backward: float = 1.0, lora: float = 1.0, head: float = 0.0
) -> CostModel:
    """Every block costs the same: the model ``select_layers`` uses when it knows no shapes.

    The defaults (forward = backward = LoRA = 1 per block, head 0) are close to what one H200
    measured for Llama-3.1-8B (per block about 3.7 ms forward, 4.6 ms backward, 5.3 ms LoRA;
    see docs/method.md): they predict 1.5x for the top half and 2.0x for the top quarter
    (measured 1.53x and 2.09x).
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral) or num_layers < 1:
        raise ValueError(f"num_layers={num_layers!r}; it must be an integer >= 1.")
    return CostModel(
        forward=[float(forward)] * num_layers,
        backward=[float(backward)] * num_layers,
        lora=[float(lora)] * num_layers,
        head=float(head),
        head_backward=float(head),
        unit="uniform",
        meta={"source": "uniform"},
    )


# --------------------------------------------------------------------------- from model shapes


def _resolve(root: nn.Module, path: str) -> Any:
    """``root.<path>``, looking through PEFT wrappers (``.base_layer``) on the way."""
    obj: Any = root
    for part in path.split("."):
        while not hasattr(obj, part) and hasattr(obj, "base_layer"):
            obj = obj.base_layer
        obj = getattr(obj, part)
    return obj


def _shape(block: nn.Module, target: Target) -> tuple[int, ...]:
    obj = _resolve(block, target.name)
    if target.is_module:
        while hasattr(obj, "base_layer"):
            obj = obj.base_layer
        return weight_shape(obj)  # a 4-bit weight is packed: its shape is not the layer's
    return tuple(obj.shape)


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()
    return config


def _first_attr(config: Any, names: Sequence[str]) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0:
            return int(value)
    return None


_EXPERT_INDEX = re.compile(r"(?:^|\.)experts\.(\d+)\.")


def cost_model(
    model: nn.Module,
    *,
    batch_size: int = 4,
    seq_len: int = 1024,
    r: int = 16,
    attention_r: int | None = None,
    mlp_r: int | None = None,
    target_modules: Sequence[str] | None = None,
    layers_path: str | None = None,
    lora_slowdown: float = LORA_SLOWDOWN,
) -> CostModel:
    """FLOP cost model of ``model`` training on ``batch_size`` x ``seq_len`` tokens with LoRA rank ``r``.

    Only shapes are read, so a model on the ``meta`` device works (a Llama-3.1-8B built from
    its config in a second, no weights). ``attention_r`` / ``mlp_r`` are the per-role ranks
    (default ``r``); ``target_modules`` restricts which weights LoRA adapts (default: every
    adaptable weight except routers, as :func:`apply_aletheia_lora`). Heads and head size come
    from the model config (``num_attention_heads``/``n_head``, ``head_dim``); without them
    the attention width is taken as the input width of the block's first attention weight.
    ``lora_slowdown`` multiplies the LoRA FLOPs (see the module docs; 1 gives raw FLOPs).
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("r", r)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name}={value!r}; it must be an integer >= 1.")
    if not isinstance(lora_slowdown, numbers.Real) or not lora_slowdown > 0:
        raise ValueError(f"lora_slowdown={lora_slowdown!r}; it must be > 0 (1 counts raw LoRA FLOPs).")
    arch = find_blocks(model, layers_path)
    config = _text_config(model)
    tokens = batch_size * seq_len
    heads = _first_attr(config, ("num_attention_heads", "n_head", "num_heads", "n_heads"))
    head_dim = _first_attr(config, ("head_dim",))
    if heads and not head_dim:
        hidden = _first_attr(config, ("hidden_size", "n_embd", "d_model"))
        head_dim = hidden // heads if hidden else None
    top_k = _first_attr(config, ("num_experts_per_tok", "num_experts_per_token", "moe_topk"))
    rank = {"attention": attention_r or r, "mlp": mlp_r or r, "expert": mlp_r or r}

    forward, backward, lora = [], [], []
    for block in arch.blocks:
        targets = block_targets(block)
        expert_ids = {m.group(1) for t in targets if (m := _EXPERT_INDEX.search(t.name))}
        f = b = extra = 0.0
        attention_width = None
        for t in targets:
            shape = _shape(block, t)
            adapted = t.role != "router" and (
                target_modules is None or any(t.matches(name) for name in target_modules)
            )
            if t.kind == "parameter" and len(shape) == 3:  # (E, out, in) expert tensor
                experts, size = shape[0], shape[1] * shape[2]
                routed = tokens * min(top_k or experts, experts)
                f += 2 * routed * size
                b += 2 * routed * size
                if adapted:  # delta = B @ A formed and back-propagated, merged-weight gradient
                    extra += lora_slowdown * 3 * 2 * experts * rank["expert"] * size + 2 * routed * size
                continue
            d_in, d_out = (shape[1], shape[0]) if t.kind != "conv1d" else (shape[0], shape[1])
            if t.kind == "parameter":  # a 2-D router weight (E, hidden)
                d_in, d_out = shape[-1], shape[0]
            seen = tokens
            if expert_ids and _EXPERT_INDEX.search(t.name):  # experts as a ModuleList of Linears
                seen = tokens * min(top_k or len(expert_ids), len(expert_ids)) / len(expert_ids)
            f += 2 * seen * d_in * d_out
            b += 2 * seen * d_in * d_out
            if adapted:
                extra += lora_slowdown * 3 * 2 * seen * rank.get(t.role, r) * (d_in + d_out)
            if t.role == "attention" and attention_width is None:
                attention_width = d_in
        if attention_width is not None:
            width = heads * head_dim if heads and head_dim else attention_width
            scores_and_values = 2 * 2 * batch_size * width * seq_len**2 / 2  # causal: half the pairs
            f += scores_and_values
            b += 2 * scores_and_values
        forward.append(float(f))
        backward.append(float(b))
        lora.append(float(extra))

    head = 0.0
    out = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    weight = getattr(out, "weight", None)
    if weight is not None and weight.dim() == 2:
        head = 2.0 * tokens * weight.shape[0] * weight.shape[1]
    else:
        vocab = _first_attr(config, ("vocab_size",))
        hidden = _first_attr(config, ("hidden_size", "n_embd", "d_model"))
        head = 2.0 * tokens * vocab * hidden if vocab and hidden else 0.0
    return CostModel(
        forward=forward,
        backward=backward,
        lora=lora,
        head=head,
        head_backward=head,
        unit="flop",
        meta={
            "source": "shapes",
            "model": type(model).__name__,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "r": r,
            "attention_r": attention_r,
            "mlp_r": mlp_r,
            "experts_per_token": top_k,
            "lora_slowdown": lora_slowdown,
        },
    )


def predict_speedup(
    model: nn.Module | None,
    selected_layers: Iterable[int],
    *,
    batch_size: int = 4,
    seq_len: int = 1024,
    gradient_checkpointing: bool = False,
    r: int = 16,
    cost: CostModel | None = None,
) -> float:
    """Predicted step-time ratio of all-layer LoRA to LoRA on ``selected_layers`` (> 1: faster).

    The backward pass is assumed to stop at the lowest selected layer (``truncate_backward``).
    ``cost`` (e.g. a calibrated model) replaces the FLOP model built from ``model``'s shapes.
    """
    if cost is None:
        if model is None:
            raise ValueError("predict_speedup needs a model (to count FLOPs) or cost=CostModel.")
        cost = cost_model(model, batch_size=batch_size, seq_len=seq_len, r=r)
    return cost.speedup(selected_layers, gradient_checkpointing=gradient_checkpointing)


# --------------------------------------------------------------------------- calibration


def named_selection(name: str, num_layers: int) -> list[int]:
    """The selections of the benchmark tables: ``all``, ``top_half``, ``bottom_half``,
    ``every_other`` (alias ``alternate``: layers 0, 2, 4, ...), ``top_quarter``, ``bottom_quarter``."""
    n = num_layers
    table = {
        "all": range(n),
        "top_half": range(n - max(1, n // 2), n),
        "bottom_half": range(max(1, n // 2)),
        "every_other": range(0, n, 2),
        "alternate": range(0, n, 2),
        "top_quarter": range(n - max(1, n // 4), n),
        "bottom_quarter": range(max(1, n // 4)),
    }
    if name not in table:
        raise ValueError(f"unknown selection name {name!r}; use one of {sorted(table)} or a list of layers.")
    return list(table[name])


def _measurements(measured: Any, num_layers: int) -> list[tuple[list[int], float, bool]]:
    if isinstance(measured, Mapping):
        items = list(measured.items())
    else:
        items = []
        for entry in measured:
            if len(entry) not in (2, 3):
                raise ValueError(
                    f"measurement {entry!r}; give (selected_layers, seconds) or "
                    f"(selected_layers, seconds, gradient_checkpointing)."
                )
            items.append(entry if len(entry) == 2 else ((entry[0], entry[2]), entry[1]))
    points = []
    for key, seconds in items:
        gc = False
        if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], bool):
            key, gc = key
        if isinstance(key, str):
            gc = gc or key.endswith("+gc")
            key = named_selection(key.removesuffix("+gc"), num_layers)
        if not isinstance(seconds, numbers.Real) or not seconds > 0:
            raise ValueError(f"measured step time {seconds!r} for {key!r}; it must be a positive number.")
        points.append((sorted({int(i) for i in key}), float(seconds), bool(gc)))
    if not points:
        raise ValueError("measured is empty; give at least one measured step time.")
    return points


def _nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a few columns: the best least-squares fit over every
    subset of columns whose solution is non-negative (exact for 3 unknowns, 7 subsets)."""
    best, best_residual = np.zeros(a.shape[1]), float(np.sum(y**2))
    for size in range(1, a.shape[1] + 1):
        for cols in itertools.combinations(range(a.shape[1]), size):
            coef, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
            if np.any(coef < 0):
                continue
            residual = float(np.sum((a[:, cols] @ coef - y) ** 2))
            if residual < best_residual * (1 - 1e-12):
                best = np.zeros(a.shape[1])
                best[list(cols)] = coef
                best_residual = residual
    return best


def calibrate(cost: CostModel, measured: Any) -> CostModel:
    """Fit ``cost`` to measured step times; returns a model in seconds (``unit="s"``).

    ``measured`` is either a mapping of selection -> seconds per step, where a selection is a
    name of :func:`named_selection` (``{"all": 0.455, "top_half": 0.297, ...}``; a ``+gc``
    suffix marks a run with gradient checkpointing) or a tuple of layers; or a list of
    ``(selected_layers, seconds)`` / ``(selected_layers, seconds, gradient_checkpointing)``.

    Each step time is modelled as ``a_f * forward + a_b * backward + a_l * lora`` where the
    three columns are the FLOP terms of :meth:`CostModel.breakdown` (recompute counts as
    forward) and the scales ``a >= 0`` (seconds per FLOP of each kind of work) are fitted by
    non-negative least squares. Fixed per-step work (optimizer, launches, the loss) is
    constant across selections and lands in ``a_f``. Three measurements that differ both in
    the lowest adapted layer and in how many layers are adapted (``all``, ``top_half``,
    ``every_other``) pin the three scales; with fewer independent ones a single common scale
    is fitted instead (with a warning). The scales, and each measurement next to its fitted
    value, are kept in ``meta["calibration"]``.
    """
    points = _measurements(measured, cost.num_layers)
    rows = []
    for layers, _, gc in points:
        parts = cost.breakdown(layers, gradient_checkpointing=gc)
        rows.append([parts["forward"] + parts["recompute"], parts["backward"], parts["lora"]])
    a = np.array(rows, dtype=np.float64)
    y = np.array([seconds for _, seconds, _ in points], dtype=np.float64)
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1.0
    if np.linalg.matrix_rank(a / norms, tol=1e-9) < a.shape[1]:
        warnings.warn(
            f"{len(points)} measurement(s) cannot separate forward, backward and LoRA costs; fitting one "
            f"common scale. Measure selections that differ in lowest layer and in count, e.g. "
            f"all, top_half and every_other.",
            stacklevel=2,
        )
        total = a.sum(axis=1)
        common = float(total @ y / (total @ total)) if total @ total > 0 else 0.0
        scale = np.full(a.shape[1], common)
    else:
        scale = _nnls(a / norms, y) / norms
    fitted = a @ scale
    factor = dict(zip(COMPONENTS, (float(s) for s in scale)))
    calibration = {
        "scale": factor,
        "from_unit": cost.unit,
        "points": [
            {"layers": layers, "gradient_checkpointing": gc, "measured_s": seconds, "fitted_s": float(fit)}
            for (layers, seconds, gc), fit in zip(points, fitted)
        ],
        "max_relative_error": float(np.max(np.abs(fitted - y) / y)),
    }
    return replace(
        cost,
        forward=[v * factor["forward"] for v in cost.forward],
        backward=[v * factor["backward"] for v in cost.backward],
        lora=[v * factor["lora"] for v in cost.lora],
        head=cost.head * factor["forward"],
        head_backward=cost.head_backward * factor["backward"],
        unit="s",
        meta={**cost.meta, "calibration": calibration},
    )

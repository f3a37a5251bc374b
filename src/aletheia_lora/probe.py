"""The gradient probe: how much does each transformer block want to change for this task?

    score[l] = sum over probe batches b, over probed weights W in block l, of ||dLoss_b/dW||_F

where Loss_b is the mean next-token cross-entropy over the *target* tokens of batch b
(padding and label -100 excluded), computed in fp32.

Two ways to get the same numbers:

* ``method="onepass"`` (default): one forward+backward per batch for all blocks. No weight
  gradient is ever stored. For a Linear ``y = x W^T`` the weight gradient is ``G^T X``
  (``X``: the layer's input, ``G``: the gradient at its output, one row per token), so

      ||G^T X||_F^2 = <X X^T, G G^T>          (the Gram identity)

  which hooks compute from ``X`` and ``G`` alone, whichever form is cheaper. Parameters
  that are not Linear weights (norms and biases with ``params="all"``, 3-D MoE expert
  tensors) are measured by a hook that fires as soon as their gradient is accumulated and
  frees it at once.
* ``method="chunked"``: the published reference. Full weight gradients for ``chunk_size``
  blocks at a time, ``ceil(L / chunk_size)`` passes per batch.

Signals (``signals=``, ``score=``): the same pass can measure more than the score above. Per
probed tensor ``W`` and batch ``b``, with ``dW_b = dLoss_b/dW``:

* ``grad-norm`` (default): ``sum_b ||dW_b||_F``, the score above.
* ``relative``: ``sum_b ||dW_b||_F / ||W||_F`` (scale-free across depth); ``||W||`` is read
  once, in a forward pre-hook, where sharded weights are whole.
* ``lora-energy``: ``sum_b sqrt(sum of the r largest squared singular values of dW_b)``, the
  Frobenius norm of the best rank-r approximation, ``r`` the LoRA rank of the tensor's role
  (``ranks=``). For a Linear with ``N < min(d_in, d_out)`` tokens the squared singular values
  of ``G^T X`` are the eigenvalues of ``(X X^T)(G G^T)``, computed as those of the symmetric
  ``R (G G^T) R^T`` from a thin QR ``X^T = Q R`` of the narrower side (``N x N``); else of the
  smaller Gram matrix of ``G^T X``. ``r >= min(N, d_in, d_out)`` is the score itself, at no cost.
* ``coherence``: ``sum_W ||sum_b dW_b||_F / sum_W sum_b ||dW_b||_F`` per block, in [0, 1];
  1 with one batch. ``sum_b G_b^T X_b = [G_1..G_B]^T [X_1..X_B]``, so each batch adds its cross
  terms ``<X_c X_b^T, G_c G_b^T>`` with the batches a Linear keeps, while they take less memory
  than one fp32 weight gradient; then a running sum of ``G_b^T X_b``.

Every layer score of every computed signal is in ``LayerScores.signals``; ``score`` picks the
one that is the mapping itself (and its breakdown). See ``docs/method.md``.

The model comes back exactly as it went in: requires_grad flags, train/eval modes, dtype,
device, ``.grad`` tensors, and no hooks left behind.

Data parallel (``torchrun`` / ``accelerate launch``): when ``torch.distributed`` is initialized
with more than one rank, every rank builds the same seeded batch list and probes its share,
``batches[rank::world_size]``; the per-tensor sums and token counts are then all-reduced, so
every rank ends with the same scores, equal to a single-process probe over the same batches
(up to summation order). A rank without a batch (fewer batches than ranks) adds zeros. A rank
that fails makes every rank raise, never a hang. ``coherence`` needs the sum of every batch's
weight gradient, so it is refused on more than one rank. See ``docs/distributed.md``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .architecture import (
    ROLES,
    Architecture,
    block_targets,
    dense_weight,
    find_blocks,
    is_quantized_weight,
    probed_parameters,
    role_of,
)
from .batches import IGNORE_INDEX
from .batches import probe_batches as make_probe_batches
from .scores import LayerScores

METHODS = ("onepass", "chunked")
PARAMS = ("lora-targets", "all")
SIGNALS = ("grad-norm", "relative", "lora-energy", "coherence")
DEFAULT_RANK = 16  # lora-energy's rank where ranks= says nothing
_ADDITIVE = ("grad-norm", "relative", "lora-energy")  # per-tensor sums over batches (and ranks)


def _check_deepspeed(model: nn.Module, params: str, method: str) -> None:
    """Refuse what cannot work on parameters DeepSpeed ZeRO-3 manages (every rank decides alike)."""
    managed = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not managed:
        return
    if params == "all" or method == "chunked":
        raise ValueError(
            f"params={params!r}, method={method!r} on a DeepSpeed-managed model: these need weight gradients, "
            f"which DeepSpeed's own gradient hooks would queue for reduction and break the next training "
            f"step; use params='lora-targets' and method='onepass' (the defaults)."
        )
    hooked = any(
        getattr(hook, "__module__", "").startswith("deepspeed")
        for module in model.modules()
        for hook in module._forward_pre_hooks.values()
    )
    if not hooked and any(p.numel() == 0 for p in managed):
        raise ValueError(
            "the model's parameters are partitioned by deepspeed.zero.Init (ZeRO-3) but DeepSpeed has not "
            "wrapped it yet, so its weights are empty here. Load the model before creating "
            "TrainingArguments (which turns zero.Init on under a ZeRO-3 launch), or probe engine.module "
            "after deepspeed.initialize."
        )


def gradient_probe(
    model: nn.Module,
    dataset: Any,
    num_layers: int | None = None,
    probe_batches: int = 5,
    *,
    batch_size: int = 1,
    max_length: int | None = None,
    params: str = "lora-targets",
    method: str = "onepass",
    chunk_size: int = 8,
    seed: int = 42,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    tokenizer: Any = None,
    layers_path: str | None = None,
    train_mode: bool = False,
    progress: bool = False,
    signals: str | Sequence[str] | None = None,
    score: str = "grad-norm",
    ranks: int | Mapping[str, int] | Callable[[str], int] | None = None,
) -> LayerScores:
    """Score every decoder block of ``model`` by the size of its weight gradients on ``dataset``.

    Args:
        model: a causal LM (``transformers`` or any module whose forward takes ``input_ids``
            and ``attention_mask`` and returns ``.logits``).
        dataset: tokenized rows, a torch Dataset/DataLoader, or strings with ``tokenizer=``
            (see :mod:`aletheia_lora.batches`).
        num_layers: expected number of blocks; ``None`` detects it. A mismatch is an error.
        probe_batches: batches to average over (default 5). Fewer examples than
            ``probe_batches * batch_size``: the probe uses what exists and warns.
        batch_size: rows per probe batch (default 1).
        max_length: truncate rows to this many tokens (default: no truncation).
        params: ``"lora-targets"`` (default) scores only the weights LoRA adapts;
            ``"all"`` every floating-point parameter of the block (the published definition,
            norm weights included).
        method: ``"onepass"`` (default) or ``"chunked"`` (the reference, see module docs).
        chunk_size: blocks per pass for ``method="chunked"`` (default 8).
        seed: fixes which rows are probed, and dropout if ``train_mode``.
        device: where to run (default: where the model is). The model is moved back after.
        dtype: compute dtype. Default: the model's own, except that fp16 models run in fp32
            (fp16 gradients overflow; restoring fp16 from fp32 is exact). A wider dtype than
            the model's is applied by upcasting (restored exactly afterwards); a narrower one
            by autocast.
        tokenizer: needed for text rows; also gives the padding id.
        layers_path: dotted path of the block stack when detection fails.
        train_mode: run in train mode (dropout on). Default: eval mode, no dropout noise.
        progress: show a progress bar.
        signals: which signals to compute in the same pass, a name, a list of names from
            :data:`SIGNALS`, or ``"all"``. Default: ``score`` only. ``grad-norm`` is always
            computed (every other signal is built on it).
        score: the signal that is the returned mapping itself, with its per-tensor and
            per-role breakdown (default ``"grad-norm"``, the published score).
        ranks: the LoRA rank ``lora-energy`` keeps per role: an int for every role, a mapping
            such as ``{"attention": 16, "mlp": 64}`` (experts, routers and other tensors take
            ``"mlp"``), or a callable from role to rank. Default 16 everywhere.

    Returns:
        :class:`LayerScores`, with per-tensor and per-role breakdowns, every computed signal
        (``.signals``) and probe metadata.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; use 'onepass' (default) or 'chunked'.")
    if params not in PARAMS:
        raise ValueError(f"params={params!r}; use 'lora-targets' (default) or 'all'.")
    if method == "chunked" and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; it must be >= 1.")
    wanted = _wanted_signals(signals, score)
    rank_of = _rank_function(ranks)
    arch = find_blocks(model, layers_path)
    if method == "chunked" and any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise ValueError(
            "method='chunked' reads full weight gradients, which FSDP reduces across ranks before the "
            "probe can see this rank's own; use method='onepass' (the default) on a sharded model."
        )
    _check_deepspeed(model, params, method)
    if method == "chunked" and any(is_quantized_weight(p) for p in arch.blocks.parameters()):
        raise ValueError(
            "method='chunked' reads full weight gradients, which 4-bit/8-bit (bitsandbytes) weights cannot "
            "hold; use method='onepass' (the default), which measures them from each layer's inputs and "
            "output gradients."
        )
    if num_layers is not None and num_layers != arch.num_layers:
        raise ValueError(
            f"num_layers={num_layers} but {type(model).__name__} has {arch.num_layers} blocks at "
            f"'{arch.blocks_path}'; pass num_layers=None to detect it."
        )
    rank, world_size = _rank_and_world_size()
    if "coherence" in wanted and world_size > 1:
        raise ValueError(
            f"signal 'coherence' needs the sum of every probe batch's weight gradient, and the batches "
            f"are spread over {world_size} ranks; probe it on one process, or leave it out of signals."
        )
    batches = make_probe_batches(
        dataset, probe_batches, batch_size, max_length=max_length, seed=seed, tokenizer=tokenizer
    )
    tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    if tokens == 0:
        raise ValueError(
            "the probe batches contain no target tokens (every label is -100 or padding); "
            "check the dataset's labels / attention_mask."
        )

    mine = list(enumerate(batches))[rank::world_size]  # (index, batch): all of them on one process

    start = time.perf_counter()
    failure: Exception | None = None
    with _probe_state(model, device, dtype, train_mode) as (run_device, autocast_dtype, compute_dtype):
        run = _onepass if method == "onepass" else _chunked
        show = progress and rank == 0
        try:
            per_tensor = run(
                model, arch, mine, params, run_device, autocast_dtype, seed, chunk_size, show, wanted, rank_of
            )
        except Exception as err:
            if world_size == 1:
                raise
            failure, per_tensor = err, {}  # the other ranks must hear of it before anyone raises
    if world_size > 1:
        _raise_if_any_rank_failed(failure, rank)
        my_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for _, b in mine)
        per_tensor = _all_reduce_scores(per_tensor, my_tokens, arch, params, tokens, wanted)
    seconds = time.perf_counter() - start

    meta = {
        "method": method,
        "params": params,
        "batches": len(batches),
        "batch_size": batch_size,
        "tokens": tokens,
        "seconds": seconds,
        "seed": seed,
        "num_layers": arch.num_layers,
        "blocks_path": arch.blocks_path,
        "model": type(model).__name__,
        "dtype": str(compute_dtype).replace("torch.", ""),
        "train_mode": train_mode,
        "world_size": world_size,
        "score": score,
    }
    if "lora-energy" in wanted:
        meta["ranks"] = {role: rank_of(role) for role in (*ROLES, "other")}
    scores = _to_scores(arch, per_tensor, meta, wanted, score)
    agree_across_ranks(dict(scores), "layer scores")
    return scores


def _wanted_signals(signals: str | Sequence[str] | None, score: str) -> tuple[str, ...]:
    """The signals to compute, in :data:`SIGNALS` order: ``grad-norm``, ``score`` and ``signals``."""
    if score not in SIGNALS:
        raise ValueError(f"score={score!r}; use one of {list(SIGNALS)}.")
    if signals is None:
        names: list[str] = []
    elif signals == "all":
        names = list(SIGNALS)
    elif isinstance(signals, str):
        names = [signals]
    else:
        names = list(signals)
    unknown = [n for n in names if n not in SIGNALS]
    if unknown:
        raise ValueError(f"signals={signals!r}: unknown {unknown}; use 'all' or names from {list(SIGNALS)}.")
    chosen = {"grad-norm", score, *names}
    return tuple(s for s in SIGNALS if s in chosen)


def _rank_function(ranks: int | Mapping[str, int] | Callable[[str], int] | None) -> Callable[[str], int]:
    """Role -> the LoRA rank ``lora-energy`` keeps (see :func:`gradient_probe`'s ``ranks``)."""

    def checked(value: Any, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"ranks: {what} = {value!r}; a LoRA rank must be an integer >= 1.")
        return int(value)

    if ranks is None:
        return lambda role: DEFAULT_RANK
    if callable(ranks):
        return lambda role: checked(ranks(role), f"ranks({role!r})")
    if isinstance(ranks, Mapping):
        known = (*ROLES, "other")
        unknown = sorted(set(ranks) - set(known))
        if unknown:
            raise ValueError(f"ranks={dict(ranks)!r}: unknown roles {unknown}; use roles from {list(known)}.")
        table = {role: checked(value, repr(role)) for role, value in ranks.items()}
        fallback = {
            role: table.get("attention" if role == "attention" else "mlp", DEFAULT_RANK) for role in known
        }
        return lambda role: table.get(role, fallback.get(role, DEFAULT_RANK))
    value = checked(ranks, "every role")
    return lambda role: value


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def _to_scores(
    arch: Architecture, per_tensor: dict[str, dict[int, dict[str, float]]], meta: dict, wanted, score: str
) -> LayerScores:
    signals: dict[str, dict[int, float]] = {}
    modules: dict[str, dict[int, dict[str, float]]] = {}
    roles: dict[str, dict[int, dict[str, float]]] = {}
    for signal in wanted:
        signals[signal], modules[signal], roles[signal] = {}, {}, {}
        summed = "summed" if signal == "coherence" else signal  # coherence: summed / grad-norm
        for layer in range(arch.num_layers):
            targets = block_targets(arch.blocks[layer])
            tensors = per_tensor.get(summed, {}).get(layer, {})
            subtotal: dict[str, float] = defaultdict(float)
            for name, value in tensors.items():
                subtotal[role_of(name, targets)] += value
            if layer in per_tensor.get(summed, {}):
                modules[signal][layer] = tensors
            if signal != "coherence":
                signals[signal][layer] = math.fsum(tensors.values())
                roles[signal][layer] = dict(subtotal)
                continue
            norms = per_tensor["grad-norm"].get(layer, {})
            role_norms: dict[str, float] = defaultdict(float)
            for name, value in norms.items():
                role_norms[role_of(name, targets)] += value
            signals[signal][layer] = _ratio(math.fsum(tensors.values()), math.fsum(norms.values()))
            if layer in modules[signal]:
                modules[signal][layer] = {name: _ratio(value, norms[name]) for name, value in tensors.items()}
            roles[signal][layer] = {role: _ratio(value, role_norms[role]) for role, value in subtotal.items()}
    return LayerScores(signals[score], modules=modules[score], roles=roles[score], meta=meta, signals=signals)


# --------------------------------------------------------------------------- the loss


def target_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over target tokens, in fp32."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def _backward(model, batch, device, autocast_dtype, seed: int, index: int) -> None:
    batch = {k: v.to(device) for k, v in batch.items()}
    autocast = (
        torch.autocast(torch.device(device).type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    torch.manual_seed(seed + index)  # dropout, when the probe runs in train mode
    with autocast:
        loss = target_loss(model, batch)
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"probe batch {index}: the loss is {loss.item()}; the model overflows in this dtype. "
            f"Pass dtype=torch.float32 (or torch.bfloat16 on a GPU)."
        )
    loss.backward()


def _check_finite(value: float, layer: int, name: str) -> float:
    if not math.isfinite(value):
        raise FloatingPointError(
            f"non-finite gradient norm ({value}) for layer {layer} '{name}'; the probe overflowed. "
            f"Pass dtype=torch.float32 (or torch.bfloat16 on a GPU)."
        )
    return value


# --------------------------------------------------------------------------- per-tensor signals


def _gram(x: torch.Tensor, g: torch.Tensor):
    """``||G^T X||_F^2`` for X (N, d_in), G (N, d_out), in fp32, by the cheaper route, with the
    products that route formed: ``(X X^T, G G^T)`` (token route) or ``G^T X`` (weight route)."""
    x, g = x.float(), g.float()
    n, d_in, d_out = x.shape[0], x.shape[1], g.shape[1]
    if n * (d_in + d_out) < d_in * d_out:
        a, b = x @ x.T, g @ g.T
        return (a * b).sum().clamp_min(0), (a, b), None
    m = g.T @ x
    return m.square().sum(), None, m


def _gram_norm_sq(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||G^T X||_F^2 for X (N, d_in), G (N, d_out), in fp32, by the cheaper route."""
    return _gram(x, g)[0]


def _lora_energy_sq(x: torch.Tensor, g: torch.Tensor, r: int, grams=None, m=None) -> float:
    """The sum of the ``r`` largest squared singular values of ``G^T X`` (fp32), reusing what
    :func:`_gram` formed (``grams = (X X^T, G G^T)`` or ``m = G^T X``) when it formed it.

    Fewer tokens than either width (``N < min(d_in, d_out)``): in token space. A thin QR of the
    narrower side, ``X^T = Q R`` (``R``: ``N x N``), gives ``X X^T = R^T R``, so the squared
    singular values, the eigenvalues of ``(X X^T)(G G^T)``, are those of the symmetric
    ``R (G G^T) R^T`` (likewise with ``G^T = Q R``). Otherwise: the eigenvalues of the smaller
    Gram matrix of ``M = G^T X``.
    """
    x, g = x.float(), g.float()
    n, d_in, d_out = x.shape[0], x.shape[1], g.shape[1]
    if n < min(d_in, d_out):
        if d_in <= d_out:
            rr, other = torch.linalg.qr(x.T, mode="r")[1], (grams[1] if grams is not None else g @ g.T)
        else:
            rr, other = torch.linalg.qr(g.T, mode="r")[1], (grams[0] if grams is not None else x @ x.T)
        return _top_eigenvalue_sum(rr @ other @ rr.T, r)
    m = m if m is not None else g.T @ x
    return _top_eigenvalue_sum(m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m, r)


def _top_eigenvalue_sum(a: torch.Tensor, r: int) -> float:
    """The sum of the ``r`` largest eigenvalues of the symmetric positive semi-definite ``a``.

    Solved on ``a`` scaled to a largest diagonal entry of 1 (a zero matrix stays zero): on a
    rank-deficient matrix of tiny entries (a gradient of ~1e-5), MKL's fp32 eigensolver has returned
    NaN for eigenvalues that are finite (seen on an Intel Xeon with torch 2.13). Should the sum still
    be non-finite, the solve is repeated in fp64. One host sync, as before: this runs per probed
    weight and batch."""
    scale = a.diagonal().max().clamp_min(torch.finfo(a.dtype).tiny)
    value = (torch.linalg.eigvalsh(a / scale).flip(0)[:r].clamp_min(0).double().sum() * scale).item()
    if not math.isfinite(value):
        value = (torch.linalg.eigvalsh(a.double() / scale).flip(0)[:r].clamp_min(0).sum() * scale).item()
    return value


def _gradient_energy_sq(grad: torch.Tensor, r: int) -> float:
    """``lora-energy`` of a tensor from its gradient: top-``r`` SVD, per slice of a 3-D expert tensor."""
    grad = grad.float()
    if grad.dim() < 2:
        return grad.square().sum().item()
    values = torch.linalg.svdvals(grad.reshape(-1, *grad.shape[-2:]))  # descending, per slice
    return values[:, :r].square().sum().item()


class _Recorder:
    """One probed tensor's sums over the probe batches, one for each signal the probe computes.

    ``totals[signal][layer][name]`` collects them: ``grad-norm``, ``lora-energy`` batch by batch;
    ``relative`` and ``summed`` (``||sum_b dW_b||``, coherence's numerator) in :meth:`finish`.
    """

    def __init__(self, layer: int, name: str, param: torch.Tensor, rank: int, totals, wanted) -> None:
        self.layer, self.name, self.param, self.rank, self.totals = layer, name, param, rank, totals
        self.wanted = frozenset(wanted)
        self.only_norm = self.wanted == {"grad-norm"}
        self.batches = 0  # batches that gave this tensor a gradient
        self.weight_norm: float | None = None
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # coherence: (X_b, G_b) kept so far
        self.stored = 0  # their bytes
        self.summed_sq = 0.0  # coherence: ||sum_b dW_b||^2 over the batches kept so far
        self.sum: torch.Tensor | None = None  # coherence: sum_b dW_b, once that is the smaller
        for signal in self.wanted & set(_ADDITIVE):  # a tensor with no gradient in any batch scores 0
            totals[signal][layer][name] += 0.0

    def _norm(self, value: float) -> float:
        value = _check_finite(value, self.layer, self.name)
        self.totals["grad-norm"][self.layer][self.name] += value
        self.batches += 1
        return value

    def linear(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """One batch of a Linear: its inputs X and output gradients G, one row per token."""
        if self.only_norm:  # the published probe, exactly as it always ran
            self._norm(_gram_norm_sq(x, g).sqrt().item())
            return
        norm_sq, grams, m = _gram(x, g)
        value = self._norm(norm_sq.sqrt().item())
        n, d_in, d_out = x.shape[0], x.shape[1], g.shape[1]
        if "lora-energy" in self.wanted:
            full = self.rank >= min(n, d_in, d_out)  # rank-r keeps every singular value
            energy = value if full else math.sqrt(_lora_energy_sq(x, g, self.rank, grams, m))
            self.totals["lora-energy"][self.layer][self.name] += _check_finite(energy, self.layer, self.name)
        if "coherence" in self.wanted:
            self._add_to_sum(x, g, norm_sq.item(), m)

    def _add_to_sum(self, x: torch.Tensor, g: torch.Tensor, norm_sq: float, m: torch.Tensor | None) -> None:
        """||sum_b G_b^T X_b||^2 = sum_b ||G_b^T X_b||^2 + 2 sum_{c<b} <X_c X_b^T, G_c G_b^T>: each new
        batch adds its cross terms with the batches kept so far (in their own dtype), until keeping
        them would take more memory than one fp32 weight gradient; from then on a running fp32 sum
        of G_b^T X_b."""
        n, d_in, d_out = x.shape[0], x.shape[1], g.shape[1]
        size = n * (d_in * x.element_size() + d_out * g.element_size())  # bytes, kept as they came
        if self.sum is None and self.stored + size > d_in * d_out * 4:
            self.sum = torch.zeros(d_out, d_in, dtype=torch.float32, device=x.device)
            for xc, gc in self.pairs:
                self.sum += gc.float().T @ xc.float()
            self.pairs = []
        if self.sum is not None:
            self.sum += m if m is not None else g.float().T @ x.float()
            return
        xf, gf = x.float(), g.float()
        cross = math.fsum(((xc.float() @ xf.T) * (gc.float() @ gf.T)).sum().item() for xc, gc in self.pairs)
        self.summed_sq += norm_sq + 2 * cross
        self.pairs.append((x, g))
        self.stored += size

    def gradient(self, grad: torch.Tensor) -> None:
        """One batch of a tensor measured from its own (full) gradient."""
        value = self._norm(torch.linalg.vector_norm(grad.float()).item())
        if "lora-energy" in self.wanted:
            full = grad.dim() < 2 or self.rank >= min(grad.shape[-2:])
            energy = value if full else math.sqrt(_gradient_energy_sq(grad, self.rank))
            self.totals["lora-energy"][self.layer][self.name] += _check_finite(energy, self.layer, self.name)
        if "coherence" in self.wanted:
            self.sum = grad.detach().float().clone() if self.sum is None else self.sum.add_(grad.float())

    def no_gradient(self) -> None:
        self.totals["grad-norm"][self.layer][self.name] += 0.0

    def read_weight(self, weight: torch.Tensor) -> None:
        if self.weight_norm is None and weight.numel() > 0:
            # a 4/8-bit weight is read dequantized: the weight the layer computes with
            dense = dense_weight(weight).detach()
            self.weight_norm = torch.linalg.vector_norm(dense, dtype=torch.float64).item()

    def finish(self) -> None:
        """The signals that need every batch: ``relative`` and coherence's ``||sum_b dW_b||``."""
        norm = self.totals["grad-norm"][self.layer][self.name]
        if "relative" in self.wanted:
            if self.weight_norm is None and norm > 0:  # its module never ran a forward: read it now
                self.read_weight(self.param)
            self.totals["relative"][self.layer][self.name] = _ratio(norm, self.weight_norm or 0.0)
        if "coherence" in self.wanted:
            if self.batches <= 1:  # one batch: the sum is that batch's gradient (coherence 1)
                summed = norm
            elif self.sum is not None:
                summed = torch.linalg.vector_norm(self.sum, dtype=torch.float64).item()
            else:
                summed = math.sqrt(max(self.summed_sq, 0.0))
            self.totals["summed"][self.layer][self.name] = _check_finite(summed, self.layer, self.name)
            self.pairs, self.sum = [], None


def _new_totals(wanted) -> dict[str, dict[int, dict[str, float]]]:
    names = [*wanted, "summed"] if "coherence" in wanted else list(wanted)
    return {s: defaultdict(lambda: defaultdict(float)) for s in names if s != "coherence"}


def _plain(totals) -> dict[str, dict[int, dict[str, float]]]:
    return {s: {layer: dict(v) for layer, v in by_layer.items()} for s, by_layer in totals.items()}


def _recorders(arch: Architecture, layers, params: str, totals, wanted, rank_of):
    """(layer, name, parameter, recorder) for every probed tensor of ``layers``."""
    out = []
    for layer in layers:
        block = arch.blocks[layer]
        targets = block_targets(block)
        for name, param in probed_parameters(block, params).items():
            rank = rank_of(role_of(name, targets)) if "lora-energy" in wanted else DEFAULT_RANK
            out.append((layer, name, param, _Recorder(layer, name, param, rank, totals, wanted)))
    return out


# --------------------------------------------------------------------------- onepass


class _LinearNorm:
    """Hooks on one Linear/Conv1D: keeps each call's input, pairs it with its output gradient."""

    def __init__(self, module: nn.Module, on_done: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        self.inputs: list[torch.Tensor] = []
        self.grads: dict[int, torch.Tensor] = {}
        self.on_done = on_done
        self.handle = module.register_forward_hook(self._forward)

    def _forward(self, module, args, output) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        call = len(self.inputs)
        self.inputs.append(args[0].detach().reshape(-1, args[0].shape[-1]))
        output.register_hook(lambda grad, call=call: self._backward(call, grad))

    def _backward(self, call: int, grad: torch.Tensor) -> None:
        self.grads[call] = grad.detach().reshape(-1, grad.shape[-1])
        if len(self.grads) == len(self.inputs):  # every call of this forward has its gradient
            x = torch.cat(self.inputs)
            g = torch.cat([self.grads[i] for i in range(len(self.inputs))])
            self.inputs, self.grads = [], {}
            self.on_done(x, g)


def _measure_and_free(recorder: _Recorder):
    def hook(param: torch.Tensor) -> None:
        recorder.gradient(param.grad)
        param.grad = None

    return hook


def _weight_reader(recorder: _Recorder, attr: str):
    def hook(module, args) -> None:  # before the forward: a sharded weight (FSDP, ZeRO-3) is whole here
        recorder.read_weight(getattr(module, attr))

    return hook


def _onepass(
    model, arch, batches, params, device, autocast_dtype, seed, chunk_size, progress, wanted, rank_of
):
    totals = _new_totals(wanted)
    handles: list[Any] = []
    recorders = _recorders(arch, range(arch.num_layers), params, totals, wanted, rank_of)
    linear_modules = {}
    for layer, block in enumerate(arch.blocks):
        for t in block_targets(block):
            if t.is_module:
                linear_modules[(layer, f"{t.name}.weight")] = block.get_submodule(t.name)
    for layer, name, param, recorder in recorders:
        module = linear_modules.get((layer, name))
        if module is not None:
            handles.append(_LinearNorm(module, recorder.linear).handle)
        else:  # measured from its own gradient, freed as soon as it is accumulated
            param.requires_grad_(True)
            handles.append(param.register_post_accumulate_grad_hook(_measure_and_free(recorder)))
        if "relative" in wanted:
            owner, _, attr = name.rpartition(".")
            block = arch.blocks[layer]
            holder = block.get_submodule(owner) if owner else block
            handles.append(holder.register_forward_pre_hook(_weight_reader(recorder, attr)))

    # Gradients must flow from the loss down to block 0 although every weight is frozen.
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    try:
        for i, batch in _bar(batches, progress, "probe"):
            _backward(model, batch, device, autocast_dtype, seed, i)
    finally:
        for h in handles:
            h.remove()
    for *_, recorder in recorders:
        recorder.finish()
    return _plain(totals)


# --------------------------------------------------------------------------- chunked


def _chunked(
    model, arch, batches, params, device, autocast_dtype, seed, chunk_size, progress, wanted, rank_of
):
    """Full weight gradients, ``chunk_size`` blocks at a time: every batch for one chunk, then the next."""
    totals = _new_totals(wanted)
    chunks = [range(s, min(s + chunk_size, arch.num_layers)) for s in range(0, arch.num_layers, chunk_size)]
    for c, chunk in enumerate(chunks):
        recorders = _recorders(arch, chunk, params, totals, wanted, rank_of)
        for *_, p, recorder in recorders:
            p.requires_grad_(True)
            if "relative" in wanted:
                recorder.read_weight(p)
        try:
            desc = f"probe (chunked, {c + 1}/{len(chunks)})"
            for i, batch in _bar(batches, progress, desc):
                try:
                    _backward(model, batch, device, autocast_dtype, seed, i)
                    for *_, p, recorder in recorders:
                        if p.grad is None:
                            recorder.no_gradient()
                        else:
                            recorder.gradient(p.grad)
                finally:
                    for *_, p, _ in recorders:
                        p.grad = None
            for *_, recorder in recorders:
                recorder.finish()
        finally:
            for *_, p, _ in recorders:
                p.grad = None
                p.requires_grad_(False)
    return _plain(totals)


# --------------------------------------------------------------------------- data parallel


def _rank_and_world_size() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _raise_if_any_rank_failed(failure: Exception | None, rank: int) -> None:
    """Every rank learns whether any rank failed its share, and then all of them raise."""
    reports: list[str | None] = [None] * torch.distributed.get_world_size()
    mine = None if failure is None else f"{type(failure).__name__}: {failure}"
    torch.distributed.all_gather_object(reports, mine)
    failed = {r: report for r, report in enumerate(reports) if report is not None}
    if not failed:
        return
    if failure is not None:
        raise failure
    named = "; ".join(f"rank {r}: {report}" for r, report in failed.items())
    raise RuntimeError(f"the gradient probe failed on another rank (this is rank {rank}): {named}")


def _all_reduce_scores(
    per_tensor: dict[str, dict[int, dict[str, float]]],
    my_tokens: int,
    arch: Architecture,
    params: str,
    tokens: int,
    wanted=("grad-norm",),
) -> dict[str, dict[int, dict[str, float]]]:
    """Sum every rank's per-tensor sums and target-token count (float64, one fixed order).

    Every signal allowed on several ranks is a sum over batches (``relative`` divides each
    rank's sum by the same ``||W||``), so the sum over ranks is the single-process value."""
    keys = [
        (signal, layer, name)
        for signal in wanted
        for layer, block in enumerate(arch.blocks)
        for name in probed_parameters(block, params)
    ]
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    values = [per_tensor.get(signal, {}).get(layer, {}).get(name, 0.0) for signal, layer, name in keys]
    total = torch.tensor([*values, my_tokens, tokens], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    *total, probed, expected = total.tolist()
    # Same batch list on every rank: each expects all tokens, together they probe them once.
    # Decided from the reduced numbers, so every rank raises or none does.
    if expected != probed * torch.distributed.get_world_size():
        raise RuntimeError(
            f"the ranks probed {int(probed)} target tokens in all, but their batch lists hold "
            f"{int(expected)} over {torch.distributed.get_world_size()} ranks; the ranks built different "
            f"probe batches (give every rank the same dataset and seed)."
        )
    summed: dict[str, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for (signal, layer, name), value in zip(keys, total):
        summed[signal][layer][name] = value
    return {signal: dict(by_layer) for signal, by_layer in summed.items()}


def agree_across_ranks(value: Any, what: str) -> None:
    """Raise on every rank unless ``value`` is the same on all ranks (a no-op on one process)."""
    rank, world_size = _rank_and_world_size()
    if world_size == 1:
        return
    values: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(values, value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise RuntimeError(
            f"{what} differ across ranks (rank 0: {values[0]!r}; ranks {differ} differ; this is rank {rank})."
        )


# --------------------------------------------------------------------------- model state


def _bar(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _probe_state(
    model: nn.Module, device, dtype: torch.dtype | None, train_mode: bool
) -> Iterator[tuple[torch.device, torch.dtype | None, torch.dtype]]:
    """Freeze everything, pick the compute dtype/device, and restore the model exactly after."""
    params = list(model.parameters())
    if not params:
        raise ValueError("the model has no parameters to probe.")
    saved_requires_grad = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    saved_dtypes = [p.dtype for p in params]
    saved_modes = [m.training for m in model.modules()]
    saved_ckpt = [
        (m, m.gradient_checkpointing) for m in model.modules() if hasattr(m, "gradient_checkpointing")
    ]
    home = _model_device(model)
    run_device = torch.device(device) if device is not None else home

    model_dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    want = dtype if dtype is not None else (torch.float32 if model_dtype == torch.float16 else model_dtype)
    upcast = want.itemsize > model_dtype.itemsize  # lossless: restored bit-exactly after
    autocast_dtype = want if (want != model_dtype and not upcast) else None

    try:
        for p in params:
            p.grad = None
            p.requires_grad_(False)
            if upcast and p.is_floating_point():
                p.data = p.data.to(want)
        if run_device != home:
            model.to(run_device)
        model.train(train_mode)
        for m, _ in saved_ckpt:
            if isinstance(m.gradient_checkpointing, bool):
                m.gradient_checkpointing = False
        with torch.random.fork_rng(devices=[run_device] if run_device.type == "cuda" else []):
            yield run_device, autocast_dtype, want
    finally:
        if run_device != home:
            model.to(home)
        for p, rg, grad, dt in zip(params, saved_requires_grad, saved_grads, saved_dtypes):
            if p.dtype != dt:
                p.data = p.data.to(dt)
            p.grad = grad
            p.requires_grad_(rg)
        for m, mode in zip(model.modules(), saved_modes):
            m.training = mode
        for m, flag in saved_ckpt:
            m.gradient_checkpointing = flag

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

The model comes back exactly as it went in: requires_grad flags, train/eval modes, dtype,
device, ``.grad`` tensors, and no hooks left behind.

Data parallel (``torchrun`` / ``accelerate launch``): when ``torch.distributed`` is initialized
with more than one rank, every rank builds the same seeded batch list and probes its share,
``batches[rank::world_size]``; the per-tensor sums and token counts are then all-reduced, so
every rank ends with the same scores, equal to a single-process probe over the same batches
(up to summation order). A rank without a batch (fewer batches than ranks) adds zeros. A rank
that fails makes every rank raise, never a hang. See ``docs/distributed.md``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .architecture import Architecture, block_targets, find_blocks, probed_parameters, role_of
from .batches import IGNORE_INDEX
from .batches import probe_batches as make_probe_batches
from .scores import LayerScores

METHODS = ("onepass", "chunked")
PARAMS = ("lora-targets", "all")


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

    Returns:
        :class:`LayerScores`, with per-tensor and per-role breakdowns and probe metadata.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; use 'onepass' (default) or 'chunked'.")
    if params not in PARAMS:
        raise ValueError(f"params={params!r}; use 'lora-targets' (default) or 'all'.")
    if method == "chunked" and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; it must be >= 1.")
    arch = find_blocks(model, layers_path)
    if method == "chunked" and any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise ValueError(
            "method='chunked' reads full weight gradients, which FSDP reduces across ranks before the "
            "probe can see this rank's own; use method='onepass' (the default) on a sharded model."
        )
    _check_deepspeed(model, params, method)
    if num_layers is not None and num_layers != arch.num_layers:
        raise ValueError(
            f"num_layers={num_layers} but {type(model).__name__} has {arch.num_layers} blocks at "
            f"'{arch.blocks_path}'; pass num_layers=None to detect it."
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

    rank, world_size = _rank_and_world_size()
    mine = list(enumerate(batches))[rank::world_size]  # (index, batch): all of them on one process

    start = time.perf_counter()
    failure: Exception | None = None
    with _probe_state(model, device, dtype, train_mode) as (run_device, autocast_dtype, compute_dtype):
        run = _onepass if method == "onepass" else _chunked
        show = progress and rank == 0
        try:
            per_tensor = run(model, arch, mine, params, run_device, autocast_dtype, seed, chunk_size, show)
        except Exception as err:
            if world_size == 1:
                raise
            failure, per_tensor = err, {}  # the other ranks must hear of it before anyone raises
    if world_size > 1:
        _raise_if_any_rank_failed(failure, rank)
        my_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for _, b in mine)
        per_tensor = _all_reduce_scores(per_tensor, my_tokens, arch, params, tokens)
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
    }
    scores = _to_scores(arch, per_tensor, meta)
    agree_across_ranks(dict(scores), "layer scores")
    return scores


def _to_scores(arch: Architecture, per_tensor: dict[int, dict[str, float]], meta: dict) -> LayerScores:
    scores, roles = {}, {}
    for layer in range(arch.num_layers):
        targets = block_targets(arch.blocks[layer])
        tensors = per_tensor.get(layer, {})
        scores[layer] = math.fsum(tensors.values())
        subtotal: dict[str, float] = defaultdict(float)
        for name, value in tensors.items():
            subtotal[role_of(name, targets)] += value
        roles[layer] = dict(subtotal)
    return LayerScores(scores, modules=per_tensor, roles=roles, meta=meta)


# --------------------------------------------------------------------------- the loss


def _target_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
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
        loss = _target_loss(model, batch)
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


# --------------------------------------------------------------------------- onepass


def _gram_norm_sq(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||G^T X||_F^2 for X (N, d_in), G (N, d_out), in fp32, by the cheaper route."""
    x, g = x.float(), g.float()
    n, d_in, d_out = x.shape[0], x.shape[1], g.shape[1]
    if n * (d_in + d_out) < d_in * d_out:
        return ((x @ x.T) * (g @ g.T)).sum().clamp_min(0)
    return (g.T @ x).square().sum()


class _LinearNorm:
    """Hooks on one Linear/Conv1D: keeps each call's input, pairs it with its output gradient."""

    def __init__(self, module: nn.Module, on_done) -> None:
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
            self.on_done(_gram_norm_sq(x, g).sqrt().item())


def _measure_and_free(done):
    def hook(param: torch.Tensor) -> None:
        done(torch.linalg.vector_norm(param.grad.float()).item())
        param.grad = None

    return hook


def _onepass(model, arch, batches, params, device, autocast_dtype, seed, chunk_size, progress):
    per_tensor: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    handles: list[Any] = []

    def add(layer: int, name: str):
        def done(value: float) -> None:
            per_tensor[layer][name] += _check_finite(value, layer, name)

        return done

    for layer, block in enumerate(arch.blocks):
        probed = probed_parameters(block, params)
        for name in probed:  # a tensor with no gradient in any batch (an unrouted expert) scores 0
            per_tensor[layer][name] += 0.0
        linear_weights = {}
        for t in block_targets(block):
            if t.is_module and f"{t.name}.weight" in probed:
                module = block.get_submodule(t.name)
                linear_weights[f"{t.name}.weight"] = module
        for name, param in probed.items():
            if name in linear_weights:
                hook = _LinearNorm(linear_weights[name], add(layer, name))
                handles.append(hook.handle)
            else:  # measured from its own gradient, freed as soon as it is accumulated
                param.requires_grad_(True)
                handles.append(param.register_post_accumulate_grad_hook(_measure_and_free(add(layer, name))))

    # Gradients must flow from the loss down to block 0 although every weight is frozen.
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    try:
        for i, batch in _bar(batches, progress, "probe"):
            _backward(model, batch, device, autocast_dtype, seed, i)
    finally:
        for h in handles:
            h.remove()
    return {layer: dict(v) for layer, v in per_tensor.items()}


# --------------------------------------------------------------------------- chunked


def _chunked(model, arch, batches, params, device, autocast_dtype, seed, chunk_size, progress):
    per_tensor: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    chunks = [range(s, min(s + chunk_size, arch.num_layers)) for s in range(0, arch.num_layers, chunk_size)]
    work = [(i, batch, chunk) for i, batch in batches for chunk in chunks]
    for i, batch, chunk in _bar(work, progress, "probe (chunked)"):
        probed = {layer: probed_parameters(arch.blocks[layer], params) for layer in chunk}
        for tensors in probed.values():
            for p in tensors.values():
                p.requires_grad_(True)
        try:
            _backward(model, batch, device, autocast_dtype, seed, i)
            for layer, tensors in probed.items():
                for name, p in tensors.items():
                    value = 0.0 if p.grad is None else torch.linalg.vector_norm(p.grad.float()).item()
                    per_tensor[layer][name] += _check_finite(value, layer, name)
        finally:
            for tensors in probed.values():
                for p in tensors.values():
                    p.grad = None
                    p.requires_grad_(False)
    return {layer: dict(v) for layer, v in per_tensor.items()}


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
    per_tensor: dict[int, dict[str, float]], my_tokens: int, arch: Architecture, params: str, tokens: int
) -> dict[int, dict[str, float]]:
    """Sum every rank's per-tensor norms and target-token count (float64, one fixed order)."""
    keys = [
        (layer, name) for layer, block in enumerate(arch.blocks) for name in probed_parameters(block, params)
    ]
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    values = [per_tensor.get(layer, {}).get(name, 0.0) for layer, name in keys]
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
    summed: dict[int, dict[str, float]] = defaultdict(dict)
    for (layer, name), value in zip(keys, total):
        summed[layer][name] = value
    return dict(summed)


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
